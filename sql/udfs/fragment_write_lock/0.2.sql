-- Called by a loader at the start of each batch, inside a coordinator transaction that it keeps
-- open until the batch has committed on the worker: takes a SHARED advisory lock per fragment
-- (released when that transaction ends) and returns the catalog version. A move or split takes
-- the same lock EXCLUSIVELY for its switch, so it waits for batches in flight and holds new ones
-- back; a loader that then sees a newer version re-reads the placements and re-routes the batch.
CREATE FUNCTION buildsmart.fragment_write_lock(fragment_ids integer[])
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fid integer;
BEGIN
    FOR fid IN SELECT DISTINCT u FROM unnest(fragment_ids) u ORDER BY u LOOP
        PERFORM pg_catalog.pg_advisory_xact_lock_shared(1112755524, fid);
    END LOOP;
    RETURN (SELECT version FROM buildsmart.catalog_version);
END;
$$;
