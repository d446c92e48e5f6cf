-- BEFORE INSERT row trigger on worker fragments: a reading inserted again replaces the stored
-- one (meters resend; the latest value wins), whatever columns the table has. It makes plain
-- INSERT/COPY through the coordinator keep the (building, meter, ts) rule. It deletes through
-- the partition root (where the application role has its grants) and the key prunes to one
-- partition. The orchestrator's own loader upserts in bulk and skips it
-- (session_replication_role = replica).
CREATE FUNCTION buildsmart.readings_replace_trigger()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('DELETE FROM %s WHERE building = $1 AND meter = $2 AND ts = $3',
                   coalesce(pg_catalog.pg_partition_root(TG_RELID), TG_RELID)::regclass)
      USING NEW.building, NEW.meter, NEW.ts;
    RETURN NEW;
END;
$$;
