-- Citus-compatible functions on the coordinator (Citus' names and argument order). They live in
-- pg_catalog, as Citus' do, so they resolve without a search_path. Long operations only queue a
-- job in buildsmart.jobs and return its id; `buildsmart jobs run` executes it and
-- citus_rebalance_status() shows progress. Nodes are named by host and port as in Citus (the
-- node's name is accepted as nodename too).

CREATE FUNCTION pg_catalog.citus_add_node(nodename text, nodeport integer, groupid integer DEFAULT -1,
                                          noderole text DEFAULT 'primary', nodecluster name DEFAULT 'default')
RETURNS bigint LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT buildsmart.submit_job('add_node', jsonb_build_object('host', nodename, 'port', nodeport)) $$;

CREATE FUNCTION pg_catalog.citus_remove_node(nodename text, nodeport integer)
RETURNS bigint LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT buildsmart.submit_job('remove_node', jsonb_build_object('host', nodename, 'port', nodeport)) $$;

CREATE FUNCTION pg_catalog.citus_drain_node(nodename text, nodeport integer, shard_transfer_mode text DEFAULT 'auto',
                                            rebalance_strategy name DEFAULT NULL)
RETURNS bigint LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT buildsmart.submit_job('drain_node', jsonb_build_object('host', nodename, 'port', nodeport)) $$;

CREATE FUNCTION pg_catalog.citus_rebalance_start(rebalance_strategy name DEFAULT NULL, drain_only boolean DEFAULT false,
                                                 shard_transfer_mode text DEFAULT 'auto')
RETURNS bigint LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT buildsmart.submit_job('rebalance', jsonb_build_object('tolerance', 0.1, 'drain_only', drain_only)) $$;

CREATE FUNCTION pg_catalog.citus_rebalance_status(raw boolean DEFAULT false)
RETURNS TABLE (job_id bigint, state text, job_type text, description text, started_at timestamptz,
               finished_at timestamptz, details jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT j.job_id, j.state, j.kind, j.kind || ' ' || j.args::text, j.started_at, j.finished_at,
           j.detail || jsonb_build_object('step', j.step, 'error', j.error,
               'tasks', (SELECT coalesce(jsonb_agg(jsonb_build_object('job_id', c.job_id, 'kind', c.kind, 'state', c.state,
                                                                       'step', c.step, 'args', c.args) ORDER BY c.job_id), '[]')
                           FROM buildsmart.jobs c WHERE c.parent_id = j.job_id))
      FROM buildsmart.jobs j
     WHERE j.parent_id IS NULL
     ORDER BY j.job_id DESC
$$;

-- shard_id is the fragment id; ports identify nodes by their first member.
CREATE FUNCTION pg_catalog.citus_move_shard_placement(shard_id bigint, source_node_name text, source_node_port integer,
                                                      target_node_name text, target_node_port integer,
                                                      shard_transfer_mode text DEFAULT 'auto')
RETURNS bigint LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT buildsmart.submit_job('citus_move', jsonb_build_object('shard_id', shard_id,
        'source_host', source_node_name, 'source_port', source_node_port,
        'target_host', target_node_name, 'target_port', target_node_port)) $$;

-- Time partitions live on the workers; this queues their creation for every fragment up to end_at.
CREATE FUNCTION pg_catalog.create_time_partitions(table_name regclass, partition_interval interval, end_at timestamptz,
                                                  start_from timestamptz DEFAULT now())
RETURNS boolean LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    job bigint;
BEGIN
    IF table_name <> 'public.readings'::regclass THEN
        RAISE EXCEPTION '% is not a distributed table', table_name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    job := buildsmart.submit_job('create_time_partitions', jsonb_build_object(
        'ahead', greatest(1, ceil(extract(epoch FROM end_at - now()) / extract(epoch FROM partition_interval)))::int));
    RAISE NOTICE 'queued job %', job;
    RETURN true;
END;
$$;

CREATE PROCEDURE pg_catalog.drop_old_time_partitions(table_name regclass, older_than timestamptz)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    job bigint;
BEGIN
    IF table_name <> 'public.readings'::regclass THEN
        RAISE EXCEPTION '% is not a distributed table', table_name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    job := buildsmart.submit_job('drop_old_time_partitions',
                                 jsonb_build_object('older_than', (now() - older_than)::text));
    RAISE NOTICE 'queued job %', job;
END;
$$;

-- Views cannot live in pg_catalog; public is on every default search_path.
CREATE VIEW public.citus_shards AS
SELECT f.logicalrelid::regclass AS table_name, f.fragment_id::bigint AS shardid,
       'bsdata.' || f.shard_name AS shard_name, 'distributed'::text AS citus_table_type, 0 AS colocation_id,
       split_part(n.hosts, ',', 1) AS nodename, split_part(n.ports, ',', 1)::integer AS nodeport,
       s.size_bytes AS shard_size, f.range_from, f.range_to, p.node_name
  FROM buildsmart.fragments f
  JOIN buildsmart.placements p ON p.fragment_id = f.fragment_id AND p.state = 'active'
  JOIN buildsmart.nodes n ON n.name = p.node_name
  LEFT JOIN buildsmart.fragment_stats s ON s.fragment_id = f.fragment_id;

CREATE VIEW public.citus_tables AS
SELECT f.logicalrelid::regclass AS table_name, 'distributed'::text AS citus_table_type,
       'building'::text AS distribution_column, 0 AS colocation_id,
       pg_catalog.pg_size_pretty(sum(s.size_bytes)) AS table_size, count(*) AS shard_count,
       pg_catalog.pg_get_userbyid(c.relowner) AS table_owner, 'heap'::name AS access_method
  FROM buildsmart.fragments f
  JOIN pg_catalog.pg_class c ON c.oid = f.logicalrelid
  LEFT JOIN buildsmart.fragment_stats s ON s.fragment_id = f.fragment_id
 GROUP BY f.logicalrelid, c.relowner;
