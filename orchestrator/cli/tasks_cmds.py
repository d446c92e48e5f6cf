"""The background task runner and the automatic balancer: `buildsmart tasks ...`, `buildsmart balancer ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import psycopg
import typer

from orchestrator import catalog, status
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.cli.cluster_cmds import render_balancer
from orchestrator.connections import connect, superuser_target
from orchestrator.elastic.policy import BalancerPolicy, parse_settings
from orchestrator.exceptions import ConfigError
from orchestrator.tasks import registry
from orchestrator.tasks import runner as tasks_runner
from orchestrator.topology import load, load_credentials

balancer_app = typer.Typer(help="The automatic balancer: pause, resume, status, settings.", no_args_is_help=True)
tasks_app = typer.Typer(help="The background task runner (balancer, partition upkeep).", no_args_is_help=True)
app.add_typer(balancer_app, name="balancer")
app.add_typer(tasks_app, name="tasks")


def _coordinator(directory: Path, purpose: str) -> psycopg.Connection:
    directory = directory.resolve()
    topo, creds = load(directory), load_credentials(directory)
    return connect(superuser_target(topo.coordinator, creds), purpose, autocommit=True)


@balancer_app.command("pause")
def balancer_pause(
    note: Annotated[str | None, typer.Option(help="Why (shown by status).")] = None,
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Stop starting new operations (one already running finishes; nothing is rolled back)."""
    setup_logging(directory)
    with _coordinator(directory, "balancer") as conn:
        catalog.set_paused(conn, True, note or "paused by `buildsmart balancer pause`")
    report("[yellow]balancer paused[/]: no new split or move starts until `buildsmart balancer resume`")


@balancer_app.command("resume")
def balancer_resume(directory: DirOpt = DEFAULT_DIR) -> None:
    """Let the balancer act again."""
    setup_logging(directory)
    with _coordinator(directory, "balancer") as conn:
        catalog.set_paused(conn, False)
    report("[green]balancer resumed[/]")


@balancer_app.command("status")
def balancer_status(
    decisions: Annotated[int, typer.Option(help="How many recent decisions to show.")] = 20,
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """State, elected runner, effective settings and the last decisions with their reasons."""
    setup_logging(directory)
    with _coordinator(directory, "balancer") as conn:
        b = status.balancer_status(conn, decisions)
        tasks = catalog.task_runs(conn)
    render_balancer(b, tasks)
    out.print("settings: " + ", ".join(f"{k}={v}" for k, v in b.settings.items()))


@balancer_app.command("config")
def balancer_config(
    assignments: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE, e.g. split_bytes=256MB tolerance=0.05")] = None,
    reset: Annotated[
        list[str] | None, typer.Option(help="Back to the default for this key (repeatable); 'all' for every key.")
    ] = None,
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Show or change the balancer's settings (stored in the catalog; the running balancer picks
    them up at its next look)."""
    setup_logging(directory)
    with _coordinator(directory, "balancer") as conn:
        current = dict(catalog.balancer_state(conn).settings)
        changes: dict[str, str] = {}
        for a in assignments or []:
            key, sep, value = a.partition("=")
            if not sep:
                raise ConfigError(f"{a!r} is not KEY=VALUE")
            changes[key.strip()] = value.strip()
        parse_settings(changes)  # refuse unknown keys and bad values before storing anything
        for key in reset or []:
            if key == "all":
                current = {}
            else:
                current.pop(key, None)
        if changes or reset:
            current.update(changes)
            catalog.set_balancer_settings(conn, current)
    effective = BalancerPolicy().with_settings(current).as_dict()
    for key, value in effective.items():
        out.print(f"{key} = {value}{'' if key not in current else '  (set)'}")


@tasks_app.command("run")
def tasks_run(directory: DirOpt = DEFAULT_DIR) -> None:
    """Run the task runner in the foreground (for a service manager; one runner per cluster is elected)."""
    raise typer.Exit(tasks_runner.main([str(directory)]))


@tasks_app.command("start")
def tasks_start(directory: DirOpt = DEFAULT_DIR) -> None:
    """Start the task runner daemon of DIR (`up` does this)."""
    setup_logging(directory)
    pid = tasks_runner.start_daemon(directory)
    report(f"task runner running (pid {pid}, log {directory.resolve() / tasks_runner.LOG_FILE})")


@tasks_app.command("stop")
def tasks_stop(directory: DirOpt = DEFAULT_DIR) -> None:
    """Stop the task runner daemon of DIR by its PID (`down` does this)."""
    setup_logging(directory)
    pid = tasks_runner.stop_daemon(directory)
    report(f"task runner: stopped (pid {pid})" if pid else "task runner was not running")


@tasks_app.command("status")
def tasks_status(directory: DirOpt = DEFAULT_DIR) -> None:
    """Local daemon, elected runner of the cluster and each task's last run."""
    setup_logging(directory)
    pid = tasks_runner.daemon_pid(directory)
    out.print(f"local task runner: {'pid ' + str(pid) if pid else 'not running'}; tasks: {', '.join(registry.names())}")
    with _coordinator(directory, "tasks") as conn:
        b = status.balancer_status(conn, 0)
        runs = catalog.task_runs(conn)
    out.print(f"elected runner: {b.runner or 'none'}")
    for t in runs:
        when = f"{t.started_at:%Y-%m-%d %H:%M:%S}"
        out.print(f"  {t.task}: {t.outcome} at {when} on {t.runner} ({t.runs} runs, {t.failures} failed): {t.summary or ''}")
