-- Make sure every time partition of parent covering [lo, hi] exists. Rows that already sit in
-- the DEFAULT partition for a new range are moved into it, so no row ever fails for lack of a
-- partition and none is left behind. Returns the number of partitions created.
-- Serialised per parent with an advisory lock so concurrent loaders do not race on DDL.
CREATE FUNCTION buildsmart.ensure_time_partitions(parent regclass, part_interval interval, lo timestamptz, hi timestamptz)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    nsp text;
    rel text;
    dflt text;
    s timestamptz;
    e timestamptz;
    part text;
    created int := 0;
BEGIN
    IF lo IS NULL OR hi IS NULL THEN
        RETURN 0;
    END IF;
    SELECT n.nspname, c.relname INTO nsp, rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = parent;
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
            EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', nsp, part, nsp, rel);
            IF EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                        WHERE c.relname = dflt AND c.relnamespace = nsp::regnamespace) THEN
                EXECUTE format('WITH moved AS (DELETE FROM %I.%I WHERE ts >= $1 AND ts < $2 RETURNING *) '
                               'INSERT INTO %I.%I SELECT * FROM moved', nsp, dflt, nsp, part) USING s, e;
            END IF;
            EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                           nsp, rel, nsp, part, s, e);
            created := created + 1;
        END IF;
        s := e;
    END LOOP;
    RETURN created;
END;
$$;
