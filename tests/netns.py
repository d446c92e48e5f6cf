"""Hosts made of Linux network namespaces, for partition and crash tests (issue 13).

Each host is a namespace with one interface (``eth0``, one end of a veth pair) and an address in a
private test range; the other ends hang on a bridge in the test's own namespace, which also holds
an address, so the test process reaches every host. There is no netem and no ping here:

* ``cut(host)`` sets the host's veth end on the bridge down: packets to and from it are lost
  (connects time out), as when a host is unplugged; ``heal(host)`` sets it up again;
* ``crash(host)`` kills every process the test started in that host; ``freeze``/``thaw`` SIGSTOP
  and SIGCONT them.

Everything made is recorded and removed by :meth:`Network.close` (processes first, then the
namespaces, which take their veth ends along, then the bridge), also after a failed test. Names
carry a per-network tag, so networks of concurrent test sessions never meet.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def available() -> str | None:
    """None when namespaces can be made here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _free_subnet() -> str:
    """A /24 in 10.213.0.0/16 that no interface here uses yet."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], check=True, capture_output=True, text=True).stdout
    for _ in range(64):
        third = secrets.randbelow(250) + 1
        prefix = f"10.213.{third}."
        if prefix not in used:
            return prefix
    raise RuntimeError("no free 10.213.x.0/24 test subnet")


@dataclass
class Host:
    name: str
    ns: str
    address: str
    veth: str  # the end on the bridge, in the test's namespace
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: list[tuple[tuple[str, ...], Path]] = field(default_factory=list)  # what restart() starts again


class Network:
    def __init__(self, names: Sequence[str]) -> None:
        self.tag = secrets.token_hex(2)
        self.bridge = f"bsbr{self.tag}"
        prefix = _free_subnet()
        self.gateway = f"{prefix}254"
        self.subnet = f"{prefix}0/24"
        self.hosts: dict[str, Host] = {}
        self._made_bridge = False
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made_bridge = True
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(names, start=1):
                self._add_host(name, i, f"{prefix}{i}")
        except BaseException:
            self.close()
            raise

    def _add_host(self, name: str, i: int, address: str) -> None:
        ns, veth, peer = f"bs{self.tag}h{i}", f"bs{self.tag}v{i}", f"bs{self.tag}p{i}"
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        self.hosts[name] = Host(name, ns, address, veth)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("link", "set", peer, "name", "eth0", ns=ns)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def start(self, host: str, argv: Sequence[str], log_file: Path) -> subprocess.Popen[bytes]:
        """Run ``argv`` inside ``host`` (``ip netns exec`` execs it: the PID is the program's)."""
        h = self.hosts[host]
        with log_file.open("ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", h.ns, *argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        h.procs.append(proc)
        if (tuple(argv), log_file) not in h.started:
            h.started.append((tuple(argv), log_file))
        return proc

    def restart(self, host: str) -> None:
        """Start again everything started on ``host`` (a host back after a crash: its units start)."""
        for argv, log_file in list(self.hosts[host].started):
            self.start(host, argv, log_file)

    def run(self, host: str, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``host`` and wait for it."""
        cmd = ["ip", "netns", "exec", self.hosts[host].ns, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def cut(self, host: str) -> None:
        _ip("link", "set", self.hosts[host].veth, "down")

    def heal(self, host: str) -> None:
        _ip("link", "set", self.hosts[host].veth, "up")

    def pids(self, host: str) -> list[int]:
        """Every process of ``host``: those whose network namespace is the host's (Patroni detaches
        the postmaster it starts, so our own children are not all of them)."""
        try:
            want = os.stat(f"/run/netns/{self.hosts[host].ns}").st_ino
        except FileNotFoundError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{entry}/ns/net").st_ino == want:
                        found.append(int(entry))
        return found

    def _signal(self, host: str, sig: int) -> None:
        for proc in self.hosts[host].procs:
            if proc.poll() is None:  # our own unreaped child: its PID cannot have been reused
                proc.send_signal(sig)
        for pid in self.pids(host):
            # a PID found in the host's namespace a moment ago; pidfd pins it against reuse
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
                try:
                    if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{self.hosts[host].ns}").st_ino:
                        signal.pidfd_send_signal(fd, sig)
                finally:
                    os.close(fd)

    def crash(self, host: str) -> None:
        """Kill every process of ``host`` at once (a power loss)."""
        for _ in range(3):  # processes forked while we kill are caught by the next pass
            self._signal(host, signal.SIGKILL)
        for proc in self.hosts[host].procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def freeze(self, host: str) -> None:
        self._signal(host, signal.SIGSTOP)

    def thaw(self, host: str) -> None:
        self._signal(host, signal.SIGCONT)

    def close(self) -> None:
        for name in list(self.hosts):
            with contextlib.suppress(Exception):
                self.thaw(name)
                self.crash(name)
        for h in self.hosts.values():
            # deleting our end deletes the pair at once (a namespace's own links go only when the
            # kernel frees the namespace, which may come later)
            subprocess.run(["ip", "link", "delete", h.veth], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "delete", h.ns], capture_output=True, check=False)
        if self._made_bridge:
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
        self.hosts.clear()
        self._made_bridge = False

    def leftovers(self) -> list[str]:
        """Namespaces or links of this network still present (empty after :meth:`close`)."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
        return [w for w in (names + links).split() if w.startswith(f"bs{self.tag}") or w.startswith(self.bridge)]
