"""``python -m orchestrator`` runs the buildsmart CLI."""

from orchestrator.cli import main

main()
