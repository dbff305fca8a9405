"""Throwaway test hosts: Linux network namespaces on a private virtual LAN.

    with VirtualLan() as lan:              # 10.213.1.0/24, exists only in its namespaces
        a = lan.add_host("a")              # 10.213.1.1 on its eth0
        b = lan.add_host("b")              # 10.213.1.2
        server = a.python(SCRIPT, stdout=subprocess.PIPE)
        out = OutputLines(server)          # read its stdout lines with timeouts
        b.run("ping", "-c1", a.address)

Every host is its own namespace with ``lo`` up and one veth (``eth0``) plugged into a
bridge that lives in a further namespace of its own, so the host's real interfaces are
never touched and nothing on the LAN can reach anything outside it: no default route,
only the LAN's /24 and multicast (224.0.0.0/4) on ``eth0``. Names are unique per run
(``htest-<pid>-<random>-<label>``); closing the LAN ends the processes started in its
namespaces and deletes them, and a new LAN first deletes leftovers of test runs whose
process is gone. Needs root and iproute2's ``ip``: check ``unavailable_reason()`` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

PREFIX = "htest"
_LABEL = re.compile(r"^[a-z0-9]{1,8}$")
_NAME = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-[a-z0-9]+$")


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here (None when they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "network namespace tests need iproute2's `ip`"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    added = subprocess.run(
        ["ip", "netns", "add", probe], check=False, capture_output=True, text=True
    )
    if added.returncode != 0:
        return f"cannot create a network namespace: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def _pids_in(netns: str) -> list[int]:
    done = subprocess.run(
        ["ip", "netns", "pids", netns], check=False, capture_output=True, text=True
    )
    return [int(pid) for pid in done.stdout.split() if pid.isdigit()]


def _delete_namespace(netns: str) -> None:
    # Only processes inside the test's own namespace: the ones its tests started.
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        pids = _pids_in(netns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _pids_in(netns) and time.monotonic() < deadline:
            time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def _delete_stale_namespaces() -> None:
    """Remove namespaces left by earlier test runs whose process no longer exists."""
    done = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            _delete_namespace(name)
        except PermissionError:
            pass  # that process is alive


@dataclass
class NetnsHost:
    """One test host: a namespace with ``lo`` and ``eth0`` (``address``/``prefixlen``)."""

    label: str
    netns: str
    address: str
    prefixlen: int = 24
    interface: str = "eth0"
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def command(self, *args: str) -> list[str]:
        """``args`` as a command line that runs inside this host."""
        return ["ip", "netns", "exec", self.netns, *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 30, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host and wait for it (text output captured)."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(
            self.command(*args), check=check, timeout=timeout, text=True, **kwargs
        )

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a command inside this host; it is ended when the LAN closes.

        ``ip netns exec`` execs the command itself, so the returned process (its pid,
        its signals) is the command's own.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
        process: subprocess.Popen[str] = subprocess.Popen(
            self.command(*args), text=True, env=env, **kwargs
        )
        self.processes.append(process)
        return process

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Run ``python -c code args...`` (this test run's interpreter) inside this host."""
        return self.popen(sys.executable, "-u", "-c", code, *args, **kwargs)

    def stop_processes(self, timeout: float = 5.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class VirtualLan:
    """A private LAN ``10.213.<subnet>.0/24`` of namespace hosts on one bridge."""

    def __init__(self, subnet: int = 1) -> None:
        if not 0 <= subnet <= 255:
            raise ValueError("subnet is the third octet: 0..255")
        self.network = f"10.213.{subnet}"
        self.run_id = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.run_id}-sw"
        self.hosts: list[NetnsHost] = []
        self._namespaces: list[str] = []
        self._closed = False
        self.here: str | None = None  # this process's address on the LAN (connect_here)
        _delete_stale_namespaces()
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
            _ip("-n", self.switch, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, label: str) -> NetnsHost:
        """A new host ``label`` (1-8 of a-z0-9) with the next free address."""
        if not _LABEL.match(label) or label == "sw":
            raise ValueError(f"host label must be 1-8 of a-z0-9 and not 'sw': {label!r}")
        if any(host.label == label for host in self.hosts) or len(self.hosts) >= 250:
            raise ValueError(f"host {label!r} exists already, or the LAN is full")
        index = len(self.hosts) + 1
        host = NetnsHost(label, f"{self.run_id}-{label}", f"{self.network}.{index}")
        self._add_namespace(host.netns)
        self.hosts.append(host)
        port = f"p{index}"
        # Made inside the switch with its peer born in the host: the real host's
        # interfaces and names are never involved.
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            host.interface,
            "netns",
            host.netns,
        )
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        dev = host.interface
        _ip("-n", host.netns, "addr", "add", f"{host.address}/{host.prefixlen}", "dev", dev)
        _ip("-n", host.netns, "link", "set", dev, "up")
        _ip("-n", host.netns, "route", "add", "224.0.0.0/4", "dev", dev)
        return host

    def connect_here(self) -> str:
        """Plug this test process's own namespace into the LAN; returns its address (.254).

        One veth: one end on the LAN's bridge, the other here, with the LAN's /24 and
        nothing else (no default route, no multicast route: a multicast user binds to
        this address). It is deleted with the switch namespace (a veth pair dies
        together), so ``close()`` or the next run's stale clean-up removes it.
        """
        if self.here is not None:
            return self.here
        address = f"{self.network}.254"
        local = f"h{os.getpid() % 100000}{secrets.token_hex(2)}"[:15]
        _ip(
            "-n", self.switch, "link", "add", "here", "type", "veth",
            "peer", "name", local, "netns", str(os.getpid()),
        )  # fmt: skip
        _ip("-n", self.switch, "link", "set", "here", "master", "br0")
        _ip("-n", self.switch, "link", "set", "here", "up")
        _ip("addr", "add", f"{address}/24", "dev", local)
        _ip("link", "set", local, "up")
        self.here = address
        return address

    def cut(self, host: NetnsHost) -> None:
        """Pull ``host``'s cable: delete its veth (its ``eth0`` goes too), no goodbye sent."""
        _ip("-n", self.switch, "link", "del", f"p{self.hosts.index(host) + 1}")

    def close(self) -> None:
        """End every process started in the LAN's namespaces and delete them."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            host.stop_processes()
        for name in reversed(self._namespaces):
            _delete_namespace(name)

    def __enter__(self) -> VirtualLan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class OutputLines:
    """Collects a process's stdout lines on a thread; ``expect`` waits for one.

    Lines that are JSON objects are parsed; others are kept as ``{"text": line}``.
    ``close()`` (or the process ending) finishes the thread; call it before the test
    ends, as Home Assistant's test plugin fails tests that leave threads behind.
    """

    def __init__(self, process: subprocess.Popen[str]) -> None:
        if process.stdout is None:
            raise ValueError("start the process with stdout=subprocess.PIPE")
        self.process = process
        self.seen: list[dict[str, Any]] = []
        self._ended = False
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            self._queue.put(item if isinstance(item, dict) else {"text": line})
        self._queue.put(None)

    def expect(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str = ""
    ) -> dict[str, Any]:
        """The next line that matches ``predicate``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._ended:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._ended = True
                break
            self.seen.append(item)
            if predicate(item):
                return item
        state = "output ended" if self._ended else f"timed out after {timeout} s"
        raise AssertionError(f"{state} waiting for {what or 'a matching line'}; seen: {self.seen}")

    def close(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._thread.join(timeout)
