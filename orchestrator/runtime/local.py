"""The embedded local runtime: PostgreSQL servers started by the orchestrator on 127.0.0.1.

Servers run as the unprivileged service user, listen on TCP only (no Unix socket, so deep
temporary paths never hit the socket path limit), authenticate with SCRAM, and are stopped by
signalling their postmaster once its identity is verified (runtime/identity.py), never by name.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator import pgbin
from orchestrator.backup import archive
from orchestrator.exceptions import NodeError
from orchestrator.osuser import ServiceUser, run_as
from orchestrator.runtime import identity, tls
from orchestrator.topology import Credentials, Member

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60

# Why each setting: logical WAL for online fragment moves; prepared transactions for atomic
# multi-worker ingest; replication slots/senders for replicas; partitionwise aggregation so
# per-fragment GROUP BY is pushed to workers.
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "password_encryption": "'scram-sha-256'",
    "max_connections": "200",
    "shared_buffers": "'128MB'",
    "wal_level": "'logical'",
    "max_wal_senders": "16",
    "max_replication_slots": "16",
    "max_prepared_transactions": "100",
    "max_wal_size": "'2GB'",
    "checkpoint_timeout": "'15min'",
    "enable_partitionwise_aggregate": "on",
    "enable_partitionwise_join": "on",
    "log_line_prefix": "'%m [%p] %q%u@%d/%a '",
    "log_min_messages": "warning",
    "timezone": "'UTC'",
    "lc_messages": "'C'",
}

# Added to SERVER_SETTINGS for members on several hosts. A replica whose host is cut off stays in
# pg_stat_replication until its walsender times out, and while it is there Patroni keeps it as the
# synchronous standby: the primary's commits wait that long (60 s by default). 10 s, half Patroni's
# lease: a live standby answers the walsender's keepalive request (sent after 5 s of silence) at once.
# Server-side keepalives: a worker session whose client host was lost (the coordinator's FDW
# session of a cut coordinator host) would otherwise sit idle in its transaction for the kernel's
# two hours, holding the row locks of the batch it wrote, and the new coordinator's retry of that
# batch waits on them. Ended after about 11 s of unanswered probes; a live peer's kernel answers.
# Keepalives only probe a connection with nothing unacknowledged: if the cut falls between the
# worker's answer and its ACK, the kernel retransmits that answer for about 15 minutes instead (seen
# in CI: the retry waited on the orphan's locks past the test's 60 s). tcp_user_timeout ends that
# too; with it set, Linux also ends a keepalive-probed connection once this long has passed without
# an answer, so it replaces the count (probes at 5, 7, 9, 11 s: closed at about 13 s). The cost: a
# client that leaves a streamed result unread for 12 s (its receive window shut) is disconnected.
HOSTS_SETTINGS: dict[str, str] = {
    "wal_sender_timeout": "'10s'",
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "12000",
}

LOOPBACK = ("127.0.0.1/32",)


def tls_settings(material: tls.Material | None) -> dict[str, str]:
    """Server TLS: our certificate, and the cluster CA to verify any client certificate presented
    (one signed by another CA is refused during the handshake)."""
    if material is None:
        return {}
    return {
        "ssl": "on",
        "ssl_cert_file": f"'{material.own.cert}'",
        "ssl_key_file": f"'{material.own.key}'",
        "ssl_ca_file": f"'{material.ca}'",
        "ssl_min_protocol_version": "'TLSv1.2'",
    }


def hba_rules(networks: Sequence[str] = LOOPBACK, use_tls: bool = False) -> list[str]:
    """pg_hba.conf, the one place it is written (plain servers, Patroni members, hosts, compose):
    SCRAM for every user; with TLS only ``hostssl`` lines, so a connection without TLS finds no
    entry and is refused (clients, FDW, replicas, subscriptions alike)."""
    kind = "hostssl" if use_tls else "host"
    rules = ["local all all scram-sha-256"]
    rules += [f"{kind} all all {net} scram-sha-256" for net in networks]
    rules += [f"{kind} replication all {net} scram-sha-256" for net in networks]
    return rules


@dataclass(frozen=True)
class LocalMember:
    """A member of a group whose files live under the cluster directory."""

    member: Member
    data_dir: Path
    log_file: Path

    @property
    def name(self) -> str:
        return self.member.name


def postmaster(lm: LocalMember) -> identity.Verified | None:
    """The member's running postmaster, verified (runtime/identity.py), or None."""
    return identity.postmaster(lm.data_dir, [pgbin.tool("postgres")], f"postmaster of {lm.name}")


def pid_of(data_dir: Path) -> int | None:
    """PID of the running, verified postmaster of ``data_dir``, or None (a pid file naming a dead
    or unrelated process is ignored)."""
    v = identity.postmaster(data_dir, [pgbin.tool("postgres")], f"postmaster of {data_dir}")
    return v.pid if v is not None else None


def is_initialized(lm: LocalMember) -> bool:
    return (lm.data_dir / "PG_VERSION").exists()


def initdb(lm: LocalMember, user: ServiceUser, creds: Credentials, material: tls.Material | None = None) -> None:
    """Create the data directory with the superuser and SCRAM auth; writes our settings."""
    lm.data_dir.mkdir(parents=True, exist_ok=True)
    lm.log_file.parent.mkdir(parents=True, exist_ok=True)
    user.chown(lm.data_dir)
    os.chmod(lm.data_dir, 0o700)
    user.chown(lm.log_file.parent)
    with tempfile.NamedTemporaryFile("w", delete=False, dir=lm.data_dir.parent, prefix=".pw") as pwfile:
        pwfile.write(creds.superuser_password + "\n")
    try:
        os.chmod(pwfile.name, 0o600)
        if not user.is_current:
            os.chown(pwfile.name, user.uid, user.gid)
        run_as(
            user,
            [
                pgbin.tool("initdb"),
                "-D",
                str(lm.data_dir),
                "-U",
                creds.superuser,
                f"--pwfile={pwfile.name}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--data-checksums",
            ],
        )
    finally:
        os.unlink(pwfile.name)
    _write_config(lm, user, material)
    log.info("initialised %s in %s (port %d)", lm.name, lm.data_dir, lm.member.port)


def _write_config(lm: LocalMember, user: ServiceUser, material: tls.Material | None) -> None:
    settings = dict(SERVER_SETTINGS, **archive.ARCHIVE_SETTINGS, **tls_settings(material), port=str(lm.member.port))
    archive.write_script(lm.data_dir.parent, user.uid, user.gid)
    conf = "\n".join(f"{k} = {v}" for k, v in sorted(settings.items()))
    (lm.data_dir / "postgresql.buildsmart.conf").write_text("# written by buildsmart\n" + conf + "\n")
    with (lm.data_dir / "postgresql.conf").open("a") as fh:
        fh.write("\ninclude 'postgresql.buildsmart.conf'\n")
    rules = hba_rules(use_tls=material is not None)
    (lm.data_dir / "pg_hba.conf").write_text("# written by buildsmart (runtime/local.py hba_rules)\n" + "\n".join(rules) + "\n")
    user.chown(lm.data_dir)


def set_port(lm: LocalMember, user: ServiceUser) -> None:
    """Rewrite the port (used when a recorded port has been taken by someone else)."""
    conf = lm.data_dir / "postgresql.buildsmart.conf"
    lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith("port =")]
    lines.append(f"port = {lm.member.port}")
    conf.write_text("\n".join(lines) + "\n")
    user.chown(conf)


def start(lm: LocalMember, user: ServiceUser) -> bool:
    """Start the server if it is not running. Returns True when it was started now."""
    if pid_of(lm.data_dir) is not None:
        return False
    if not is_initialized(lm):
        raise NodeError(f"{lm.name}: no data directory at {lm.data_dir}")
    try:
        run_as(
            user,
            [pgbin.tool("pg_ctl"), "-D", str(lm.data_dir), "-l", str(lm.log_file), "-w", "-t", str(START_TIMEOUT_S), "start"],
        )
    except NodeError as exc:
        raise NodeError(f"{lm.name} did not start on port {lm.member.port}: {exc}; see {lm.log_file}") from exc
    log.info("started %s on %s:%d (pid %s)", lm.name, lm.member.host, lm.member.port, pid_of(lm.data_dir))
    return True


# pg_ctl's shutdown modes as the postmaster's signals
SHUTDOWN_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def stop(lm: LocalMember, user: ServiceUser, mode: str = "fast", timeout_s: float = 120.0) -> bool:
    """Stop the server: signal its verified postmaster the way ``pg_ctl stop -m MODE`` does (pg_ctl
    would signal whatever PID postmaster.pid names). True when it was running."""
    v = postmaster(lm)
    if v is None:
        return False
    identity.stop(v, timeout_s, SHUTDOWN_SIGNALS[mode])
    log.info("stopped %s (%s)", lm.name, mode)
    return True


def wait_ready(lm: LocalMember, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = run_probe(lm)
        if result:
            return
        time.sleep(0.1)
    raise NodeError(f"{lm.name} is not accepting connections on port {lm.member.port}")


def run_probe(lm: LocalMember) -> bool:
    import subprocess

    probe = subprocess.run(
        [pgbin.tool("pg_isready"), "-h", lm.member.host, "-p", str(lm.member.port), "-t", "2"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def remove(lm: LocalMember) -> None:
    shutil.rmtree(lm.data_dir, ignore_errors=True)
