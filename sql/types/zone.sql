-- Time zone names as an enum. Why not text: postgres_fdw never ships a function whose input
-- collation does not come from a foreign column, so time_bucket(..., tz text) would keep
-- GROUP BY on the coordinator. An enum is not collatable, belongs to this extension, and is
-- shipped as its label, so time_bucket(..., 'Europe/London') runs on the workers.
DO $$
BEGIN
    EXECUTE (
        SELECT format('CREATE TYPE buildsmart.zone AS ENUM (%s)', string_agg(quote_literal(name), ', ' ORDER BY name))
          FROM (SELECT DISTINCT name FROM pg_catalog.pg_timezone_names WHERE length(name) < 64) z
    );
END;
$$;
