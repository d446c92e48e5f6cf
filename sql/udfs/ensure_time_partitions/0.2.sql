-- Make sure every time partition of parent covering [lo, hi] exists. Rows that already sit in
-- the DEFAULT partition for a new range are moved into it (deleted, and inserted again once it is
-- attached), so no row ever fails for lack of a partition and none is left behind. Returns the
-- number of partitions created. 0.2: writers wait while a partition is attached; rows moved out of
-- DEFAULT are re-inserted through the new partition (logical replication of a move sees them), and
-- readers wait while they move.
-- Serialised per parent with an advisory lock so concurrent loaders do not race on DDL.
-- SECURITY DEFINER (owned by the superuser that installs the extension): the ingest role makes
-- the time partitions its rows need without owning the fragment, and only for fragment tables
-- (partitioned tables in bsdata); EXECUTE is granted to that role alone (orchestrator/roles.py).
CREATE OR REPLACE FUNCTION buildsmart.ensure_time_partitions(parent regclass, part_interval interval, lo timestamptz, hi timestamptz)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    nsp text;
    rel text;
    dflt text;
    s timestamptz;
    e timestamptz;
    part text;
    created int := 0;
    has_default boolean;
BEGIN
    IF lo IS NULL OR hi IS NULL THEN
        RETURN 0;
    END IF;
    SELECT n.nspname, c.relname INTO nsp, rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = parent AND c.relkind = 'p';
    IF nsp IS DISTINCT FROM 'bsdata' THEN
        RAISE EXCEPTION '% is not a fragment table', parent USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(parent::oid::bigint);
    dflt := rel || '_default';
    s := buildsmart.partition_start(part_interval, lo);
    WHILE s <= hi LOOP
        e := s + part_interval;
        -- readings_f1_p20230101, or readings_f1_p20230101_1200 for partitions starting within a day
        part := rel || '_p' || to_char(pg_catalog.timezone('UTC', s), 'YYYYMMDD')
                || CASE WHEN pg_catalog.timezone('UTC', s)::time <> '00:00' THEN to_char(pg_catalog.timezone('UTC', s), '"_"HH24MI') ELSE '' END;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                        WHERE c.relname = part AND c.relnamespace = nsp::regnamespace) THEN
            -- Writers wait until the partition is attached: a row routed to DEFAULT while its rows
            -- move out (a logical replication apply worker, a second loader stream) made the
            -- ATTACH fail or deadlock.
            EXECUTE format('LOCK TABLE %I.%I IN SHARE ROW EXCLUSIVE MODE', nsp, rel);
            has_default := EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                    WHERE c.relname = dflt AND c.relnamespace = nsp::regnamespace);
            IF has_default THEN
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.%I WHERE ts >= %L AND ts < %L)', nsp, dflt, s, e)
                   INTO has_default;
            END IF;
            IF has_default THEN
                -- Readers too wait while rows move out of DEFAULT: a query planned with the
                -- partitions as they were (ATTACH lets it) but run after the commit would find
                -- them in neither place.
                EXECUTE format('LOCK TABLE %I.%I IN ACCESS EXCLUSIVE MODE', nsp, rel);
            END IF;
            EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', nsp, part, nsp, rel);
            IF has_default THEN
                -- Rows leave DEFAULT and come back through the attached partition, so logical
                -- replication (an online move in progress) sees both: rows written into the table
                -- before it is a partition are not published, and were lost on the move's target.
                EXECUTE format('CREATE TEMP TABLE bs_moved_rows ON COMMIT DROP AS '
                               'WITH moved AS (DELETE FROM %I.%I WHERE ts >= %L AND ts < %L RETURNING *) SELECT * FROM moved',
                               nsp, dflt, s, e);
            END IF;
            EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                           nsp, rel, nsp, part, s, e);
            IF has_default THEN
                EXECUTE format('INSERT INTO %I.%I SELECT * FROM pg_temp.bs_moved_rows', nsp, part);
                DROP TABLE pg_temp.bs_moved_rows;
            END IF;
            created := created + 1;
        END IF;
        s := e;
    END LOOP;
    RETURN created;
END;
$$;
REVOKE ALL ON FUNCTION buildsmart.ensure_time_partitions(regclass, interval, timestamptz, timestamptz) FROM PUBLIC;
