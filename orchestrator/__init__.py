"""BuildSmartDB orchestrator: builds, runs and operates a building/time-fragmented PostgreSQL cluster."""

__version__ = "0.1.0"
EXTENSION_NAME = "buildsmart"
EXTENSION_VERSION = "0.2"
