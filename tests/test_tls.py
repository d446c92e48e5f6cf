"""TLS proven by refusal (issue 13 item 10), on the session's Patroni cluster (TLS is on by default
with the OpenSSL server build): a client, an FDW server or a replication connection that offers no
TLS is refused; a client that verifies against another CA, or presents a certificate of another CA,
is refused; Patroni's REST API refuses plain HTTP and certificates of another CA; replicas,
subscriptions and FDW servers of the cluster itself verify the server (sslmode=verify-full).
The certificate maker is checked without servers."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from psycopg import sql

from orchestrator import pgbin, runtime, topology
from orchestrator.connections import superuser_target
from orchestrator.runtime import tls

pytestmark = pytest.mark.skipif(not pgbin.has_ssl(), reason="this PostgreSQL build has no OpenSSL")


def test_certificates_name_their_addresses_and_keys_stay_private(tmp_path: Path) -> None:
    ca = tls.make_ca(tmp_path / "ca", "t")
    paths = tls.issue(tmp_path / "ca", tmp_path / "out", "h1", ["10.0.0.1", "h1.example"])
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["h1.example"]
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    before = paths.cert.read_bytes()
    assert tls.issue(tmp_path / "ca", tmp_path / "out", "h1", ["h1.example", "10.0.0.1"]).cert.read_bytes() == before
    tls.issue(tmp_path / "ca", tmp_path / "out", "h1", ["10.0.0.2"])
    assert paths.cert.read_bytes() != before, "a changed address must reissue the certificate"
    # the certificate verifies against its CA and not against another
    other = tls.make_ca(tmp_path / "other", "t")  # same name, another key
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(other.read_bytes()))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tls.CertPaths]:
    """Another CA and a client certificate it signed (an impostor's material)."""
    base = tmp_path_factory.mktemp("other-ca")
    ca = tls.make_ca(base, "impostor")
    return ca, tls.issue(base, base, "impostor", ["127.0.0.1"])


def _params(ha_dir: Path) -> dict[str, str]:
    topo, creds = topology.load(ha_dir), topology.load_credentials(ha_dir)
    assert creds.ca_file, "a cluster made with the OpenSSL build must use TLS"
    t = superuser_target(topo.coordinator, creds)
    return {"host": t.hosts, "port": t.ports, "dbname": t.dbname, "user": t.user, "password": t.password,
            "target_session_attrs": "read-write", "connect_timeout": "5"}  # fmt: skip


def _refused(**params: str) -> str:
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(**params).close()  # type: ignore[arg-type]
    return str(err.value)


def test_postgres_refuses_clients_without_tls_or_of_another_ca(ha_dir: Path, foreign: tuple[Path, tls.CertPaths]) -> None:
    p = _params(ha_dir)
    ca = topology.load_credentials(ha_dir).ca_file
    assert ca is not None
    assert "no encryption" in _refused(**p, sslmode="disable")
    assert "certificate verify failed" in _refused(**p, sslmode="verify-full", sslrootcert=str(foreign[0]))
    own = foreign[1]
    message = _refused(**p, sslmode="require", sslcert=str(own.cert), sslkey=str(own.key))
    assert "unknown ca" in message or "certificate" in message, message
    with psycopg.connect(**p, sslmode="verify-full", sslrootcert=ca) as conn:  # type: ignore[arg-type]
        row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row is not None and row[0] is True, row
    # a replication connection without TLS finds no pg_hba entry either
    assert "no encryption" in _refused(**p, sslmode="disable", replication="true")


def test_cluster_links_verify_the_server(ha_dir: Path) -> None:
    """Replicas stream over TLS with verify-full; FDW servers and subscriptions carry verify-full;
    an FDW server that offers no TLS is refused by the worker."""
    topo, creds = topology.load(ha_dir), topology.load_credentials(ha_dir)
    p = _params(ha_dir)
    with psycopg.connect(**p, sslmode="verify-full", sslrootcert=creds.ca_file, autocommit=True) as conn:  # type: ignore[arg-type]
        senders = conn.execute("SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)").fetchall()
        assert senders and all(r[0] for r in senders), f"a replica streams without TLS: {senders}"
        options = conn.execute(
            "SELECT srvname, srvoptions FROM pg_foreign_server WHERE srvname IN "
            "(SELECT srvname FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw "
            "WHERE w.fdwname = 'postgres_fdw')"
        ).fetchall()
        assert options, "no postgres_fdw server on the coordinator"
        for name, opts in options:
            assert "sslmode=verify-full" in opts and f"sslrootcert={creds.ca_file}" in opts, (name, opts)
        w1 = superuser_target(topo.group("w1"), creds)
        conn.execute("CREATE SCHEMA IF NOT EXISTS tls_probe")
        try:
            conn.execute(
                sql.SQL(
                    "CREATE SERVER tls_probe_plain FOREIGN DATA WRAPPER postgres_fdw "
                    "OPTIONS (host {}, port {}, dbname {}, sslmode 'disable')"
                ).format(sql.Literal(w1.hosts.split(",")[0]), sql.Literal(w1.ports.split(",")[0]), sql.Literal(w1.dbname))
            )
            conn.execute(
                sql.SQL("CREATE USER MAPPING FOR CURRENT_USER SERVER tls_probe_plain OPTIONS (user {}, password {})").format(
                    sql.Literal(w1.user), sql.Literal(w1.password)
                )
            )
            conn.execute(
                "CREATE FOREIGN TABLE tls_probe.one (x int) SERVER tls_probe_plain "
                "OPTIONS (schema_name 'pg_catalog', table_name 'pg_am')"
            )
            with pytest.raises(psycopg.Error, match="no encryption"):
                conn.execute("SELECT count(*) FROM tls_probe.one").fetchone()
        finally:
            conn.execute("DROP SCHEMA tls_probe CASCADE")
            conn.execute("DROP SERVER IF EXISTS tls_probe_plain CASCADE")
    # moves subscribe with Elastic.conninfo, which is this conninfo
    conninfo = superuser_target(topo.group("w1"), creds).conninfo("move", primary=True)
    assert "sslmode=verify-full" in conninfo and "sslrootcert=" in conninfo, "subscriptions would not verify the source"


def _rest(url: str, context: ssl.SSLContext | None) -> int:
    req = urllib.request.Request(url, method="GET")
    with urllib.request.urlopen(req, timeout=5, context=context) as resp:
        return int(resp.status)


def test_patroni_rest_api_refuses_plain_http_and_another_ca(ha_dir: Path, foreign: tuple[Path, tls.CertPaths]) -> None:
    topo = topology.load(ha_dir)
    settings = runtime.for_cluster(ha_dir, topo).ha()
    assert settings is not None and settings.tls_dir, "the Patroni REST API must use TLS"
    member = topo.group("w1").members[0].name
    url = settings.restapi_url(member)
    assert url.startswith("https://")
    assert _rest(f"{url}/health", settings.ssl_context()) in (200, 503)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _rest(url.replace("https://", "http://", 1) + "/health", None)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _rest(f"{url}/health", tls.client_context(foreign[0]))
    impostor = ssl.create_default_context(cafile=str(Path(settings.tls_dir) / "ca.crt"))
    impostor.load_cert_chain(str(foreign[1].cert), str(foreign[1].key))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _rest(f"{url}/health", impostor)


def test_dsn_verifies_the_server(ha_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "dsn", "--dir", str(ha_dir)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert "sslmode=verify-full" in out and "sslrootcert=" in out, out
    with psycopg.connect(out, connect_timeout=5) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
