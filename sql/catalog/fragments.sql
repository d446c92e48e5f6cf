-- Fragments of a distributed table: a building range [range_from, range_to) in C collation
-- (NULL = unbounded), each time-partitioned by time_interval on the node that holds it.
CREATE TABLE buildsmart.fragments (
    fragment_id   integer PRIMARY KEY,
    logicalrelid  regclass NOT NULL,
    shard_name    text NOT NULL UNIQUE,    -- bsdata.<shard_name> on coordinator (foreign) and worker (real)
    range_from    text COLLATE "C",
    range_to      text COLLATE "C",
    time_interval interval NOT NULL DEFAULT '1 month',
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (range_from IS NULL OR range_to IS NULL OR range_from < range_to)
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.fragments', '');

-- Where each fragment lives. One active placement per fragment.
CREATE TABLE buildsmart.placements (
    fragment_id integer NOT NULL REFERENCES buildsmart.fragments ON DELETE CASCADE,
    node_name   text NOT NULL REFERENCES buildsmart.nodes ON UPDATE CASCADE,
    state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'moving', 'to_drop')),
    PRIMARY KEY (fragment_id, node_name)
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.placements', '');
