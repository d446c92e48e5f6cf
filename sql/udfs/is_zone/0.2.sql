-- A time zone name that buildsmart.zone (and so time_bucket/month_bucket) knows: the CHECK of
-- public.buildings.time_zone, so a bad zone is refused when it is written, not at refresh.
CREATE FUNCTION buildsmart.is_zone(tz text)
RETURNS boolean
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_enum e WHERE e.enumtypid = 'buildsmart.zone'::regtype AND e.enumlabel = tz);
