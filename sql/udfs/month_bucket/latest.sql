-- First instant of the calendar month of ts in time zone tz (date_bin cannot do months).
CREATE FUNCTION buildsmart.month_bucket(ts timestamptz, tz buildsmart.zone DEFAULT 'UTC')
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    RETURN pg_catalog.date_trunc('month', ts, tz::text);
END;
$$;
