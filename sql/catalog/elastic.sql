-- Elasticity catalog: the routing version loaders watch, long-running jobs with persisted step
-- state, and the last observed fragment sizes (for citus_shards and the rebalance planner).

-- Bumped in the same coordinator transaction that changes where a fragment lives (move, split,
-- node removal). Loaders compare it with the version they routed with (see fragment_write_lock).
CREATE TABLE buildsmart.catalog_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL DEFAULT 1,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO buildsmart.catalog_version DEFAULT VALUES;

-- Long operations. SQL functions (citus_*) insert 'scheduled' rows; `buildsmart jobs run` claims
-- them. step/detail are persisted after every step so a killed orchestrator can resume.
CREATE TABLE buildsmart.jobs (
    job_id      bigserial PRIMARY KEY,
    kind        text NOT NULL,
    args        jsonb NOT NULL DEFAULT '{}'::jsonb,
    state       text NOT NULL DEFAULT 'scheduled'
                CHECK (state IN ('scheduled', 'running', 'done', 'failed', 'cancelled')),
    step        text NOT NULL DEFAULT 'new',
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
    error       text,
    parent_id   bigint REFERENCES buildsmart.jobs,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_open_idx ON buildsmart.jobs (job_id) WHERE state IN ('scheduled', 'running');
-- At most one open job per fragment: a second move/split of the same fragment is refused.
CREATE UNIQUE INDEX jobs_one_per_fragment ON buildsmart.jobs (((args ->> 'fragment_id')::int))
    WHERE state IN ('scheduled', 'running') AND args ? 'fragment_id';
SELECT pg_catalog.pg_extension_config_dump('buildsmart.jobs', '');

CREATE TABLE buildsmart.fragment_stats (
    fragment_id integer PRIMARY KEY REFERENCES buildsmart.fragments ON DELETE CASCADE,
    size_bytes  bigint NOT NULL,
    row_count   bigint,
    observed_at timestamptz NOT NULL DEFAULT now()
);
