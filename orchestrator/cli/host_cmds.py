"""`buildsmart host ...`: run this host's members under its agent (runtime/agent.py), from the
host plan DIR/host-NAME.json (docs/hosts.md). The agent is what a real machine runs under
systemd (`host unit` prints the unit); `host up` starts it as a daemon for a quick start."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.runtime import agent

host_app = typer.Typer(help="This host's members (etcd, Patroni) under its per-host agent.", no_args_is_help=True)
app.add_typer(host_app, name="host")

HostOpt = Annotated[str, typer.Option("--host", help="This host's name in the cluster's plan (DIR/host-NAME.json).")]


@host_app.command("up")
def host_up(host: HostOpt, directory: DirOpt = DEFAULT_DIR) -> None:
    """Start this host's agent as a daemon (it starts the members of the plan and watches them)."""
    directory = directory.resolve()
    setup_logging(directory)
    pid = agent.start_daemon(directory, host)
    report(f"[green]agent of {host} runs[/] (pid {pid}); log: {directory / agent.LOG_FILE.format(host=host)}")


@host_app.command("down")
def host_down(host: HostOpt, directory: DirOpt = DEFAULT_DIR) -> None:
    """Stop this host's agent (verified by identity). Its members keep running."""
    directory = directory.resolve()
    setup_logging(directory)
    stopped = agent.stop_daemon(directory, host)
    report(f"agent of {host} {'stopped' if stopped else 'was not running'}; its members keep running")


@host_app.command("agent")
def host_agent(host: HostOpt, directory: DirOpt = DEFAULT_DIR) -> None:
    """Run this host's agent in the foreground (what the systemd unit runs)."""
    raise typer.Exit(agent.main([str(directory.resolve()), host]))


@host_app.command("unit")
def host_unit(host: HostOpt, directory: DirOpt = DEFAULT_DIR) -> None:
    """Print the systemd unit that runs this host's agent (save as buildsmart-agent.service)."""
    out.print(agent.systemd_unit(directory.resolve(), host), end="", markup=False)
