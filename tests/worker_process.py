"""Start real `hearth-worker serve` processes for tests and benchmarks.

Workers serve HTTPS by default, with the self-signed certificate they make in
their state dir on first start (as in production); `plain_http=True` starts one
with `--plain-http`. To talk to one:

* aiohttp: `session.get(worker.url + ..., ssl=worker.ssl)` (verifies against this
  worker's certificate), or a session made with `insecure_connector()`;
* urllib: `urllib.request.urlopen(request, context=worker.ssl)`;
* httpx / openai: `httpx.AsyncClient(verify=worker.ssl)`;
* Home Assistant: entry data with `worker.fingerprint` (`tests/integration/conftest.py`
  `entry_for` does it).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

READY = re.compile(r"listening on (https?://[^\s:]+:(\d+))")
AUDIT_LAUNCHER = Path(__file__).with_name("connection_audit.py")


def insecure_ssl() -> ssl.SSLContext:
    """A client context that accepts any certificate (tests of other things than TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def insecure_connector() -> Any:
    """An aiohttp connector that accepts any certificate, for sessions used with many workers."""
    import aiohttp

    return aiohttp.TCPConnector(ssl=False)


async def tls_closed(timeout: float = 2.0) -> None:
    """Wait until closed TLS connections finished their shutdown handshake.

    asyncio keeps a timer per closing TLS connection until the peer answers;
    Home Assistant's test plugin fails a test that leaves timers behind. What still
    waits at the end is printed to stderr (peer, state), which pytest shows with a
    failing test's output (a test that expects a timer to stay prints it too).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and _closing_tls(loop):
        await asyncio.sleep(0.01)
    for protocol in _closing_tls(loop):
        transport = getattr(protocol, "_transport", None)
        peer = transport.get_extra_info("peername") if transport is not None else None
        print(
            f"tls_closed: after {timeout:g} s, TLS with {peer} still waits for the peer: "
            f"state {getattr(protocol, '_state', '?')}, "
            f"eof received {getattr(protocol, '_eof_received', '?')}",
            file=sys.stderr,
        )


def _closing_tls(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """The TLS protocols of `loop` with a timer pending: a handshake or a shutdown
    waiting for the peer."""
    return [
        getattr(handle._callback, "__self__", None)
        for handle in getattr(loop, "_scheduled", [])
        if not handle.cancelled() and "SSLProtocol" in repr(handle)
    ]


async def generators_closed() -> None:
    """openai stops reading at `[DONE]` and leaves its SSE generators to the garbage
    collector; collect them now, so that their clean-up tasks end within the test
    (when the collector ran is otherwise a matter of timing)."""
    quiet = 0  # each closed generator leaves the next one to the collector: a cascade
    for _ in range(500):
        gc.collect()
        busy = any("athrow" in repr(task) for task in asyncio.all_tasks())
        quiet = 0 if busy else quiet + 1
        if quiet >= 10:
            return
        await asyncio.sleep(0.01)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (for tests of unreachable workers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def fake_supervisor(
    discovery: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A Supervisor on 127.0.0.1 whose `/discovery` (POST, DELETE) `discovery` answers; its URL."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/discovery", discovery)
    app.router.add_delete("/discovery/{uuid}", discovery)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


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
    env: dict[str, str] = field(default_factory=dict)  # what the process was started with

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def plain_http(self) -> bool:
        return self.url.startswith("http://")

    @property
    def cert_path(self) -> Path:
        return self.state_dir / "tls-cert.pem"

    @property
    def fingerprint(self) -> str | None:
        """SHA-256 of the worker's certificate (hex), None for a plain-HTTP worker."""
        if self.plain_http:
            return None
        der = ssl.PEM_cert_to_DER_cert(self.cert_path.read_text(encoding="ascii"))
        return hashlib.sha256(der).hexdigest()

    @property
    def ssl(self) -> ssl.SSLContext | None:
        """A client context that trusts exactly this worker's certificate (None: plain HTTP).

        Works with aiohttp (`ssl=`), urllib (`context=`) and httpx (`verify=`).
        """
        if self.plain_http:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # pinned: the certificate is the only trust anchor
        context.load_verify_locations(cafile=str(self.cert_path))
        return context

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


# Where a worker pulls from unless a test gives it a fake hub: a closed local port.
NO_HUB = "http://127.0.0.1:9"


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
    plain_http: bool = False,
    connection_log: Path | None = None,
) -> WorkerProcess:
    """Start a worker on a free port (it picks one) and wait until it listens.

    With `token`, a token is issued in its state dir first (pairing over HTTP
    has its own tests), so the returned worker is ready to use. HTTPS unless
    `plain_http`. With `connection_log`, every socket the worker process
    connects or sends to is logged there (`tests/connection_audit.py`).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    state_dir = workdir / "state"
    log_path = workdir / "worker.log"
    issued = None
    if token:
        from hearth_worker.auth import AuthStore

        issued, _ = AuthStore(state_dir).create_token("tests")
    launcher = [str(AUDIT_LAUNCHER), str(connection_log)] if connection_log else ["-m"]
    args = [
        sys.executable,
        *launcher,
        "hearth_worker",
        "--state-dir",
        str(state_dir),
        "serve",
        "--host",
        host,
        "--port",
        "0",
        *([] if advertise else ["--no-advertise"]),
        *(["--plain-http"] if plain_http else []),
        *[arg for model in models for arg in ("--model", str(model))],
        *(extra or []),
    ]
    # A worker that pulls goes to a test's fake hub (env), never to huggingface.co.
    process_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_ENDPOINT": NO_HUB, **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=process_env)
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
        env=process_env,
    )


def start_worker_serving(folders: list[Path], workdir: Path) -> WorkerProcess:
    """A worker whose models directory links `folders` (no copies), with a HOME, TMPDIR
    and XDG_CACHE_HOME of its own (`workdir`/home, /tmp), to see they stay empty."""
    models = workdir / "models"
    models.mkdir()
    for folder in folders:
        (models / folder.name).symlink_to(folder, target_is_directory=True)
    home, scratch = workdir / "home", workdir / "tmp"
    home.mkdir()
    scratch.mkdir()
    return start_worker(
        [],
        workdir,
        extra=["--models-dir", str(models)],
        env={"HOME": str(home), "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(home / ".cache")},
    )
