-- Start (UTC) of the time partition holding ts for a partition interval: whole months are
-- aligned to calendar months counted from 2000-01; day/hour intervals with date_bin from 2000-01-03.
CREATE FUNCTION buildsmart.partition_start(part_interval interval, ts timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    months int := extract(year FROM part_interval)::int * 12 + extract(month FROM part_interval)::int;
    utc timestamp := pg_catalog.timezone('UTC', ts);
    m int;
BEGIN
    IF months > 0 THEN
        IF part_interval <> make_interval(months => months) THEN
            RAISE EXCEPTION 'partition interval % mixes months with days or time', part_interval
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        m := (extract(year FROM utc)::int - 2000) * 12 + extract(month FROM utc)::int - 1;
        m := floor(m::numeric / months)::int * months;
        RETURN pg_catalog.timezone('UTC', make_timestamp(2000 + floor(m / 12.0)::int, (m - floor(m / 12.0)::int * 12) + 1, 1, 0, 0, 0));
    END IF;
    IF part_interval <= interval '0' THEN
        RAISE EXCEPTION 'partition interval must be positive, got %', part_interval
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pg_catalog.timezone('UTC', pg_catalog.date_bin(part_interval, utc, timestamp '2000-01-03 00:00'));
END;
$$;
