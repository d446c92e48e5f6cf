-- Bucket start of ts for a fixed-width bucket (15 minutes, hour, day, week). Weeks start on
-- Monday (2000-01-03 was a Monday).
-- UTC form: a plain SQL function that the planner inlines into date_bin(), which postgres_fdw ships.
CREATE FUNCTION buildsmart.time_bucket(width interval, ts timestamptz)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN pg_catalog.date_bin(width, ts, timestamptz '2000-01-03 00:00:00+00');

-- Zoned form: buckets follow local midnight in tz (DST included). IMMUTABLE because the zone is
-- an argument; plpgsql so it is not inlined and stays a shippable function of this extension.
CREATE FUNCTION buildsmart.time_bucket(width interval, ts timestamptz, tz buildsmart.zone)
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    RETURN pg_catalog.timezone(tz::text, pg_catalog.date_bin(width, pg_catalog.timezone(tz::text, ts), timestamp '2000-01-03 00:00'));
END;
$$;
