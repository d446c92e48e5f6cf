-- AFTER row trigger on a fragment being split on its worker: mirrors every change to rows at or
-- above the split point (TG_ARGV[1]) into the new upper fragment (TG_ARGV[0]) while the copy of
-- existing rows runs, so writes continue during a split. TG_ARGV[2] is the precomputed
-- "col = EXCLUDED.col, ..." list: an upsert, because the copy may hold an older version of the
-- same key uncommitted (the upsert then waits for it and overwrites it with the newer value).
-- Installed ENABLE ALWAYS because the bulk loader writes with session_replication_role = replica.
CREATE FUNCTION buildsmart.split_mirror_trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target text := TG_ARGV[0];
    split_at text := TG_ARGV[1];
    sets text := TG_ARGV[2];
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') AND OLD.building COLLATE "C" >= split_at COLLATE "C" THEN
        EXECUTE format('DELETE FROM %s WHERE building = $1 AND meter = $2 AND ts = $3', target)
          USING OLD.building, OLD.meter, OLD.ts;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.building COLLATE "C" >= split_at COLLATE "C" THEN
        EXECUTE format('INSERT INTO %s SELECT ($1).* ON CONFLICT (building, meter, ts) DO UPDATE SET %s', target, sets)
          USING NEW;
    END IF;
    RETURN NULL;
END;
$$;
