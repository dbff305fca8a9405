"""Worker tests talk to real worker processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from worker_process import insecure_connector, tls_closed


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
