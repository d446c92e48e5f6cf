"""Energy analytics (issue 14): buildings and meters as metadata, units, cumulative registers,
rollups maintained on the workers next to the data, gaps and fill.

- :mod:`.units` and :mod:`.model`: pure rules (conversions, metadata validation, the register
  rule's reference);
- :mod:`.schema`: the coordinator DDL (sql/app/energy.sql) and its grants;
- :mod:`.reference`: copies of buildings/meters/replacements on every worker, kept in sync;
- :mod:`.rollups`: per-fragment rollup tables, their foreign partitions, refresh and rebuild;
- :mod:`.gaps`: missing intervals per meter; :mod:`.imports`: CSV and Haystack metadata;
- :mod:`.task`: the task runner's ``rollups`` task.
"""
