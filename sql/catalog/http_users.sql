-- Users of the HTTP front door (`buildsmart serve`: the Haystack API, the dashboard, /metrics and
-- HTTP ingest), managed with `buildsmart users add|remove|list` (orchestrator/serve/users.py).
-- Only SCRAM-SHA-256 verifiers are stored (salt, iterations, StoredKey, ServerKey), never a
-- password: the server checks a client's proof without being able to log in as the user.
CREATE TABLE buildsmart.http_users (
    name       text PRIMARY KEY CHECK (name <> '' AND name !~ '[,=[:cntrl:]]'),
    salt       bytea NOT NULL,
    iterations integer NOT NULL CHECK (iterations >= 4096),
    stored_key bytea NOT NULL,
    server_key bytea NOT NULL,
    rights     text NOT NULL CHECK (rights IN ('read', 'write', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('buildsmart.http_users', '');
