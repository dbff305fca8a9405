"""Worker tests talk to real worker processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from worker_process import WorkerProcess, insecure_connector, start_worker, tls_closed


@pytest.fixture(autouse=True)
def _sockets(socket_enabled: None) -> None:
    """pytest-homeassistant-custom-component blocks sockets; these tests need 127.0.0.1."""


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A session for any test worker: HTTPS without checking the certificate.

    These tests are about the API; TLS and pinning have their own tests
    (pass `ssl=worker.ssl` to a request to check the worker's certificate).
    """
    async with aiohttp.ClientSession(connector=insecure_connector()) as session:
        yield session
    await tls_closed()


@pytest.fixture
async def cache_worker(tiny_chat_model: Path, tmp_path: Path) -> AsyncIterator[WorkerProcess]:
    """A worker of this test alone: a 64 MB prompt cache, no warm-up (nothing cached yet)."""
    worker = start_worker(
        [tiny_chat_model], tmp_path, extra=["--no-warmup", "--prompt-cache-mb", "64"]
    )
    yield worker
    assert await worker.astop() == 0, worker.log()
