-- Statement trigger of every fragment table (AFTER INSERT / UPDATE / DELETE with transition
-- tables new_rows / old_rows): notes the changed (building, meter, time range) for the rollups.
-- The loader does not fire it (it writes with session_replication_role = replica and notes its
-- batches itself); SQL through the coordinator does. TG_ARGV[0] is the fragment's shard name.
CREATE FUNCTION buildsmart.note_changes()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO buildsmart.rollup_changes (shard, building, meter, ts_from, ts_to)
        SELECT TG_ARGV[0], n.building, n.meter, min(n.ts), max(n.ts) FROM new_rows n GROUP BY n.building, n.meter;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO buildsmart.rollup_changes (shard, building, meter, ts_from, ts_to)
        SELECT TG_ARGV[0], o.building, o.meter, min(o.ts), max(o.ts) FROM old_rows o GROUP BY o.building, o.meter;
    END IF;
    RETURN NULL;
END;
$$;
-- A trigger function: it fires without EXECUTE; nobody calls it directly.
REVOKE EXECUTE ON FUNCTION buildsmart.note_changes() FROM PUBLIC;
