"""Ingest: read readings (CSV, JSON lines), validate each row, route it to its fragment's worker."""
