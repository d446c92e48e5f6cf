-- Missing intervals of each meter of one fragment (on its worker, next to the rows): where the
-- next reading comes later than the meter's expected_interval (default 1 hour), and, when
-- since/until are given, before the first and after the last reading of the window.
-- missing = how many readings the gap lacks. `buildsmart gaps` runs it on every fragment.
CREATE FUNCTION buildsmart.meter_gaps(
    p_shard text, p_building text DEFAULT NULL,
    p_since timestamptz DEFAULT '-infinity', p_until timestamptz DEFAULT 'infinity')
RETURNS TABLE (building text, meter text, gap_from timestamptz, gap_to timestamptz, missing bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN QUERY EXECUTE format($q$
        WITH r AS (
            SELECT f.building::text AS building, f.meter, f.ts,
                   lag(f.ts) OVER w AS prev_ts, lead(f.ts) OVER w AS next_ts,
                   coalesce(m.expected_interval, interval '1 hour') AS step
              FROM %s f LEFT JOIN public.meters m ON m.building = f.building AND m.meter = f.meter
             WHERE ($1::text IS NULL OR f.building = $1) AND f.ts >= $2 AND f.ts < $3
            WINDOW w AS (PARTITION BY f.building, f.meter ORDER BY f.ts)
        )
        SELECT r.building, r.meter, r.ts + r.step, r.next_ts,
               (floor(extract(epoch FROM r.next_ts - r.ts) / extract(epoch FROM r.step)) - 1)::bigint
          FROM r WHERE r.next_ts IS NOT NULL AND r.next_ts > r.ts + r.step
        UNION ALL
        SELECT r.building, r.meter, $2, r.ts, floor(extract(epoch FROM r.ts - $2) / extract(epoch FROM r.step))::bigint
          FROM r WHERE r.prev_ts IS NULL AND $2 > '-infinity' AND r.ts >= $2 + r.step
        UNION ALL
        SELECT r.building, r.meter, r.ts + r.step, $3,
               (floor(extract(epoch FROM $3 - r.ts) / extract(epoch FROM r.step)) - 1)::bigint
          FROM r WHERE r.next_ts IS NULL AND $3 < 'infinity' AND $3 > r.ts + r.step
        ORDER BY 1, 2, 3$q$, format('bsdata.%I', p_shard))
    USING p_building, p_since, p_until;
END;
$fn$;
