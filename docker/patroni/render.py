"""Render the Patroni config of one compose member from environment variables, using the same
template and the same renderer as the local runtime (patroni/member.yml.tmpl and
orchestrator/runtime/memberconf.py, copied into the image). Values are written as JSON, which is
valid YAML, so passwords and host lists are always quoted correctly.

Environment (set per service in docker-compose.yml):
  BUILDSMART_SCOPE            group name (coordinator, w1, ...): the Patroni scope
  BUILDSMART_MEMBER           member name, unique in the cluster [default: the hostname]
  BUILDSMART_NAMESPACE        etcd key prefix [default: /buildsmart/]
  BUILDSMART_ETCD_HOSTS       comma-separated etcd client endpoints, host:port
  BUILDSMART_SYNCHRONOUS      on (default) | strict | off
  BUILDSMART_SUPERUSER        [default: postgres]
  BUILDSMART_SUPERUSER_PASSWORD   required (also used for replication and pg_rewind)
  BUILDSMART_PATRONI_PASSWORD     required: Patroni REST API basic auth (user "buildsmart")
  BUILDSMART_HBA_NETWORK      who may connect [default: samenet = the container's own subnets]
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

# The one renderer of member configs (orchestrator/runtime/memberconf.py), shared with the local
# runtime; the image copies it (with orchestrator/exceptions.py) next to this script, which Python
# puts first on sys.path.
from orchestrator.runtime import memberconf
from orchestrator.runtime.memberconf import MemberConf

# The same server settings as the local runtime (orchestrator/runtime/local.py SERVER_SETTINGS,
# without listen/port/socket settings Patroni sets per member); tests/test_compose_ha.py checks they agree.
PARAMETERS = {
    "password_encryption": "scram-sha-256",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "wal_level": "logical",
    "max_wal_senders": "16",
    "max_replication_slots": "16",
    "max_prepared_transactions": "100",
    "max_wal_size": "2GB",
    "checkpoint_timeout": "15min",
    "enable_partitionwise_aggregate": "on",
    "enable_partitionwise_join": "on",
    "log_line_prefix": "%m [%p] %q%u@%d/%a ",
    "log_min_messages": "warning",
    "timezone": "UTC",
    "lc_messages": "C",
}
SYNC_MODES = ("on", "strict", "off")


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        sys.exit(f"render.py: environment variable {name} is required")
    return value


def conf(env_host: str | None = None) -> MemberConf:
    host = env_host or socket.gethostname()
    sync = _env("BUILDSMART_SYNCHRONOUS", "on")
    if sync not in SYNC_MODES:
        sys.exit(f"render.py: BUILDSMART_SYNCHRONOUS must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
    net = _env("BUILDSMART_HBA_NETWORK", "samenet")
    data_dir = _env("BUILDSMART_DATA_DIR", "/var/lib/postgresql/patroni/data")
    return MemberConf(
        scope=_env("BUILDSMART_SCOPE"),
        namespace=_env("BUILDSMART_NAMESPACE", "/buildsmart/"),
        name=_env("BUILDSMART_MEMBER", host),
        restapi_listen="0.0.0.0:8008",
        restapi_address=f"{host}:8008",
        restapi_user="buildsmart",
        restapi_password=_env("BUILDSMART_PATRONI_PASSWORD"),
        etcd_hosts=tuple(h.strip() for h in _env("BUILDSMART_ETCD_HOSTS").split(",") if h.strip()),
        synchronous=sync,
        pg_listen="0.0.0.0:5432",
        pg_address=f"{host}:5432",
        data_dir=data_dir,
        bin_dir=_env("BUILDSMART_PG_BIN", "/usr/lib/postgresql/18/bin"),
        pgpass=str(Path(data_dir).parent / "pgpass"),
        superuser=_env("BUILDSMART_SUPERUSER", "postgres"),
        superuser_password=_env("BUILDSMART_SUPERUSER_PASSWORD"),
        dcs_parameters=PARAMETERS,
        local_parameters={"unix_socket_directories": "/var/run/postgresql"},
        hba=(
            "local all all scram-sha-256",
            "host all all 127.0.0.1/32 scram-sha-256",
            f"host all all {net} scram-sha-256",
            f"host replication all {net} scram-sha-256",
        ),
    )


def render(template: Path, env_host: str | None = None) -> str:
    return memberconf.render(conf(env_host), template)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit("usage: render.py TEMPLATE OUTPUT")
    out = Path(argv[1])
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(render(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
