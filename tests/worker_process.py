"""Start real `hearth-worker serve` processes for tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"listening on (http://[^\s:]+:(\d+))")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (for tests of unreachable workers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class WorkerProcess:
    """A running worker: its URL, state dir, log file and process."""

    url: str
    port: int
    state_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    token: str | None = None
    args: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def astop(self, timeout: float = 10.0) -> int:
        """Like stop(), without blocking the event loop (the worker may call back into it)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            for _ in range(int(timeout / 0.05)):
                if self.process.poll() is not None:
                    break
                await asyncio.sleep(0.05)
        return self.stop()

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def cli(state_dir: Path, *args: str) -> str:
    """Run a `hearth-worker` subcommand against a state dir; returns stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "hearth_worker", "--state-dir", str(state_dir), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout


def start_worker(
    models: list[Path],
    workdir: Path,
    *,
    token: bool = True,
    host: str = "127.0.0.1",
    extra: list[str] | None = None,
    advertise: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> WorkerProcess:
    """Start a worker on a free port (it picks one) and wait until it listens.

    With `token`, a token is issued in its state dir first (pairing over HTTP
    has its own tests), so the returned worker is ready to use.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    state_dir = workdir / "state"
    log_path = workdir / "worker.log"
    issued = None
    if token:
        from hearth_worker.auth import AuthStore

        issued, _ = AuthStore(state_dir).create_token("tests")
    args = [
        sys.executable,
        "-m",
        "hearth_worker",
        "--state-dir",
        str(state_dir),
        "serve",
        "--host",
        host,
        "--port",
        "0",
        *([] if advertise else ["--no-advertise"]),
        *[arg for model in models for arg in ("--model", str(model))],
        *(extra or []),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    deadline = time.monotonic() + timeout
    log_text = ""
    while not (ready := READY.search(log_text)):
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{log_text}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"worker did not start in {timeout} s:\n{log_text}")
        time.sleep(0.05)
        log_text = log_path.read_text(encoding="utf-8", errors="replace")
    return WorkerProcess(
        url=ready.group(1),
        port=int(ready.group(2)),
        state_dir=state_dir,
        log_path=log_path,
        process=process,
        token=issued,
        args=args,
    )
