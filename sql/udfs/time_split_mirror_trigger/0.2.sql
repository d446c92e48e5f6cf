-- The time variant of split_mirror_trigger: while a fragment of one building range is split by
-- TIME on its worker, mirrors every change to rows at or after the split instant (TG_ARGV[1], an
-- ISO timestamp with offset) into the new later fragment (TG_ARGV[0]). TG_ARGV[2] is the
-- precomputed "col = EXCLUDED.col, ..." list of the upsert. Installed ENABLE ALWAYS.
CREATE FUNCTION buildsmart.time_split_mirror_trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target text := TG_ARGV[0];
    split_ts timestamptz := TG_ARGV[1]::timestamptz;
    sets text := TG_ARGV[2];
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') AND OLD.ts >= split_ts THEN
        EXECUTE format('DELETE FROM %s WHERE building = $1 AND meter = $2 AND ts = $3', target)
          USING OLD.building, OLD.meter, OLD.ts;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.ts >= split_ts THEN
        EXECUTE format('INSERT INTO %s SELECT ($1).* ON CONFLICT (building, meter, ts) DO UPDATE SET %s', target, sets)
          USING NEW;
    END IF;
    RETURN NULL;
END;
$$;
