"""Test-only launcher: run a module with every network destination it uses logged.

    python tests/connection_audit.py LOG_FILE MODULE [ARGS...]

installs a `sys.addaudithook` hook that appends one JSON line per `socket.connect`,
`socket.sendto`, `socket.sendmsg`, `socket.bind` and `socket.getaddrinfo` to LOG_FILE,
then runs MODULE as `__main__` (like `python -m MODULE ARGS...`). Not shipped in
the add-on: tests/worker_process.py uses it for `start_worker(connection_log=...)`.
The same hook runs inside the test process itself (`record_connections`).
"""

from __future__ import annotations

import json
import runpy
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EVENTS = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind", "socket.getaddrinfo"}


def describe(event: str, args: tuple[Any, ...]) -> dict[str, Any] | None:
    """A JSON-able record of one audited socket event, or None for others."""
    if event not in EVENTS:
        return None
    if event == "socket.getaddrinfo":
        host = args[0]
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        return {"event": event, "family": "inet", "host": host, "port": args[1]}
    sock, address = args[0], args[1]
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX or isinstance(address, str | bytes):
        return {"event": event, "family": "unix"}
    if address is None:  # sendmsg on a connected socket
        return {"event": event, "family": "inet", "host": None, "port": None}
    return {"event": event, "family": "inet", "host": str(address[0]), "port": address[1]}


_recording: list[list[dict[str, Any]]] = []
_installed = False
_lock = threading.Lock()


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _recording or event not in EVENTS:
        return
    record = describe(event, args)
    if record is not None:
        with _lock:
            for sink in _recording:
                sink.append(record)


@contextmanager
def record_connections() -> Iterator[list[dict[str, Any]]]:
    """Record this process's socket destinations (every thread) while inside."""
    global _installed  # noqa: PLW0603 - one hook per process
    if not _installed:
        sys.addaudithook(_hook)  # audit hooks cannot be removed: install once
        _installed = True
    sink: list[dict[str, Any]] = []
    _recording.append(sink)
    try:
        yield sink
    finally:
        _recording.remove(sink)


def _file_hook(write: Callable[[str], Any]) -> Callable[[str, tuple[Any, ...]], None]:
    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in EVENTS:
            record = describe(event, args)
            if record is not None:
                with _lock:
                    write(json.dumps(record) + "\n")

    return hook


def main() -> None:
    log_path, module, *rest = sys.argv[1:]
    log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the process
    log.write(json.dumps({"event": "started", "module": module}) + "\n")
    sys.addaudithook(_file_hook(log.write))
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
