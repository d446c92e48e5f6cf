"""The front door: ``buildsmart serve`` — the Project Haystack HTTP API, the web dashboard,
Prometheus ``/metrics`` and HTTP ingest, in one ASGI process (Starlette under uvicorn) that talks to
the cluster like any client (orchestrator/serve/app.py). Haystack encodings, filters, ranges and
SCRAM are pure modules here, unit-tested without servers."""
