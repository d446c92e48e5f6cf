-- The fragment whose building range holds a building (coordinator catalog lookup).
CREATE FUNCTION buildsmart.fragment_for_building(rel regclass, building text)
RETURNS integer
LANGUAGE sql STABLE STRICT
SET search_path = pg_catalog, pg_temp
RETURN (SELECT f.fragment_id FROM buildsmart.fragments f
         WHERE f.logicalrelid = rel
           AND (f.range_from IS NULL OR building COLLATE "C" >= f.range_from)
           AND (f.range_to IS NULL OR building COLLATE "C" < f.range_to));
