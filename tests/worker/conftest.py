"""Worker tests talk to real worker processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture(autouse=True)
def _sockets(socket_enabled: None) -> None:
    """pytest-homeassistant-custom-component blocks sockets; these tests need 127.0.0.1."""


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
