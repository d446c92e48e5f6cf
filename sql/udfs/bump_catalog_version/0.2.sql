-- Bump the routing version in the switching transaction (loaders re-read placements on change).
CREATE FUNCTION buildsmart.bump_catalog_version()
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ UPDATE buildsmart.catalog_version SET version = version + 1, changed_at = now() RETURNING version $$;
