-- Queue a long operation for the orchestrator (`buildsmart jobs run`); returns the job id.
CREATE FUNCTION buildsmart.submit_job(kind text, args jsonb DEFAULT '{}'::jsonb)
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ INSERT INTO buildsmart.jobs (kind, args) VALUES (kind, args) RETURNING job_id $$;
