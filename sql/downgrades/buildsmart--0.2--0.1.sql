-- buildsmart 0.2 -> 0.1. Fails (and changes nothing) while a fragment still uses the C trigger:
-- the orchestrator of 0.1 must have re-created the PL/pgSQL triggers first.
DROP FUNCTION buildsmart.replace_existing();
DROP TABLE buildsmart.restore_points;
DROP FUNCTION buildsmart.fragment_try_switch_lock(integer[]);
