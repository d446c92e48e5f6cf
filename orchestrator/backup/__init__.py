"""Backups and point-in-time recovery of the whole cluster (issue 16).

- ``archive``: the archive_command every local member runs (WAL into the repository), gap-free
  across failovers because every member archives (``archive_mode = always``).
- ``repo``: the backup repository on disk and the cluster's backup settings.
- ``barman``: Barman (base backups, WAL catalogue, recovery) driven as the service user.
- ``points``: cluster-consistent restore points (a short distributed write pause).
- ``decide``: pure decisions (which point for ``--to TIME``, which backups retention drops, status).
- ``restore``: a complete new local cluster from the repository; ``verify`` restores and compares.
"""
