-- The non-blocking form of fragment_switch_lock, for all given fragments at once (restore points,
-- orchestrator/backup/points.py): takes every lock that is free and returns the fragments whose
-- lock a loader holds (empty: all taken). The caller then waits for those few with a short
-- lock_timeout, or rolls back, which releases the ones taken. Waiting on every lock in turn
-- would queue each new loader batch behind a batch in flight, a pause as long as that batch.
CREATE FUNCTION buildsmart.fragment_try_switch_lock(fragment_ids integer[])
RETURNS integer[]
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(f ORDER BY f) FILTER (WHERE NOT pg_catalog.pg_try_advisory_xact_lock(1112755524, f)), '{}')
      FROM (SELECT DISTINCT u AS f FROM unnest(fragment_ids) u ORDER BY 1) s
$$;
