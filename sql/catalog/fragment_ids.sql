-- Ids of new fragments (splits, the first load's layout): a sequence, so two splits running at
-- once never take the same id, as max(fragment_id) + 1 did. Ids set without it (the initial
-- layout, clusters of 0.1) are caught up by the orchestrator (catalog.next_fragment_id).
CREATE SEQUENCE buildsmart.fragment_id_seq AS integer;
SELECT pg_catalog.setval('buildsmart.fragment_id_seq',
       greatest((SELECT pg_catalog.max(fragment_id) FROM buildsmart.fragments), 1));
