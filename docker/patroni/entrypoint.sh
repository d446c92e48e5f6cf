#!/bin/sh
# Entrypoint of a Patroni-managed PostgreSQL member (docker compose profile `ha`):
# render the Patroni config from the environment, then run Patroni in the foreground as postgres.
set -eu
mkdir -p "$(dirname "${BUILDSMART_DATA_DIR:-/var/lib/postgresql/patroni/data}")"
/opt/patroni/bin/python /opt/buildsmart/render.py /opt/buildsmart/member.yml.tmpl /tmp/patroni.yml
exec /opt/patroni/bin/patroni /tmp/patroni.yml
