-- time_bucket_gapfill for one meter (on the coordinator): a regular grid of buckets from start
-- (inclusive) to finish (exclusive), stepping by `bucket` in time zone `zone` (so '1 day' is a
-- local day, 23 or 25 hours on DST changes), one row per bucket, also where nothing was read.
--   source: 'raw' (readings.kwh), 'hourly' or 'daily' (the rollups' consumption, kwh)
--   agg:    how a bucket's values combine: sum (default), avg, min, max, last (a register's
--           last reading: interpolate it for registers)
--   fill:   'none' (NULL), 'locf' (last value carried forward), 'interpolate' (linear in time
--           between the neighbouring buckets that have values; NULL before the first and
--           after the last)
-- readings: raw readings in the bucket; filled: the value was made up by the fill.
-- The rows are read in one query pushed to the worker of the building, bucketed here.
CREATE FUNCTION buildsmart.gapfill(
    p_building text, p_meter text, bucket interval, start timestamptz, finish timestamptz,
    fill text DEFAULT 'none', source text DEFAULT 'raw', agg text DEFAULT 'sum', zone text DEFAULT 'UTC')
RETURNS TABLE (bucket_start timestamptz, value double precision, readings bigint, filled boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    grid timestamptz[];
    src text;
    val text;
    cnt text;
BEGIN
    IF fill NOT IN ('none', 'locf', 'interpolate') THEN
        RAISE EXCEPTION 'gapfill: fill must be none, locf or interpolate, not %', fill USING ERRCODE = '22023';
    END IF;
    IF agg NOT IN ('sum', 'avg', 'min', 'max', 'last') THEN
        RAISE EXCEPTION 'gapfill: agg must be sum, avg, min, max or last, not %', agg USING ERRCODE = '22023';
    END IF;
    IF bucket <= interval '0' OR finish <= start THEN
        RAISE EXCEPTION 'gapfill: need a positive bucket and start < finish' USING ERRCODE = '22023';
    END IF;
    grid := ARRAY(SELECT g FROM pg_catalog.generate_series(start, finish, bucket, zone) g WHERE g < finish);
    IF cardinality(grid) > 1000000 THEN
        RAISE EXCEPTION 'gapfill: % buckets is too many (at most 1,000,000)', cardinality(grid) USING ERRCODE = '54000';
    END IF;
    src := CASE source WHEN 'raw' THEN 'public.readings' WHEN 'hourly' THEN 'public.readings_hourly'
                       WHEN 'daily' THEN 'public.readings_daily' END;
    IF src IS NULL THEN
        RAISE EXCEPTION 'gapfill: source must be raw, hourly or daily, not %', source USING ERRCODE = '22023';
    END IF;
    val := CASE agg WHEN 'last' THEN '(array_agg(t.kwh ORDER BY t.ts DESC))[1]' ELSE format('%s(t.kwh)', agg) END;
    cnt := CASE source WHEN 'raw' THEN 'count(*)' ELSE 'sum(t.readings)' END;
    RETURN QUERY EXECUTE format($q$
        WITH rows AS (SELECT t.ts, t.kwh%4$s FROM %1$s t
                       WHERE t.building = $1 AND t.meter = $2 AND t.ts >= $3 AND t.ts < $4),
        d AS (SELECT pg_catalog.width_bucket(t.ts, $5) AS i, %2$s AS v, %3$s AS n FROM rows t GROUP BY 1),
        j AS (SELECT g.i, $5[g.i] AS b, d.v, coalesce(d.n, 0)::bigint AS n
                FROM generate_subscripts($5, 1) AS g(i) LEFT JOIN d ON d.i = g.i),
        k AS (SELECT j.*, count(j.v) OVER (ORDER BY j.i) AS gp, count(j.v) OVER (ORDER BY j.i DESC) AS gn FROM j),
        p AS (SELECT k.*, first_value(k.v) OVER (PARTITION BY k.gp ORDER BY k.i) AS pv,
                     first_value(k.b) OVER (PARTITION BY k.gp ORDER BY k.i) AS pb,
                     first_value(k.v) OVER (PARTITION BY k.gn ORDER BY k.i DESC) AS nv,
                     first_value(k.b) OVER (PARTITION BY k.gn ORDER BY k.i DESC) AS nb
                FROM k),
        f AS (SELECT p.b, p.v, p.n,
                     CASE WHEN p.v IS NOT NULL THEN p.v
                          WHEN $6 = 'locf' THEN p.pv
                          WHEN $6 = 'interpolate' AND p.pv IS NOT NULL AND p.nv IS NOT NULL THEN
                               p.pv + (p.nv - p.pv) * extract(epoch FROM p.b - p.pb) / extract(epoch FROM p.nb - p.pb)
                     END AS fv
                FROM p)
        SELECT f.b, f.fv, f.n, f.v IS NULL AND f.fv IS NOT NULL FROM f ORDER BY f.b$q$,
        src, val, cnt, CASE source WHEN 'raw' THEN '' ELSE ', t.readings' END)
    USING p_building, p_meter, start, finish, grid, fill;
END;
$fn$;
