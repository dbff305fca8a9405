"""Connection limits, against a real worker process.

Idle and slow (dripping) clients cannot hold the worker's connections or
memory: a connection must finish its request headers within the header
deadline, an idle kept-alive one is closed after the keep-alive timeout, and
connections are capped per source address and in total, while a normal
client is still answered. Sources other than 127.0.0.1 are other loopback
addresses (all of 127.0.0.0/8 is this machine on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from worker_process import WorkerProcess, insecure_ssl, start_worker, tls_closed

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs 127.0.0.0/8 sources")

HEADER_TIMEOUT_S = 2.0
KEEPALIVE_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64
MAX_PER_CLIENT = 16
# Far beyond any deadline above; only reached when a connection is never closed.
CLOSE_BOUND_S = 40.0
FLOOD = 600
FLOOD_SOURCES = 12
# 600 idle TLS connections held cost the worker well over 100 MB; held to the cap,
# they cost a few MB.
RSS_GROWTH_BOUND = 48 * 1024 * 1024

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def connect(worker: WorkerProcess, source: str) -> Stream:
    context: ssl.SSLContext | None = None if worker.plain_http else insecure_ssl()
    return await asyncio.open_connection(
        "127.0.0.1",
        worker.port,
        ssl=context,
        server_hostname="localhost" if context else None,
        local_addr=(source, 0),
    )


async def closed_by_worker(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the worker closes the connection within `timeout` (reading what it sends)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, deadline - loop.time())):
                    if not await reader.read(65536):
                        return True
    except (ConnectionError, ssl.SSLError):
        return True
    return False


async def drip(stream: Stream) -> bool:
    """Send a request's headers one byte at a time, never finishing; True once closed."""
    reader, writer = stream
    request = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n" + b"X-Slow: " + b"a" * 1000
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_BOUND_S
    for byte in request:
        if loop.time() > deadline:
            return False
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return True
        if await closed_by_worker(reader, 0.2):
            return True
    return False


def abort(streams: list[Stream]) -> None:
    for _, writer in streams:
        writer.transport.abort()


async def health_ok(worker: WorkerProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(worker.url + "/v1/health", ssl=worker.ssl) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    async with (
        aiohttp.ClientSession() as session,
        session.get(worker.url + "/v1/info", ssl=worker.ssl, headers=worker.headers) as resp,
    ):
        assert resp.status == 200


@pytest.fixture
def limited_worker(tiny_chat_model: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = start_worker(
        [tiny_chat_model],
        tmp_path,
        extra=[
            "--no-warmup",
            "--header-timeout",
            str(HEADER_TIMEOUT_S),
            "--keepalive-timeout",
            str(KEEPALIVE_TIMEOUT_S),
            "--max-connections",
            str(MAX_CONNECTIONS),
            "--max-connections-per-client",
            str(MAX_PER_CLIENT),
        ],
    )
    yield worker
    assert worker.stop() == 0, worker.log()


async def test_slow_and_idle_connections_are_closed(limited_worker: WorkerProcess) -> None:
    worker = limited_worker
    drips = [await connect(worker, "127.0.0.3") for _ in range(3)]
    silent = await connect(worker, "127.0.0.4")
    kept_alive = await connect(worker, "127.0.0.5")
    try:
        # A finished request, then nothing: closed after the keep-alive timeout.
        reader, writer = kept_alive
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        dripped = await asyncio.gather(*(drip(stream) for stream in drips))
        assert all(dripped), "a connection dripping its headers was never closed"
        assert await closed_by_worker(silent[0], CLOSE_BOUND_S), "a silent connection stayed"
        assert await closed_by_worker(reader, CLOSE_BOUND_S), "an idle connection stayed"
        await health_ok(worker)
    finally:
        abort([*drips, silent, kept_alive])
        await tls_closed()


async def test_many_connections_cost_bounded_memory(limited_worker: WorkerProcess) -> None:
    worker = limited_worker
    await health_ok(worker)  # the first request's one-time costs before measuring
    before = rss(worker.process.pid)
    streams: list[Stream] = []
    refused = 0
    try:
        for first in range(0, FLOOD, 50):
            batch = await asyncio.gather(
                *(
                    connect(worker, f"127.0.1.{1 + i % FLOOD_SOURCES}")
                    for i in range(first, first + 50)
                ),
                return_exceptions=True,
            )
            for result in batch:
                if isinstance(result, BaseException):
                    refused += 1
                else:
                    streams.append(result)
        await asyncio.sleep(0.5)  # let refusals and evictions land
        # A client with its own address is still answered while the flood holds on.
        await health_ok(worker)
        open_now = [s for s in streams if not await closed_by_worker(s[0], 0.01)]
        grown = rss(worker.process.pid) - before
        print(
            f"flood: {len(streams)} handshakes, {refused} refused, {len(open_now)} open; "
            f"worker RSS grew {grown / 2**20:.1f} MiB"
        )
        assert grown < RSS_GROWTH_BOUND, f"worker RSS grew {grown / 2**20:.1f} MiB"
        assert len(open_now) <= MAX_CONNECTIONS
    finally:
        abort(streams)
        await tls_closed()
    await health_ok(worker)


async def test_client_that_keeps_opening_connections_is_still_answered(
    limited_worker: WorkerProcess,
) -> None:
    """A client at its cap that connects again has its oldest (idle) connection
    closed instead of being refused: clients that open a connection per request
    and keep the old ones idle still work."""
    worker = limited_worker
    streams: list[Stream] = []
    try:
        for _ in range(MAX_PER_CLIENT + 8):
            stream = await connect(worker, "127.0.0.6")
            streams.append(stream)
            reader, writer = stream
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
        await asyncio.sleep(0.5)
        open_now = [s for s in streams if not await closed_by_worker(s[0], 0.05)]
        assert len(open_now) <= MAX_PER_CLIENT
        assert streams[-1] in open_now
    finally:
        abort(streams)
        await tls_closed()
