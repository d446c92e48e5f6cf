"""Runtimes: how the servers of a node group come to exist and run (the seam: runtime/base.py)."""

from orchestrator.runtime.base import Runtime, for_cluster, for_kind, kind_of

__all__ = ["Runtime", "for_cluster", "for_kind", "kind_of"]
