-- Latest reading of every meter (of one building, or of all), in two pushed-down steps:
-- (1) max(ts) per (building, meter): a GROUP BY that runs on the workers, per fragment;
-- (2) the rows at those keys, fetched with building = ANY(...) AND ts = ANY(...), which the
-- workers answer from the primary key index. A join back to readings instead would pull whole
-- fragments to the coordinator (seconds on millions of rows).
CREATE FUNCTION buildsmart.latest_readings(only_building text DEFAULT NULL)
RETURNS TABLE (building text, meter text, ts timestamptz, kwh double precision)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bs text[];
    ms text[];
    tss timestamptz[];
BEGIN
    IF only_building IS NULL THEN
        SELECT array_agg(r.building), array_agg(r.meter), array_agg(r.max_ts) INTO bs, ms, tss
          FROM (SELECT x.building, x.meter, max(x.ts) AS max_ts FROM public.readings x GROUP BY x.building, x.meter) r;
    ELSE
        SELECT array_agg(r.building), array_agg(r.meter), array_agg(r.max_ts) INTO bs, ms, tss
          FROM (SELECT x.building, x.meter, max(x.ts) AS max_ts FROM public.readings x
                 WHERE x.building = only_building GROUP BY x.building, x.meter) r;
    END IF;
    IF bs IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT r.building::text, r.meter, r.ts, r.kwh
          FROM public.readings r
          JOIN unnest(bs, ms, tss) AS k(b, m, t) ON r.building = k.b AND r.meter = k.m AND r.ts = k.t
         WHERE r.building = ANY (ARRAY(SELECT DISTINCT u FROM unnest(bs) u))
           AND r.ts = ANY (ARRAY(SELECT DISTINCT u FROM unnest(tss) u))
         ORDER BY 1, 2;
END;
$$;
