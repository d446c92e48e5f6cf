"""Patroni members of the local runtime: config rendering, start/stop by PID, REST API calls.

Each member lives in DIR/nodes/<member>/: ``data`` (PGDATA, made by Patroni's bootstrap or
pg_basebackup), ``patroni.yml`` (0600, rendered from patroni/member.yml.tmpl), ``patroni.log``,
``patroni.pid``. Patroni runs as the unprivileged service user with the orchestrator's interpreter (or
BUILDSMART_PATRONI_PYTHON), an interpreter that user can read.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import string
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import pgbin, resources
from orchestrator.backup import archive
from orchestrator.exceptions import ClusterStateError, ConfigError, NodeError
from orchestrator.osuser import ServiceUser, run_as
from orchestrator.runtime import procs
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.local import SERVER_SETTINGS, LocalMember, pid_of
from orchestrator.topology import Credentials, Group, Topology

log = logging.getLogger(__name__)

TEMPLATE = resources.path("patroni") / "member.yml.tmpl"
HTTP_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 60.0
PATRONI_MARKER = "patroni.yml"  # every Patroni command line we start names its config file

# Settings Patroni sets itself (from listen) or that must not differ between members are kept out
# of the local section; the rest go to the DCS so every member of a group runs with the same values.
_LOCAL_ONLY = {"listen_addresses", "port"}
PG_HBA = [
    "local all all scram-sha-256",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host replication all 127.0.0.1/32 scram-sha-256",
]


@dataclass(frozen=True)
class PatroniMember:
    group: Group
    local: LocalMember

    @property
    def name(self) -> str:
        return self.local.name

    @property
    def base(self) -> Path:
        return self.local.data_dir.parent

    @property
    def config_file(self) -> Path:
        return self.base / "patroni.yml"

    @property
    def pid_file(self) -> Path:
        return self.base / "patroni.pid"

    @property
    def log_file(self) -> Path:
        return self.base / "patroni.log"

    def patroni_pid(self) -> int | None:
        pid = procs.read_pid(self.pid_file)
        return pid if procs.alive(pid, PATRONI_MARKER) else None

    def postmaster_pid(self) -> int | None:
        pid = pid_of(self.local.data_dir)
        return pid if procs.alive(pid) else None


def scope(group: Group) -> str:
    return group.name


def namespace(topo: Topology) -> str:
    return f"/{topo.cluster_name}/"


def leader_key(topo: Topology, group: Group) -> str:
    return f"{namespace(topo)}{scope(group)}/leader"


def patroni_python() -> str:
    """The interpreter that runs Patroni as the service user: $BUILDSMART_PATRONI_PYTHON, else our
    own (scripts/setup.sh makes the venv from /usr/bin/python3 and readable by everyone)."""
    return os.environ.get("BUILDSMART_PATRONI_PYTHON") or sys.executable


def _pg_value(value: str) -> str:
    """postgresql.conf values are quoted in SERVER_SETTINGS; Patroni wants them bare."""
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value


def render_config(topo: Topology, pm: PatroniMember, creds: Credentials, ha: HaSettings) -> str:
    try:
        template = string.Template(TEMPLATE.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"Patroni template {TEMPLATE} is missing") from exc
    settings = {k: _pg_value(v) for k, v in SERVER_SETTINGS.items() if k not in _LOCAL_ONLY}
    member = pm.local.member
    values: dict[str, Any] = {
        "scope": scope(pm.group),
        "namespace": namespace(topo),
        "name": pm.name,
        "restapi_listen": f"127.0.0.1:{ha.restapi_ports[pm.name]}",
        "restapi_address": f"127.0.0.1:{ha.restapi_ports[pm.name]}",
        "restapi_user": ha.restapi_user,
        "restapi_password": ha.restapi_password,
        "etcd_hosts": [f"127.0.0.1:{ha.etcd_client_port}"],
        "synchronous_mode": ha.synchronous in ("on", "strict"),
        "synchronous_mode_strict": ha.synchronous == "strict",
        "dcs_parameters": settings,
        "pg_listen": f"{member.host}:{member.port}",
        "pg_address": f"{member.host}:{member.port}",
        "data_dir": str(pm.local.data_dir),
        "bin_dir": str(pgbin.bin_dir()),
        "pgpass": str(pm.base / "pgpass"),
        "superuser": creds.superuser,
        "superuser_password": creds.superuser_password,
        # archiving is local (rendered on every `up`), so clusters made before it get it on restart
        "local_parameters": {"unix_socket_directories": "", **{k: _pg_value(v) for k, v in archive.ARCHIVE_SETTINGS.items()}},
        "pg_hba": PG_HBA,
    }
    # JSON is valid YAML: every value is quoted and escaped correctly whatever it contains.
    return template.substitute({k: json.dumps(v) for k, v in values.items()})


def write_config(topo: Topology, pm: PatroniMember, creds: Credentials, ha: HaSettings, user: ServiceUser) -> None:
    pm.base.mkdir(parents=True, exist_ok=True)
    fd = os.open(pm.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(render_config(topo, pm, creds, ha))
    archive.write_script(pm.base, user.uid, user.gid)
    if not user.is_current:
        os.chown(pm.config_file, user.uid, user.gid)
        os.chown(pm.base, user.uid, user.gid)


def start(pm: PatroniMember, user: ServiceUser) -> bool:
    """Start Patroni for the member unless it runs. True when started now (it then starts postgres)."""
    if pm.patroni_pid() is not None:
        return False
    cmd = [patroni_python(), "-m", "patroni", str(pm.config_file)]
    extra: dict[str, Any] = {} if user.is_current else {"user": user.uid, "group": user.gid, "extra_groups": []}
    env = dict(os.environ, PATH=f"{pgbin.bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    with pm.log_file.open("ab") as logfh:
        # own session: a Ctrl-C of the CLI must not reach the servers it leaves running
        proc = subprocess.Popen(
            cmd, stdout=logfh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env, **extra
        )
    procs.write_pid(pm.pid_file, proc.pid)
    log.info("started Patroni for %s (pid %d, REST %s)", pm.name, proc.pid, pm.config_file)
    return True


def stop(pm: PatroniMember, user: ServiceUser) -> bool:
    """Stop Patroni by PID (it shuts postgres down fast), then make sure its postmaster is gone too."""
    stopped = False
    pid = pm.patroni_pid()
    if pid is not None:
        stopped = procs.stop_pid(pid, f"Patroni of {pm.name}", STOP_TIMEOUT_S)
    if pm.postmaster_pid() is not None:
        # Patroni died before stopping postgres (or was killed): stop the orphaned postmaster by its pid file.
        fence(pm, user)
        stopped = True
    return stopped


def fence(pm: PatroniMember, user: ServiceUser) -> None:
    """Stop the member's postmaster at once (pg_ctl signals the PID in postmaster.pid)."""
    pid = pm.postmaster_pid()
    if pid is None:
        return
    try:
        run_as(user, [pgbin.tool("pg_ctl"), "-D", str(pm.local.data_dir), "-m", "immediate", "-w", "-t", "10", "stop"])
    except NodeError as exc:
        log.warning("pg_ctl stop -m immediate of %s failed (%s); killing postmaster %d", pm.name, exc, pid)
        procs.stop_pid(pid, f"postmaster of {pm.name}", 5, sig=9)
    log.info("fenced %s: postmaster %d stopped immediately", pm.name, pid)


# ---------------------------------------------------------------- REST API


def _auth_header(ha: HaSettings) -> str:
    token = base64.b64encode(f"{ha.restapi_user}:{ha.restapi_password}".encode()).decode()
    return f"Basic {token}"


def rest(ha: HaSettings, member: str, path: str, body: dict[str, Any] | None = None, timeout: float = HTTP_TIMEOUT_S) -> Any:
    """GET (or POST ``body``) a member's REST API; returns parsed JSON or text. Raises NodeError."""
    url = ha.restapi_url(member) + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Authorization", _auth_header(ha))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace").strip()
        if body is not None:
            raise ClusterStateError(f"Patroni of {member} refused {path}: {text or exc.reason}") from exc
        raw = text  # GET /patroni answers 503 for a member that is not running but still has a body
    except OSError as exc:
        raise NodeError(f"Patroni REST API of {member} ({url}) did not answer: {exc}") from exc
    try:
        return json.loads(raw)
    except ValueError:
        return raw
