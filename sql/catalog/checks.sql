-- Outcomes of integrity checks (`buildsmart check` and its scheduled runs); status shows the last.
CREATE TABLE buildsmart.check_runs (
    run_id      bigserial PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    ok          boolean NOT NULL,
    summary     text NOT NULL,
    findings    jsonb NOT NULL DEFAULT '[]'::jsonb
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.check_runs', '');
