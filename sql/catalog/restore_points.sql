-- Cluster-consistent restore points (`buildsmart backup point`, orchestrator/backup/points.py).
-- One row per point: the name given to pg_create_restore_point on every node's primary, the
-- catalog version and topology it belongs to, the LSN per node group, and the per-fragment
-- checksums computed from snapshots exported inside the point's write pause. The backup
-- repository holds the same record (points/<name>.json); a restored cluster does not contain the
-- row of the point it was restored to (the row commits after the point).
CREATE TABLE buildsmart.restore_points (
    name            text PRIMARY KEY,
    reason          text NOT NULL DEFAULT 'manual',
    created_at      timestamptz NOT NULL,
    catalog_version bigint NOT NULL,
    pause_ms        double precision NOT NULL,
    lsns            jsonb NOT NULL,
    topology        jsonb NOT NULL,
    checksums       jsonb NOT NULL DEFAULT '{}'::jsonb
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.restore_points', '');
