-- Refresh the rollups of one fragment on its worker, next to its rows, without rescanning
-- history: the changed ranges of buildsmart.rollup_changes (or, for a rebuild, every meter from
-- its first reading) are consumed, widened to whole local days of the building (and, for a
-- cumulative meter, to the next reading, whose delta a change also alters), merged per meter,
-- and the hourly and daily rows of those days are deleted and computed again from raw rows.
--
-- Per reading, the consumption is kwh * multiplier for an interval meter; for a cumulative
-- meter, register_delta(previous reading, reading, register_max) * multiplier, or, when a
-- replacement (public.meter_replacements) lies in (previous, this], the old register's delta up
-- to old_final plus the new one's from new_initial; the first reading of a meter has none (NULL).
-- It counts for the bucket of its own ts. Buckets: UTC hours; days in the building's time zone
-- (23 or 25 hours on DST changes). expected = bucket length / the meter's expected_interval.
-- Meters or buildings missing from the reference tables get the defaults: interval readings,
-- multiplier 1, expected every hour, UTC. In a time group (piece_from set) a bucket straddling
-- the piece's start is stored at piece_from: each piece holds its part of that bucket.
CREATE FUNCTION buildsmart.refresh_rollups(
    p_shard text, p_full boolean DEFAULT false, piece_from timestamptz DEFAULT NULL)
RETURNS TABLE (changes bigint, ranges bigint, hourly_rows bigint, daily_rows bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    frag   text := format('bsdata.%I', p_shard);
    hourly text := format('bsdata.%I', p_shard || '_hourly');
    daily  text := format('bsdata.%I', p_shard || '_daily');
    n_changes bigint;
    n_ranges  bigint;
    n_hourly  bigint;
    n_daily   bigint;
BEGIN
    -- one refresh of a fragment at a time (the task runner and a manual `rollups refresh`)
    PERFORM pg_catalog.pg_advisory_xact_lock(1112755530, pg_catalog.hashtext(p_shard));
    DROP TABLE IF EXISTS pg_temp.bs_changed, pg_temp.bs_ranges, pg_temp.bs_cons;
    CREATE TEMP TABLE bs_changed (building text COLLATE "C", meter text, ts_from timestamptz, ts_to timestamptz)
        ON COMMIT DROP;
    IF p_full THEN
        DELETE FROM buildsmart.rollup_changes c WHERE c.shard = p_shard;
        EXECUTE format('INSERT INTO pg_temp.bs_changed SELECT f.building, f.meter, min(f.ts), ''infinity'' '
                       'FROM %s f GROUP BY f.building, f.meter', frag);
        GET DIAGNOSTICS n_changes = ROW_COUNT;
    ELSE
        WITH d AS (DELETE FROM buildsmart.rollup_changes c WHERE c.shard = p_shard
                   RETURNING c.building, c.meter, c.ts_from, c.ts_to)
        INSERT INTO pg_temp.bs_changed SELECT d.building, d.meter, d.ts_from, d.ts_to FROM d;
        GET DIAGNOSTICS n_changes = ROW_COUNT;
    END IF;
    IF n_changes = 0 THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint, 0::bigint, 0::bigint;
        RETURN;
    END IF;

    -- A changed or deleted reading of a register changes the delta of the next reading too.
    EXECUTE format(
        'UPDATE pg_temp.bs_changed c SET ts_to = coalesce((SELECT min(f.ts) FROM %s f '
        '  WHERE f.building = c.building AND f.meter = c.meter AND f.ts > c.ts_to), c.ts_to) '
        'FROM public.meters m WHERE m.building = c.building AND m.meter = c.meter '
        '  AND m.reading_type = ''cumulative'' AND c.ts_to < ''infinity''', frag);

    CREATE TEMP TABLE bs_ranges ON COMMIT DROP AS
    SELECT x.building, x.meter, x.tz, x.cumulative, x.mult, x.regmax, x.step_s,
           lower(x.r) AS lo_d, upper(x.r) AS hi_d,
           pg_catalog.date_trunc('hour', lower(x.r), 'UTC') AS lo_h,
           CASE WHEN pg_catalog.date_trunc('hour', upper(x.r), 'UTC') = upper(x.r) THEN upper(x.r)
                ELSE pg_catalog.date_trunc('hour', upper(x.r), 'UTC') + interval '1 hour' END AS hi_h
      FROM (SELECT c.building, c.meter, k.tz, k.cumulative, k.mult, k.regmax, k.step_s,
                   unnest(range_agg(tstzrange(pg_catalog.date_trunc('day', c.ts_from, k.tz),
                                              pg_catalog.date_add(pg_catalog.date_trunc('day', c.ts_to, k.tz), interval '1 day', k.tz)))) AS r
              FROM pg_temp.bs_changed c
              LEFT JOIN public.buildings b ON b.code = c.building
              LEFT JOIN public.meters m ON m.building = c.building AND m.meter = c.meter
              CROSS JOIN LATERAL (SELECT coalesce(b.time_zone, 'UTC') AS tz,
                                         coalesce(m.reading_type = 'cumulative', false) AS cumulative,
                                         coalesce(m.multiplier, 1.0)::double precision AS mult,
                                         m.register_max::double precision AS regmax,
                                         extract(epoch FROM coalesce(m.expected_interval, interval '1 hour'))::double precision AS step_s) k
             GROUP BY c.building, c.meter, k.tz, k.cumulative, k.mult, k.regmax, k.step_s) x;
    GET DIAGNOSTICS n_ranges = ROW_COUNT;

    EXECUTE format('DELETE FROM %s h USING pg_temp.bs_ranges r WHERE h.building = r.building AND h.meter = r.meter '
                   'AND h.ts >= r.lo_h AND h.ts < r.hi_h', hourly);
    EXECUTE format('DELETE FROM %s d USING pg_temp.bs_ranges r WHERE d.building = r.building AND d.meter = r.meter '
                   'AND d.ts >= r.lo_d AND d.ts < r.hi_d', daily);

    EXECUTE format($q$
        CREATE TEMP TABLE bs_cons ON COMMIT DROP AS
        SELECT r.building, r.meter, r.tz, r.step_s, r.lo_d, r.hi_d, x.ts,
               CASE WHEN NOT r.cumulative THEN x.kwh * r.mult
                    WHEN x.pts IS NULL THEN NULL
                    WHEN rp.ts IS NOT NULL THEN
                        (buildsmart.register_delta(x.pkwh, coalesce(rp.old_final, x.pkwh), r.regmax)
                         + buildsmart.register_delta(coalesce(rp.new_initial, 0), x.kwh, r.regmax)) * r.mult
                    ELSE buildsmart.register_delta(x.pkwh, x.kwh, r.regmax) * r.mult END AS v
          FROM pg_temp.bs_ranges r
         CROSS JOIN LATERAL (
               SELECT y.ts, y.kwh, lag(y.ts) OVER w AS pts, lag(y.kwh) OVER w AS pkwh
                 FROM ((SELECT f.ts, f.kwh FROM %1$s f
                         WHERE r.cumulative AND f.building = r.building AND f.meter = r.meter AND f.ts < r.lo_h
                         ORDER BY f.ts DESC LIMIT 1)
                       UNION ALL
                       SELECT f.ts, f.kwh FROM %1$s f
                        WHERE f.building = r.building AND f.meter = r.meter AND f.ts >= r.lo_h AND f.ts < r.hi_h) y
               WINDOW w AS (ORDER BY y.ts)) x
          LEFT JOIN LATERAL (
               SELECT p.ts, p.old_final, p.new_initial FROM public.meter_replacements p
                WHERE r.cumulative AND p.building = r.building AND p.meter = r.meter AND p.ts > x.pts AND p.ts <= x.ts
                ORDER BY p.ts DESC LIMIT 1) rp ON true
         WHERE x.ts >= r.lo_h$q$, frag);

    EXECUTE format($q$
        INSERT INTO %s (building, meter, ts, kwh, kwh_min, kwh_max, readings, expected, completeness)
        SELECT q.building, q.meter, greatest(q.b, $1), sum(q.v), min(q.v), max(q.v), count(*), q.e,
               count(*)::double precision / nullif(q.e, 0)
          FROM (SELECT c.building, c.meter, c.v, pg_catalog.date_trunc('hour', c.ts, 'UTC') AS b,
                       floor(3600 / c.step_s)::integer AS e
                  FROM pg_temp.bs_cons c) q
         GROUP BY q.building, q.meter, q.b, q.e$q$, hourly) USING piece_from;
    GET DIAGNOSTICS n_hourly = ROW_COUNT;

    EXECUTE format($q$
        INSERT INTO %s (building, meter, ts, day, month, kwh, kwh_min, kwh_max, readings, expected, completeness, month_expected)
        SELECT q.building, q.meter, greatest(q.d, $1), pg_catalog.timezone(q.tz, q.d)::date,
               pg_catalog.date_trunc('month', pg_catalog.timezone(q.tz, q.d))::date,
               sum(q.v), min(q.v), max(q.v), count(*), e.day_n, count(*)::double precision / nullif(e.day_n, 0), e.month_n
          FROM (SELECT c.building, c.meter, c.v, c.tz, c.step_s, pg_catalog.date_trunc('day', c.ts, c.tz) AS d,
                       pg_catalog.date_trunc('month', c.ts, c.tz) AS m
                  FROM pg_temp.bs_cons c WHERE c.ts >= c.lo_d AND c.ts < c.hi_d) q
         CROSS JOIN LATERAL (
               SELECT floor(extract(epoch FROM pg_catalog.date_add(q.d, interval '1 day', q.tz) - q.d) / q.step_s)::integer AS day_n,
                      floor(extract(epoch FROM pg_catalog.date_add(q.m, interval '1 month', q.tz) - q.m) / q.step_s)::integer AS month_n) e
         GROUP BY q.building, q.meter, q.d, q.tz, e.day_n, e.month_n$q$, daily) USING piece_from;
    GET DIAGNOSTICS n_daily = ROW_COUNT;

    UPDATE buildsmart.rollup_state s SET refreshed_at = now() WHERE s.shard = p_shard;
    RETURN QUERY SELECT n_changes, n_ranges, n_hourly, n_daily;
END;
$fn$;
