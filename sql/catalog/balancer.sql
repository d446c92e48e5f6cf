-- Self-distributing data (issue 9): time ranges of fragments, the balancer's state and decision
-- log, and the last run of each periodic task of the background task runner.

-- A fragment normally holds a building range for all time. When one building outgrows a
-- fragment, its building range is split by TIME: on the coordinator that range becomes a table
-- bsdata.<time_group> partitioned by RANGE (ts) whose partitions are the foreign tables of the
-- fragments; ts_from/ts_to (NULL = unbounded) are each fragment's time range there.
ALTER TABLE buildsmart.fragments
    ADD COLUMN ts_from timestamptz,
    ADD COLUMN ts_to timestamptz,
    ADD COLUMN time_group text,
    ADD CHECK (ts_from IS NULL OR ts_to IS NULL OR ts_from < ts_to),
    ADD CHECK (time_group IS NOT NULL OR (ts_from IS NULL AND ts_to IS NULL));

-- One row. auto_layout: the first load may replace the layout of EMPTY fragments with split
-- points from its own building counts (false when split points were given by the user).
-- settings: overrides of the balancer policy defaults (orchestrator/elastic/policy.py).
CREATE TABLE buildsmart.balancer (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    paused       boolean NOT NULL DEFAULT false,
    paused_note  text,
    auto_layout  boolean NOT NULL DEFAULT true,
    settings     jsonb NOT NULL DEFAULT '{}'::jsonb,
    changed_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO buildsmart.balancer DEFAULT VALUES;
SELECT pg_catalog.pg_extension_config_dump('buildsmart.balancer', '');

-- Every decision of the balancer and of the first-load pre-split, with its reason. Idle
-- decisions ('wait', 'none') are recorded only when their reason changes.
CREATE TABLE buildsmart.balancer_log (
    entry_id    bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    action      text NOT NULL
                CHECK (action IN ('presplit', 'split', 'time_split', 'move', 'wait', 'none', 'pause', 'resume', 'config')),
    outcome     text NOT NULL DEFAULT 'decided' CHECK (outcome IN ('decided', 'done', 'failed', 'skipped')),
    fragment_id integer,
    reason      text NOT NULL,
    job_id      bigint,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX balancer_log_at_idx ON buildsmart.balancer_log (at);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.balancer_log', '');

-- Last run of each periodic task (orchestrator/tasks/): who ran it and how it ended.
CREATE TABLE buildsmart.task_runs (
    task          text PRIMARY KEY,
    runner        text NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    outcome       text NOT NULL DEFAULT 'running' CHECK (outcome IN ('running', 'ok', 'failed')),
    summary       text,
    runs          bigint NOT NULL DEFAULT 0,
    failures      bigint NOT NULL DEFAULT 0
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.task_runs', '');
