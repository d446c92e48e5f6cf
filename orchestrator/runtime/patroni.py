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
import signal
import sys
import urllib.error
import urllib.request
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import filelock, pgbin
from orchestrator.backup import archive
from orchestrator.exceptions import ClusterStateError, NodeError
from orchestrator.osuser import ServiceUser
from orchestrator.runtime import identity, memberconf, procs, tls
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.local import HOSTS_SETTINGS, SERVER_SETTINGS, LocalMember, hba_rules, tls_settings
from orchestrator.runtime.local import postmaster as local_postmaster
from orchestrator.topology import Credentials, Group, Topology

log = logging.getLogger(__name__)

TEMPLATE = memberconf.TEMPLATE
HTTP_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 60.0

# Settings Patroni sets itself (from listen) or that must not differ between members are kept out
# of the local section; the rest go to the DCS so every member of a group runs with the same values.
_LOCAL_ONLY = {"listen_addresses", "port"}


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

    def patroni(self) -> identity.Verified | None:
        """Our Patroni of this member, verified: Patroni's interpreter, ``-m patroni`` and this
        member's exact config path as arguments, and the start time recorded with the PID."""
        return procs.running(
            self.pid_file, patroni_python(), [("-m", "patroni"), (str(self.config_file),)], f"Patroni of {self.name}"
        )

    def postmaster(self) -> identity.Verified | None:
        return local_postmaster(self.local)

    def patroni_pid(self) -> int | None:
        v = self.patroni()
        return v.pid if v else None

    def postmaster_pid(self) -> int | None:
        v = self.postmaster()
        return v.pid if v else None


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


def dcs_parameters(hosts: bool = False) -> dict[str, str]:
    """Server settings every member of a group shares (Patroni keeps them in the DCS); ``hosts``:
    with the settings of members on several hosts (runtime/local.py HOSTS_SETTINGS)."""
    settings = {**SERVER_SETTINGS, **(HOSTS_SETTINGS if hosts else {})}
    return {k: memberconf.pg_value(v) for k, v in settings.items() if k not in _LOCAL_ONLY}


def render_config(topo: Topology, pm: PatroniMember, creds: Credentials, ha: HaSettings) -> str:
    """The config of a local member: 127.0.0.1, ports from ha.json, the local CA when TLS is on."""
    member = pm.local.member
    material = tls.local_material(Path(creds.ca_file).parent) if creds.ca_file else None
    files = memberconf.TlsFiles(str(material.ca), str(material.own.cert), str(material.own.key)) if material else None
    rest = f"127.0.0.1:{ha.restapi_ports[pm.name]}"
    conf = memberconf.MemberConf(
        scope=scope(pm.group),
        namespace=namespace(topo),
        name=pm.name,
        restapi_listen=rest,
        restapi_address=rest,
        restapi_user=ha.restapi_user,
        restapi_password=ha.restapi_password,
        etcd_hosts=(f"127.0.0.1:{ha.etcd_client_port}",),
        synchronous=ha.synchronous,
        pg_listen=f"{member.host}:{member.port}",
        pg_address=f"{member.host}:{member.port}",
        data_dir=str(pm.local.data_dir),
        bin_dir=str(pgbin.bin_dir()),
        pgpass=str(pm.base / "pgpass"),
        superuser=creds.superuser,
        superuser_password=creds.superuser_password,
        dcs_parameters=dcs_parameters(),
        # archiving is local (rendered on every `up`), so clusters made before it get it on restart
        local_parameters={
            "unix_socket_directories": "",
            **{k: memberconf.pg_value(v) for k, v in {**archive.ARCHIVE_SETTINGS, **tls_settings(material)}.items()},
        },
        hba=tuple(hba_rules(use_tls=material is not None)),
        tls=files,
    )
    return memberconf.render(conf)


def write_config(topo: Topology, pm: PatroniMember, creds: Credentials, ha: HaSettings, user: ServiceUser) -> None:
    pm.base.mkdir(parents=True, exist_ok=True)
    fd = os.open(pm.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(render_config(topo, pm, creds, ha))
    archive.write_script(pm.base, user.uid, user.gid)
    if not user.is_current:
        os.chown(pm.config_file, user.uid, user.gid)
        os.chown(pm.base, user.uid, user.gid)


def _start_lock(pm: PatroniMember) -> AbstractContextManager[None]:
    """One starter of a member's Patroni at a time, across processes. The supervisor restarts a
    dead Patroni within a tick, and a command (or a test) may start the same member meanwhile: two
    check-then-spawn starters would each see none running and start one, and two Patronis then
    fight over one data directory (seen in CI: the replica's postgres restarted over and over, and
    the one whose PID the pid file lost outlived `down`)."""
    return filelock.exclusive(pm.pid_file.with_name(pm.pid_file.name + ".lock"))


def start(pm: PatroniMember, user: ServiceUser) -> bool:
    """Start Patroni for the member unless it runs. True when started now (it then starts postgres)."""
    with _start_lock(pm):
        if pm.patroni() is not None:
            return False
        env = dict(os.environ, PATH=f"{pgbin.bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        pid = procs.spawn(
            procs.python_module("patroni", str(pm.config_file), python=patroni_python()), pm.pid_file, pm.log_file, user, env
        )
    log.info("started Patroni for %s (pid %d, config %s)", pm.name, pid, pm.config_file)
    return True


def stop(pm: PatroniMember, user: ServiceUser) -> bool:
    """Stop Patroni (verified) (it shuts postgres down fast), then make sure its postmaster is gone too."""
    stopped = procs.stop(pm.patroni(), STOP_TIMEOUT_S)
    if pm.postmaster() is not None:
        # Patroni died before stopping postgres (or was killed): stop the orphaned postmaster.
        fence(pm, user)
        stopped = True
    return stopped


def fence(pm: PatroniMember, user: ServiceUser) -> bool:
    """Stop the member's postmaster at once (immediate shutdown: SIGQUIT), once verified; SIGKILL
    only the same verified process if it ignores that. True when a postmaster was stopped."""
    v = pm.postmaster()
    if v is None:
        return False
    identity.stop(v, 5.0, signal.SIGQUIT)
    log.info("fenced %s: postmaster %d stopped immediately", pm.name, v.pid)
    return True


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
        with urllib.request.urlopen(req, timeout=timeout, context=ha.ssl_context()) as resp:
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
