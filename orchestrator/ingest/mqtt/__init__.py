"""MQTT ingest: ``buildsmart ingest --mqtt URL --topic FILTER``, one more client of the ingest API.

Why a package of small modules: the decisions (which topic level is the building, what a payload
holds, when to cut a batch, which messages may be acknowledged) are pure and unit-tested without a
broker (:mod:`.payload`, :mod:`.flow`, :mod:`.options`); the paho client (:mod:`.client`) only
moves packets; :mod:`.loader` ties them to :class:`orchestrator.ingest.api.IngestSession`.

The guarantee: a message is acknowledged (PUBACK) only after every reading in it is committed on
its worker, or its reason for rejection is on disk; so whatever the broker holds unacknowledged in
the loader's persistent session is delivered again after a crash, and the natural key
``(building, meter, ts)`` makes that re-delivery harmless.
"""
