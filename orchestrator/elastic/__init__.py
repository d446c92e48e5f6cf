"""Elasticity: node add/remove/drain, online fragment moves and splits, rebalance, jobs, time-partition maintenance."""
