-- Commit decisions of cluster-wide two-phase commits (migrations). A transaction prepared on
-- every node commits only once its decision row is committed here, on the coordinator; recovery
-- commits the prepared transactions of a recorded decision and rolls back every other one
-- (presumed abort), whatever order the nodes prepared in.
CREATE TABLE buildsmart.twophase_decisions (
    token      text PRIMARY KEY,            -- the gid prefix shared by the transaction's nodes
    purpose    text NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.twophase_decisions', '');
