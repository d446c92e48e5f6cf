"""The docker compose `ha` profile, checked without a Docker engine: the Patroni config the member
containers render (docker/patroni/render.py from patroni/member.yml.tmpl) passes Patroni's own
validator and carries the local runtime's server settings; docker/cluster-ha.toml names exactly the
compose members of each group; docker-compose validates the file (when installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import pgbin
from orchestrator.osuser import service_user
from orchestrator.runtime import etcd
from orchestrator.runtime.local import SERVER_SETTINGS
from orchestrator.runtime.memberconf import TEMPLATE
from orchestrator.runtime.patroni import patroni_python
from orchestrator.runtime.ports import free_port
from orchestrator.spec import load_spec
from tests.harness import REPO, make_tmp_dir

RENDER = REPO / "docker" / "patroni" / "render.py"
COMPOSE = REPO / "docker-compose.yml"
SPEC = REPO / "docker" / "cluster-ha.toml"
LOCAL_ONLY = {"listen_addresses", "port", "unix_socket_directories"}


def _render(tmp_path: Path, etcd_hosts: str = "127.0.0.1:2379, 127.0.0.1:2380", **extra: str) -> dict[str, Any]:
    env = dict(
        os.environ,
        BUILDSMART_SCOPE="w1",
        BUILDSMART_MEMBER="ha-w1-0",
        BUILDSMART_ETCD_HOSTS=etcd_hosts,
        BUILDSMART_SUPERUSER_PASSWORD='p"w: #x',
        BUILDSMART_PATRONI_PASSWORD="rest-secret",
        BUILDSMART_PG_BIN=str(pgbin.bin_dir()),
        BUILDSMART_DATA_DIR=str(tmp_path / "data"),
        **extra,
    )
    out = tmp_path / "patroni.yml"
    subprocess.run([sys.executable, str(RENDER), str(TEMPLATE), str(out)], env=env, check=True)
    assert out.stat().st_mode & 0o077 == 0, "the rendered config holds passwords: 0600"
    data: dict[str, Any] = yaml.safe_load(out.read_text())
    return data


def test_rendered_config_matches_the_local_runtime(tmp_path: Path) -> None:
    conf = _render(tmp_path)
    assert (conf["scope"], conf["name"]) == ("w1", "ha-w1-0")
    assert conf["etcd3"]["hosts"] == ["127.0.0.1:2379", "127.0.0.1:2380"]
    dcs = conf["bootstrap"]["dcs"]
    assert dcs["synchronous_mode"] is True and dcs["synchronous_mode_strict"] is False
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert {"type": "logical"} in dcs["ignore_slots"]
    local = {k: v.strip("'") for k, v in SERVER_SETTINGS.items() if k not in LOCAL_ONLY}
    assert dcs["postgresql"]["parameters"] == local, "compose members must run with the local runtime's settings"
    params = dcs["postgresql"]["parameters"]
    assert (params["wal_level"], params["max_prepared_transactions"], params["max_wal_senders"]) == ("logical", "100", "16")
    assert params["enable_partitionwise_aggregate"] == "on"
    hba = conf["postgresql"]["pg_hba"]
    assert all(line.endswith("scram-sha-256") for line in hba) and any(line.startswith("host replication") for line in hba)
    assert conf["postgresql"]["authentication"]["superuser"]["password"] == 'p"w: #x'
    assert conf["postgresql"]["connect_address"].endswith(":5432") and conf["postgresql"]["listen"] == "0.0.0.0:5432"
    assert _render(tmp_path, BUILDSMART_SYNCHRONOUS="strict")["bootstrap"]["dcs"]["synchronous_mode_strict"] is True


def test_rendered_config_passes_patroni_validation(tmp_path: Path) -> None:
    """Patroni's validator also checks that the etcd hosts answer: give it a real (local) etcd."""
    base = make_tmp_dir("bs-compose-etcd-")
    user = service_user()
    client = free_port()
    local_etcd = etcd.LocalEtcd(base / "etcd", client, free_port(exclude=frozenset({client})))
    try:
        etcd.start(local_etcd, user)
        _render(tmp_path, etcd_hosts=f"127.0.0.1:{client}")
        result = subprocess.run(
            [patroni_python(), "-m", "patroni", "--validate-config", str(tmp_path / "patroni.yml")],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        etcd.stop(local_etcd)  # by the PID in its pid file
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_render_refuses_missing_secrets(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDSMART_")}
    env.update(BUILDSMART_SCOPE="w1", BUILDSMART_ETCD_HOSTS="e:2379", BUILDSMART_SUPERUSER_PASSWORD="x")
    result = subprocess.run(
        [sys.executable, str(RENDER), str(TEMPLATE), str(tmp_path / "p.yml")], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "BUILDSMART_PATRONI_PASSWORD" in result.stderr


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_spec_names_the_compose_members_of_each_group() -> None:
    os.environ.setdefault("BUILDSMART_SUPERUSER_PASSWORD", "test")
    topo = load_spec(SPEC).topology
    services = _compose()["services"]
    ha_members = {
        name: svc
        for name, svc in services.items()
        if "ha" in svc.get("profiles", []) and "BUILDSMART_SCOPE" in svc.get("environment", {})
    }
    assert len(ha_members) == 8
    for group in topo.groups:
        assert len(group.members) == 2, group
        for m in group.members:
            svc = ha_members[m.host]
            assert svc["environment"]["BUILDSMART_SCOPE"] == group.name
            assert svc["environment"]["BUILDSMART_MEMBER"] == m.host and m.port == 5432
    assert {m.host for g in topo.groups for m in g.members} == set(ha_members)
    # the plain layout stays the default: its servers carry no profile
    assert all(not services[n].get("profiles") for n in ("coordinator", "w1", "w2", "w3"))


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_validates_both_layouts() -> None:
    env = dict(os.environ, BUILDSMART_SUPERUSER_PASSWORD="x", BUILDSMART_PATRONI_PASSWORD="y")
    for extra in ([], ["--profile", "ha"]):
        cmd = ["docker-compose", "-f", str(COMPOSE), *extra, "config", "-q"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=REPO)
        assert result.returncode == 0, result.stderr


def test_compose_files_are_generated_byte_for_byte() -> None:
    """docker-compose.yml and docker/cluster-ha.toml are what runtime/compose.py makes from the
    template and its layout; the etcd services run the hosts runtime's etcd command line."""
    from orchestrator.runtime import compose, etcdcluster

    for path, text in compose.outputs().items():
        assert path.read_text() == text, f"{path.name} differs: run `python -m orchestrator.runtime.compose`"
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    layout = compose.Layout()
    members = layout.etcd_members()
    for m in members:
        want = etcdcluster.member_argv(compose.ETCD_BINARY, m, members, None, compose.ETCD_TOKEN, listen="0.0.0.0")
        assert services[m.name]["command"] == want
    spec = load_spec(SPEC)
    assert [g.name for g in spec.topology.groups] == list(layout.groups)
    assert all(services[m.host]["environment"]["BUILDSMART_SCOPE"] == g.name for g in spec.topology.groups for m in g.members)
