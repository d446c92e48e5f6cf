-- Node groups of the cluster. A node is a replication group: hosts/ports list every member.
CREATE TABLE buildsmart.nodes (
    name        text PRIMARY KEY,
    role        text NOT NULL CHECK (role IN ('coordinator', 'worker')),
    hosts       text NOT NULL,
    ports       text NOT NULL,
    dbname      text NOT NULL,
    server_name text UNIQUE,            -- the postgres_fdw server on the coordinator (workers only)
    is_active   boolean NOT NULL DEFAULT true,
    added_at    timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.nodes', '');
