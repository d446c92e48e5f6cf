"""The background task runner: one daemon per cluster directory, elected once per cluster, that
runs the cluster's periodic work (the balancer, time-partition upkeep, and whatever later work
registers itself in :mod:`orchestrator.tasks.registry`)."""
