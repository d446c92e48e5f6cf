-- buildsmart 0.1 -> 0.2 (ALTER EXTENSION buildsmart UPDATE TO '0.2'; `buildsmart upgrade` does it
-- on every node). Lines `-- #include <file>` are replaced by that file when the script is built.
--
-- 0.2: the C module (distributed planner, loaded through session_preload_libraries) and the
-- latest-wins trigger of fragments in C. Fragments made by 0.1 keep their PL/pgSQL trigger until
-- the orchestrator swaps it (`buildsmart up` / `init` plan that step).
-- #include udfs/replace_existing/0.2.sql
-- #include catalog/twophase.sql
-- #include catalog/checks.sql
-- #include catalog/balancer.sql
-- #include udfs/time_split_mirror_trigger/0.2.sql
-- #include udfs/ensure_time_partitions/0.2.sql
--
-- Cluster restore points (orchestrator/backup/points.py).
-- #include catalog/restore_points.sql
-- #include udfs/fragment_try_switch_lock/0.2.sql
--
-- Fragment ids from a sequence (concurrent splits).
-- #include catalog/fragment_ids.sql
--
-- Every function of 0.1 gets a pinned search_path, so none resolves a name through a schema a
-- client could write (time_bucket and month_bucket call only schema-qualified functions and stay
-- inlinable and cheap per row). ensure_time_partitions (above) is SECURITY DEFINER for the
-- ingest role, restricted to fragment tables.
ALTER FUNCTION buildsmart.partition_start(interval, timestamptz) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION buildsmart.fragment_for_building(regclass, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION buildsmart.fragment_write_lock(integer[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION buildsmart.fragment_switch_lock(integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION buildsmart.bump_catalog_version() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION buildsmart.split_mirror_trigger() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION buildsmart.submit_job(text, jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION buildsmart.latest_readings(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pg_catalog.citus_add_node(text, integer, integer, text, name) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pg_catalog.citus_remove_node(text, integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pg_catalog.citus_drain_node(text, integer, text, name) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pg_catalog.citus_rebalance_start(name, boolean, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pg_catalog.citus_rebalance_status(boolean) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pg_catalog.citus_move_shard_placement(bigint, text, integer, text, integer, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pg_catalog.create_time_partitions(regclass, interval, timestamptz, timestamptz) SET search_path = pg_catalog, pg_temp;
ALTER PROCEDURE pg_catalog.drop_old_time_partitions(regclass, timestamptz) SET search_path = pg_catalog, pg_temp;
-- Energy analytics (issue 14): rollup change log and state, reference tables' version, rollup
-- settings, and the functions of rollups, registers and gaps.
-- #include catalog/energy.sql
-- #include udfs/is_zone/0.2.sql
-- #include udfs/bump_reference_version/0.2.sql
-- #include udfs/register_delta/0.2.sql
-- #include udfs/note_changes/0.2.sql
-- #include udfs/refresh_rollups/0.2.sql
-- #include udfs/meter_gaps/0.2.sql
-- #include udfs/gapfill/0.2.sql
-- Users of the HTTP front door (`buildsmart serve`, orchestrator/serve/users.py).
-- #include catalog/http_users.sql
