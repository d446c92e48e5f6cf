-- Energy analytics (issue 14): what the rollups of every fragment need on each node, and the
-- cluster-wide settings of the coordinator. The rollup tables themselves are per fragment
-- (bsdata.<shard>_hourly / _daily next to bsdata.<shard>) and are made by the orchestrator
-- (orchestrator/energy/rollups.py), like the fragment tables.

-- Invalidation log (on every worker): (building, meter, time range) of a fragment whose rows
-- changed since its rollups were last refreshed. The loader writes it in the transaction of each
-- batch, a statement trigger on each fragment for every other writer (SQL through the
-- coordinator); refresh_rollups() consumes it in the transaction that recomputes those ranges.
CREATE TABLE buildsmart.rollup_changes (
    change_id bigserial PRIMARY KEY,
    shard     text NOT NULL,
    building  text COLLATE "C" NOT NULL,
    meter     text NOT NULL,
    ts_from   timestamptz NOT NULL,
    ts_to     timestamptz NOT NULL,
    noted_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (ts_from <= ts_to)
);
CREATE INDEX rollup_changes_shard_idx ON buildsmart.rollup_changes (shard);

-- Rollups built on this worker: from which fragment table (a move makes a new table with a new
-- oid, so rollups found next to another oid are stale and rebuilt) and for which ranges.
CREATE TABLE buildsmart.rollup_state (
    shard        text PRIMARY KEY,
    fragment_oid oid NOT NULL,
    range_from   text COLLATE "C",
    range_to     text COLLATE "C",
    ts_from      timestamptz,
    ts_to        timestamptz,
    built_at     timestamptz NOT NULL DEFAULT now(),
    refreshed_at timestamptz
);

-- Coordinator: the foreign partitions of public.readings_hourly / readings_daily as attached
-- (they follow the fragments of readings in the background, after their rollups are built).
CREATE TABLE buildsmart.rollup_partitions (
    shard      text PRIMARY KEY,
    node_name  text NOT NULL,
    range_from text COLLATE "C",
    range_to   text COLLATE "C",
    ts_from    timestamptz,
    ts_to      timestamptz,
    time_group text
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.rollup_partitions', '');

-- Coordinator, one row: how often the task runner refreshes, and how long raw readings and
-- rollups are kept (NULL: for ever). Raw and rollup retention are independent.
CREATE TABLE buildsmart.rollup_settings (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    refresh_every interval NOT NULL DEFAULT '5 seconds' CHECK (refresh_every >= '1 second'),
    keep_raw      interval,
    keep_hourly   interval,
    keep_daily    interval,
    paused        boolean NOT NULL DEFAULT false,
    changed_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO buildsmart.rollup_settings DEFAULT VALUES;
SELECT pg_catalog.pg_extension_config_dump('buildsmart.rollup_settings', '');

-- Reference tables (public.buildings, public.meters, public.meter_replacements) are edited on
-- the coordinator and copied to every worker. Coordinator: bumped by every change; worker: the
-- version its copies hold.
CREATE TABLE buildsmart.reference_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL DEFAULT 1,
    synced_at timestamptz
);
INSERT INTO buildsmart.reference_version (version) VALUES (1);
