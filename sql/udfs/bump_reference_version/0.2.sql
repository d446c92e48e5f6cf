-- Statement trigger of the reference tables on the coordinator: their workers' copies are out of
-- date; the rollups task copies them (orchestrator/energy/reference.py). SECURITY DEFINER: the
-- application role edits metadata but cannot write the catalog.
CREATE FUNCTION buildsmart.bump_reference_version()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE buildsmart.reference_version SET version = version + 1;
    RETURN NULL;
END;
$$;
-- A trigger function: it fires without EXECUTE; nobody calls it directly.
REVOKE EXECUTE ON FUNCTION buildsmart.bump_reference_version() FROM PUBLIC;
