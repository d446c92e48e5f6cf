"""``buildsmart serve`` (the front door: Haystack API, dashboard, /metrics, HTTP ingest) and
``buildsmart users add|remove|list`` (who may log in to it)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.table import Table

from orchestrator import topology
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.connections import connect, superuser_target
from orchestrator.exceptions import ConfigError
from orchestrator.serve import daemon, users

HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option("--port", help="TCP port to listen on.")]


@app.command("serve")
def serve_cmd(
    directory: DirOpt = DEFAULT_DIR,
    host: HostOpt = daemon.DEFAULT_HOST,
    port: PortOpt = daemon.DEFAULT_PORT,
    detach: Annotated[bool, typer.Option("--detach", help="Run in the background; `down` or `serve --stop` stops it.")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the background server of DIR.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Serve the Haystack HTTP API (/api), the dashboard (/ui), /metrics and POST /ingest."""
    setup_logging(directory, verbose)
    if stop:
        pid = daemon.stop_daemon(directory)
        report(f"buildsmart serve: stopped (pid {pid})" if pid else "buildsmart serve: was not running")
        return
    if not topology.exists(directory.resolve()):
        raise ConfigError(f"no cluster in {directory.resolve()}: run `buildsmart up` or `buildsmart init` first")
    if detach:
        pid = daemon.start_daemon(directory, host, port)
        report(f"buildsmart serve running (pid {pid}): dashboard http://{host}:{port}/ui/, Haystack http://{host}:{port}/api/")
        return
    report(f"serving http://{host}:{port}/ui/ (dashboard) and http://{host}:{port}/api/ (Haystack); Ctrl-C stops")
    daemon.run(directory, host, port)


users_app = typer.Typer(help="Users of `buildsmart serve` and their rights (read < write < admin).", no_args_is_help=True)
app.add_typer(users_app, name="users")


def _password(from_stdin: bool) -> str:
    env = os.environ.get("BUILDSMART_USER_PASSWORD")
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if env:
        return env
    return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name.")],
    rights: Annotated[str, typer.Option("--rights", help="read, write (hisWrite, /ingest) or admin.")] = "read",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin (else $BUILDSMART_USER_PASSWORD or a prompt).")
    ] = False,
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Add a user, or set an existing user's password and rights (only a SCRAM verifier is stored)."""
    setup_logging(directory)
    if rights not in users.RIGHTS:
        raise ConfigError(f"--rights {rights!r}: use one of {', '.join(users.RIGHTS)}")
    password = _password(password_stdin)
    topo, creds = topology.load(directory.resolve()), topology.load_credentials(directory.resolve())
    with connect(superuser_target(topo.coordinator, creds), "users", autocommit=True) as conn:
        created = users.add(conn, name, password, rights)
    report(f"user {name} {'added' if created else 'updated'} with {rights} rights")


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="User name.")], directory: DirOpt = DEFAULT_DIR) -> None:
    """Remove a user (servers drop their sessions within a minute)."""
    setup_logging(directory)
    topo, creds = topology.load(directory.resolve()), topology.load_credentials(directory.resolve())
    with connect(superuser_target(topo.coordinator, creds), "users", autocommit=True) as conn:
        removed = users.remove(conn, name)
    if not removed:
        raise ConfigError(f"no user {name}")
    report(f"user {name} removed")


@users_app.command("list")
def users_list(directory: DirOpt = DEFAULT_DIR) -> None:
    """List the users and their rights."""
    topo, creds = topology.load(directory.resolve()), topology.load_credentials(directory.resolve())
    with connect(superuser_target(topo.coordinator, creds), "users", autocommit=True) as conn:
        found = users.list_users(conn)
    table = Table()
    for col in ("user", "rights", "created"):
        table.add_column(col)
    for u in found:
        table.add_row(u.name, u.rights, u.created_at.strftime("%Y-%m-%d %H:%M") if u.created_at else "-")
    out.print(table)
