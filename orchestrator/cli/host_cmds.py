"""`buildsmart host ...`: build a cluster over several hosts (docs/hosts.md). `host plan` writes
what every host needs from a hosts spec (runtime/hostfiles.py); on each host, `host up` (or the
systemd unit `host unit` prints) runs its agent (runtime/agent.py), which starts the members of
its plan DIR/host-NAME.json; `host init` then sets the cluster up (orchestrator/hostinit.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator import hostinit
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.runtime import agent, hostfiles

host_app = typer.Typer(help="This host's members (etcd, Patroni) under its per-host agent.", no_args_is_help=True)
app.add_typer(host_app, name="host")

HostOpt = Annotated[str, typer.Option("--host", help="This host's name in the cluster's plan (DIR/host-NAME.json).")]


@host_app.command("plan")
def host_plan(
    spec: Annotated[Path, typer.Option("--spec", help="The hosts spec (TOML; docs/hosts.md).")],
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Write what each host needs (CA and certificates, etcd and Patroni members, agent plans,
    secrets) into DIR. Re-running keeps every key and password; it adds what the spec adds."""
    directory = directory.resolve()
    setup_logging(directory)
    p = hostfiles.write(spec, directory, report)
    ship = ", ".join(f"{agent.PLAN_FILE.format(host=h.name)} + {hostfiles.HOSTS_DIR}/{h.name}/" for h in p.hosts)
    report(
        f"[green]plan written[/] for {len(p.hosts)} hosts in {directory}. Next: copy to each host, at the same "
        f"path, ca.crt and its files ({ship}); run `buildsmart host up --dir {directory} --host NAME` on each host "
        f"(or install `buildsmart host unit`); then `buildsmart host init --dir {directory}` here."
    )


@host_app.command("init")
def host_init(
    directory: DirOpt = DEFAULT_DIR,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for etcd and the groups.")] = 300.0,
) -> None:
    """After `host plan` and `host up` on every host: enable etcd's authentication, wait for every
    group's primary and synchronous standby, and set BuildSmartDB up on them. Safe to rerun."""
    directory = directory.resolve()
    setup_logging(directory)
    hostinit.init(directory, report, timeout)


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
