"""The cluster's TLS material: one CA per cluster, made by the orchestrator (PyPI ``cryptography``),
and one certificate per host (servers: PostgreSQL, Patroni's REST API, etcd) plus one client
certificate for the orchestrator (etcd and Patroni REST clients).

Trust model (docs/hosts.md): every client verifies the server against the cluster CA with the
host's address in the certificate (libpq ``sslmode=verify-full``, Python's ``ssl`` with
``check_hostname``); servers verify any client certificate presented against the same CA
(PostgreSQL ``ssl_ca_file``, Patroni ``verify_client: optional``) and etcd demands one
(``--client-cert-auth``). Passwords (SCRAM, REST basic auth, etcd users) still authenticate
the user; TLS keeps them and the data off the wire and stops impersonation of a node.

Files: ``ca.crt`` (public, 0644), ``ca.key`` (0600, stays with the orchestrator: only it issues
certificates), ``<name>.crt``/``<name>.key`` (key 0600, owned by the service user that serves it).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.exceptions import ConfigError
from orchestrator.osuser import ServiceUser

log = logging.getLogger(__name__)

CA_DAYS = 3650
CERT_DAYS = 825
CLIENT = "orchestrator"  # the client certificate the orchestrator presents to etcd and Patroni


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Material:
    """Where one party finds its TLS files."""

    ca: Path
    own: CertPaths


def _write(path: Path, data: bytes, mode: int, owner: ServiceUser | None = None) -> None:
    """Atomic write with the mode set before any byte lands (keys are never world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    if owner is not None and not owner.is_current:
        os.chown(tmp, owner.uid, owner.gid)
    os.replace(tmp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(directory: Path, cluster: str) -> Path:
    """Create ``ca.crt``/``ca.key`` in ``directory`` unless they exist; returns ca.crt."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    if crt.exists() and key_path.exists():
        return crt
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"BuildSmartDB cluster CA {cluster}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(key_path, pem_key, 0o600)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("created the cluster CA of %s in %s", cluster, directory)
    return crt


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"no cluster CA in {directory}: {exc.filename} is missing") from exc
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _subject(name: str, server: bool) -> x509.Name:
    """A server certificate is named by its common name. A client-only certificate carries no
    common name: etcd refuses every request through its JSON gateway (which Patroni and we use)
    from a client certificate with one once authentication is on, since the gateway cannot pass
    the name on; users then authenticate by password."""
    if server:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "BuildSmartDB"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, name),
        ]
    )


def issue(
    ca_dir: Path, out_dir: Path, name: str, addresses: Sequence[str], owner: ServiceUser | None = None, *, server: bool = True
) -> CertPaths:
    """A certificate for ``name`` valid for ``addresses`` (IPs and DNS names), signed by the CA
    in ``ca_dir``; usable as TLS server and client. Reissued when the addresses changed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(out_dir / f"{name}.crt", out_dir / f"{name}.key")
    want = sorted(set(addresses))
    if paths.cert.exists() and paths.key.exists() and _addresses(paths.cert) == want:
        return paths
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name, server))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if want:
        builder = builder.add_extension(_san(want), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(paths.key, pem_key, 0o600, owner)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, owner)
    log.info("issued the TLS certificate of %s for %s", name, ", ".join(want) or "no address (client only)")
    return paths


def _addresses(cert_file: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sorted([str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName))


def copy_ca(ca_dir: Path, to: Path, owner: ServiceUser | None = None) -> Path:
    """The public CA certificate alone (what a host or a client needs to verify servers)."""
    to.parent.mkdir(parents=True, exist_ok=True)
    _write(to, (ca_dir / "ca.crt").read_bytes(), 0o644, owner)
    return to


def client_context(ca: Path, own: CertPaths | None = None) -> ssl.SSLContext:
    """An SSL context that verifies servers against the cluster CA (host name included) and, when
    given, presents ``own`` as client certificate (etcd and Patroni want one)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if own is not None:
        ctx.load_cert_chain(str(own.cert), str(own.key))
    return ctx


# ---------------------------------------------------------------- the local runtime


LOCAL_ADDRESSES = ("127.0.0.1", "localhost")


def local_material(tls_dir: Path) -> Material:
    return Material(tls_dir / "ca.crt", CertPaths(tls_dir / "server.crt", tls_dir / "server.key"))


def ensure_local(tls_dir: Path, cluster: str, user: ServiceUser) -> Material:
    """CA, one server certificate for 127.0.0.1 (every local server) owned by the service user,
    and the orchestrator's client certificate, in ``tls_dir`` (which the service user can reach)."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o755)
    make_ca(tls_dir, cluster)
    issue(tls_dir, tls_dir, "server", LOCAL_ADDRESSES, user)
    issue(tls_dir, tls_dir, CLIENT, (), server=False)
    return local_material(tls_dir)
