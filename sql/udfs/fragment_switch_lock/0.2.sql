-- The exclusive side of fragment_write_lock, taken by the switch of a move or split.
CREATE FUNCTION buildsmart.fragment_switch_lock(fragment_id integer)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.pg_advisory_xact_lock(1112755524, fragment_id) $$;
