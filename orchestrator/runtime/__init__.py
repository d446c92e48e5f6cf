"""Runtimes: how the servers of a node group come to exist and run."""
