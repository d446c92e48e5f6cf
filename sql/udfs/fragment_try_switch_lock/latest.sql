-- The non-blocking form of fragment_switch_lock, for all given fragments at once (restore points,
-- orchestrator/backup/points.py): true when every lock was taken; false when a loader holds any of
-- them, and then the caller rolls back, which releases the ones taken. Waiting on a busy lock
-- would queue every new loader batch behind it, a write pause as long as the batch in flight.
CREATE FUNCTION buildsmart.fragment_try_switch_lock(fragment_ids integer[])
RETURNS boolean
LANGUAGE sql
AS $$
    SELECT coalesce(bool_and(pg_catalog.pg_try_advisory_xact_lock(1112755524, f)), true)
      FROM (SELECT DISTINCT u AS f FROM unnest(fragment_ids) u ORDER BY 1) s
$$;
