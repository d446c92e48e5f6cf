"""``buildsmart host plan``: write what each host of a multi-host cluster needs, from the plan
(runtime/hostplan.py), into one directory DIR.

Why one writer: the cluster CA and certificates (runtime/tls.py), etcd's command lines
(runtime/etcdcluster.py), the Patroni configs (runtime/memberconf.py), the agents' plans
(runtime/agent.py) and DIR/ha.json (runtime/hasettings.py) must agree on every path, port, user
and password; they are written here together, from one plan, by the user's command and by the
tests alike.

Idempotent: a re-run keeps the CA, every key and certificate (a certificate is reissued only when
its host's address changed) and every password (DIR/host-secrets.json, 0600); it makes only what
is missing (say, for a group added to the spec) and says so by name. No secret is logged or
printed. Layout of DIR (absolute paths in the plans: each host finds its files at the same path)::

    hosts.toml              the spec this plan was made from (``host init`` re-plans from it)
    host-secrets.json       etcd root and user passwords, REST password, etcd token (0600)
    credentials.json        the cluster's roles (topology.save_credentials, 0600)
    ha.json                 how the orchestrator reaches Patroni and etcd (hasettings)
    tls/                    cluster CA (ca.key stays here) and the orchestrator's client certificate
    ca.crt                  the cluster CA's certificate, which every host holds at this path
    host-NAME.json          the agent's plan of host NAME
    hosts/NAME/             everything host NAME runs: tls/ (its certificate), etcd/,
                            <member>/ (patroni.yml, data/), agent/ (client certificate, etcd password)

A host needs ``ca.crt``, ``host-NAME.json`` and ``hosts/NAME/`` (copy them to the same path
there); the orchestrator's machine keeps the whole of DIR.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from orchestrator import pgbin, topology
from orchestrator.exceptions import ConfigError
from orchestrator.osuser import ServiceUser, service_user
from orchestrator.runtime import agent, etcd, etcdcluster, hasettings, hostspec, memberconf, tls
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.hostplan import ORCHESTRATOR_ETCD_USER, ClusterPlan, HostView, MemberPlan, plan
from orchestrator.runtime.local import hba_rules, tls_settings
from orchestrator.runtime.patroni import dcs_parameters
from orchestrator.topology import Credentials

log = logging.getLogger(__name__)

Report = Callable[[str], None]

SPEC_FILE = "hosts.toml"
SECRETS_FILE = "host-secrets.json"
TLS_DIR = "tls"
HOSTS_DIR = "hosts"
REST_USER = "buildsmart"


@dataclass(frozen=True)
class Secrets:
    """Passwords the plan makes once and keeps (never printed, never logged)."""

    etcd_root: str
    rest_password: str
    etcd_token: str  # keeps etcd clusters made on the same addresses from joining each other
    etcd_users: dict[str, str] = field(default_factory=dict)  # etcd user -> password


def _token() -> str:
    return secrets.token_urlsafe(18)


def tls_dir(directory: Path) -> Path:
    return directory / TLS_DIR


def public_ca(directory: Path) -> Path:
    return directory / "ca.crt"


def host_dir(directory: Path, host: str) -> Path:
    return directory / HOSTS_DIR / host


def member_dir(directory: Path, m: MemberPlan) -> Path:
    return host_dir(directory, m.host) / m.name


def load_secrets(directory: Path) -> Secrets:
    path = directory / SECRETS_FILE
    try:
        raw = json.loads(path.read_text())
        return Secrets(**raw)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: missing: write the plan first (`buildsmart host plan --spec FILE --dir DIR`)") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a host secrets file: {exc}") from exc


def _ensure_secrets(directory: Path, p: ClusterPlan, report: Report) -> Secrets:
    """Keep every stored password; make the missing ones (named in the report, never shown)."""
    path = directory / SECRETS_FILE
    old = load_secrets(directory) if path.exists() else None
    made: list[str] = []
    if old is None:
        made += ["etcd root", "Patroni REST API", "etcd cluster token"]
        old = Secrets(_token(), _token(), f"{p.spec.cluster}-{secrets.token_hex(6)}")
    users = dict(old.etcd_users)
    for user in p.etcd_users:
        if user not in users:
            users[user] = _token()
            made.append(f"etcd user {user}")
    kept = replace(old, etcd_users=users)
    if made:
        topology.atomic_write(path, json.dumps(asdict(kept), indent=2) + "\n", 0o600)
        log.info("host plan secrets: made %s (kept every stored one)", ", ".join(made))
        report(f"secrets: made {len(made)} new ({', '.join(made)}); stored ones kept, in {path} (0600)")
    else:
        report(f"secrets: every password kept ({path})")
    return kept


def _credentials(directory: Path, p: ClusterPlan, ca: Path) -> Credentials:
    """The cluster's roles: stored ones kept (their passwords are on the servers already)."""
    if (directory / topology.CREDENTIALS_FILE).exists():
        creds = topology.load_credentials(directory)
        for key, stored, wanted in (
            ("credentials.superuser", creds.superuser, p.spec.superuser),
            ("credentials.app_user", creds.app_user, p.spec.app_user),
        ):
            if stored != wanted:
                raise p.spec.error(
                    key, f"{directory} already holds role {stored!r} (its password is on the servers); the spec names {wanted!r}"
                )
        if creds.ca_file == str(ca):
            return creds
        creds = replace(creds, ca_file=str(ca))
    else:
        creds = replace(Credentials.generate(p.spec.superuser, p.spec.app_user), ca_file=str(ca))
        log.info("made the passwords of roles %s and %s", creds.superuser, creds.app_user)
    topology.save_credentials(directory, creds)
    return creds


def write(spec_path: Path, directory: Path, report: Report) -> ClusterPlan:
    """Plan the hosts spec at ``spec_path`` and write every host's files into ``directory``."""
    spec = hostspec.load(spec_path)
    p = plan(spec)
    for w in p.warnings:
        report(f"warning: {w}")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    user = service_user(spec.service_user)
    if not user.can_traverse(directory):
        raise ConfigError(f"{directory}: the service user {user.name} cannot reach it (every parent must be searchable)")
    spec_copy = directory / SPEC_FILE
    if spec_path.resolve() != spec_copy:
        topology.atomic_write(spec_copy, spec_path.read_text(), 0o644)
    sec = _ensure_secrets(directory, p, report)

    # TLS: the CA (kept), the orchestrator's client certificate, one server certificate per host
    tdir = tls_dir(directory)
    tdir.mkdir(parents=True, exist_ok=True)
    os.chmod(tdir, 0o755)
    tls.make_ca(tdir, spec.cluster)
    tls.issue(tdir, tdir, tls.CLIENT, (), server=False)
    # the public CA every host holds at the same path: servers verify clients with it, and the
    # coordinator's FDW servers and the workers' subscriptions verify servers (credentials.ca_file)
    tls.copy_ca(tdir, public_ca(directory))
    creds = _credentials(directory, p, public_ca(directory))
    etcd_members = [
        etcdcluster.EtcdMember(e.name, e.address, host_dir(directory, e.host) / "etcd", e.client_port, e.peer_port)
        for e in p.etcd
    ]
    for h in p.hosts:
        _write_host(directory, p, h, user, sec, creds, etcd_members, report)
    _write_ha(directory, p, sec)
    report(f"ha.json: Patroni REST API and etcd endpoints of {len(p.members)} members ({directory / hasettings.HA_FILE})")
    return p


def _write_host(
    directory: Path,
    p: ClusterPlan,
    h: HostView,
    user: ServiceUser,
    sec: Secrets,
    creds: Credentials,
    etcd_members: list[etcdcluster.EtcdMember],
    report: Report,
) -> None:
    hdir = host_dir(directory, h.name)
    (hdir / "tls").mkdir(parents=True, exist_ok=True)
    for d in (hdir.parent, hdir, hdir / "tls"):
        os.chmod(d, 0o755)
    ca = public_ca(directory)
    own = tls.issue(tls_dir(directory), hdir / "tls", h.name, [h.address], user)
    material = tls.Material(ca, own)

    etcd_spec = None
    if h.etcd is not None:
        me = next(m for m in etcd_members if m.name == h.etcd.name)
        me.directory.mkdir(parents=True, exist_ok=True)
        _give(me.directory, user)
        argv = etcdcluster.member_argv(etcd.binary(), me, etcd_members, material, sec.etcd_token)
        etcd_spec = agent.EtcdSpec(me.name, str(me.directory), str(me.data_dir), tuple(argv))

    specs = tuple(_write_member(directory, p, m, user, sec, creds, material) for m in h.members)

    # the agent (root): its own etcd user and client certificate; the password in a 0600 file
    adir = hdir / "agent"
    adir.mkdir(parents=True, exist_ok=True)
    os.chmod(adir, 0o700)
    client = tls.issue(tls_dir(directory), adir, h.agent_user, (), server=False)
    password_file = adir / "etcd-password"
    topology.atomic_write(password_file, sec.etcd_users[h.agent_user], 0o600)
    dcs = agent.DcsAccess(h.etcd_urls, str(ca), str(client.cert), str(client.key), h.agent_user, str(password_file))
    path = agent.write_plan(directory, agent.HostPlan(h.name, user.name, dcs, etcd_spec, specs))
    runs = ([h.etcd.name] if h.etcd else []) + [f"{m.name} (PostgreSQL {m.pg_port}, REST {m.rest_port})" for m in h.members]
    report(f"{h.name} ({h.address}): {', '.join(runs) or 'nothing'}; plan {path.name}, files {hdir}")
    log.info("wrote the plan of host %s: %s", h.name, ", ".join(runs) or "nothing")


def _write_member(
    directory: Path, p: ClusterPlan, m: MemberPlan, user: ServiceUser, sec: Secrets, creds: Credentials, material: tls.Material
) -> agent.PatroniSpec:
    """One Patroni member's directory and config (0600, the service user's: it holds passwords)."""
    mdir = member_dir(directory, m)
    mdir.mkdir(parents=True, exist_ok=True)
    files = memberconf.TlsFiles(str(material.ca), str(material.own.cert), str(material.own.key))
    # a client-only certificate without a common name for etcd (runtime/tls.py _subject)
    client = tls.issue(tls_dir(directory), mdir / "tls", f"{m.name}-etcd", (), user, server=False)
    conf = memberconf.MemberConf(
        scope=m.group,
        namespace=p.namespace,
        name=m.name,
        restapi_listen=m.rest_address,
        restapi_address=m.rest_address,
        restapi_user=REST_USER,
        restapi_password=sec.rest_password,
        etcd_hosts=tuple(e.endpoint for e in p.etcd),
        synchronous=p.spec.synchronous,
        pg_listen=m.pg_address,
        pg_address=m.pg_address,
        data_dir=str(mdir / "data"),
        bin_dir=str(pgbin.bin_dir()),
        pgpass=str(mdir / "pgpass"),
        superuser=creds.superuser,
        superuser_password=creds.superuser_password,
        dcs_parameters=dcs_parameters(hosts=True),
        local_parameters={k: memberconf.pg_value(v) for k, v in tls_settings(material).items()},
        hba=tuple(hba_rules(networks=p.spec.allow, use_tls=True)),
        tls=files,
        etcd_tls=True,
        etcd_client=memberconf.TlsFiles(str(material.ca), str(client.cert), str(client.key)),
        etcd_user=m.name,
        etcd_password=sec.etcd_users[m.name],
        timing=p.spec.timing,
    )
    config = mdir / "patroni.yml"
    text = memberconf.render(conf)
    before = config.read_text() if config.exists() else None
    if before != text:
        topology.atomic_write(config, text, 0o600)
        log.info("%s the Patroni config of %s", "wrote" if before is None else "rewrote (changed)", m.name)
    _give(mdir, user)
    user.chown(mdir / "tls")
    user.chown(config)
    group_key = f"{p.namespace}{m.group}/"
    return agent.PatroniSpec(m.name, m.group, str(mdir), m.pg_address, f"{group_key}leader", f"{group_key}members/", m.peers)


def _give(directory: Path, user: ServiceUser) -> None:
    """Hand a directory itself (not what is in it) to the service user: a member's data directory
    below it is its own already, and may change under a walk while the member runs (a re-plan)."""
    if not user.is_current:
        os.chown(directory, user.uid, user.gid, follow_symlinks=False)


def _write_ha(directory: Path, p: ClusterPlan, sec: Secrets) -> None:
    """DIR/ha.json (runtime ``hosts``): the REST API of every member and etcd, over TLS."""
    last_leaders = hasettings.load(directory).last_leaders if hasettings.exists(directory) else {}
    settings = HaSettings(
        replicas=max((len(g.members) for g in p.groups), default=1) - 1,
        synchronous=p.spec.synchronous,
        etcd_client_port=p.spec.etcd_client_port,
        etcd_peer_port=p.spec.etcd_peer_port,
        restapi_ports={m.name: m.rest_port for m in p.members},
        restapi_user=REST_USER,
        restapi_password=sec.rest_password,
        last_leaders=last_leaders,
        restapi_hosts={m.name: m.address for m in p.members},
        etcd_endpoints=[e.endpoint for e in p.etcd],
        etcd_user=ORCHESTRATOR_ETCD_USER,
        etcd_password=sec.etcd_users[ORCHESTRATOR_ETCD_USER],
        tls_dir=str(tls_dir(directory)),
    )
    hasettings.save(directory, settings)
