"""Fixtures for the integration tests: a real Home Assistant, real workers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_socket
from fake_worker import FakeWorker
from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockConfigEntry
from worker_process import WorkerProcess, cli, start_worker, tls_closed

from custom_components.hearth.const import (
    CONF_FINGERPRINT,
    CONF_NODE_ID,
    CONF_PLAIN_HTTP,
    DOMAIN,
)


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Let Home Assistant load custom_components/hearth."""


@pytest.fixture(autouse=True)
async def tls_shutdowns_finish() -> AsyncIterator[None]:
    """Connections Home Assistant closed (an entry reloaded or unloaded, Home Assistant
    stopped) finish their TLS shutdown before the test plugin looks for lingering
    timers: on a loaded machine the worker's answer to it can take a moment. Set up
    before Home Assistant (defined before auto_setup_ha), so torn down after it."""
    yield
    await tls_closed()


@pytest.fixture(autouse=True)
async def auto_setup_ha(request: pytest.FixtureRequest) -> None:
    """Tests with a Home Assistant get the components Hearth's dependencies need first."""
    if "hass" in request.fixturenames:
        await setup_ha(request.getfixturevalue("hass"))


@pytest.fixture(autouse=True)
def auto_socket_enabled(socket_enabled: None) -> None:
    """The tests talk to real worker processes on 127.0.0.1."""


def pairing_code(worker: WorkerProcess) -> str:
    """Make the worker show a pairing code, as a user would with `hearth-worker pair`."""
    out = cli(worker.state_dir, "pair")
    match = re.search(r"Pairing code:\s*(\S+)", out)
    assert match, out
    return match.group(1)


def worker_info(worker: WorkerProcess) -> dict[str, Any]:
    request = urllib.request.Request(worker.url + "/v1/info", headers=worker.headers)
    with urllib.request.urlopen(request, timeout=10, context=worker.ssl) as response:
        return dict(json.load(response))


def restart(worker: WorkerProcess, timeout: float = 60.0, *, drop: str | None = None) -> None:
    """Start a stopped worker again on the same port, state dir and environment (a fake
    hub's address included), without the flag `drop` and its values; wait until it answers."""
    worker.stop()
    args = list(worker.args)
    args[args.index("--port") + 1] = str(worker.port)  # the port it picked the first time
    while drop in args:
        del args[args.index(drop) : args.index(drop) + 2]
    with worker.log_path.open("ab") as log:
        worker.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=worker.env or None
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(worker.url + "/v1/health", timeout=2, context=worker.ssl):
                return
        except OSError:
            if time.monotonic() > deadline or worker.process.poll() is not None:
                raise
            time.sleep(0.1)


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeWorker]:
    """A fake worker in the test's event loop, for the fast tests (tests/fake_worker.py)."""
    async with FakeWorker(tmp_path / "fake") as worker:
        yield worker
    await tls_closed()


@pytest.fixture(scope="session")
def chat_worker(
    tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One real worker serving the tiny chat model, with a token."""
    pytest_socket.enable_socket()  # session fixtures run before socket_enabled
    worker = start_worker([tiny_chat_model], tmp_path_factory.mktemp("chat-worker"))
    yield worker
    worker.stop()


@pytest.fixture
def own_worker(tiny_chat_model: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker of this test alone, with a token (for stopping and restarting)."""
    worker = start_worker([tiny_chat_model], tmp_path / "own-worker")
    yield worker
    worker.stop()


@pytest.fixture
def fresh_worker(tiny_chat_model: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker of this test alone (never paired), for pairing and restarts."""
    worker = start_worker([tiny_chat_model], tmp_path / "worker", token=False)
    yield worker
    worker.stop()


def entry_for(worker: WorkerProcess, title: str = "Test worker") -> MockConfigEntry:
    """An entry as pairing makes it: token, node id and the pinned certificate."""
    node_id = worker_info(worker)["node_id"]
    return MockConfigEntry(
        domain=DOMAIN,
        title=title,
        unique_id=node_id,
        data={
            CONF_HOST: "127.0.0.1",
            CONF_PORT: worker.port,
            CONF_TOKEN: worker.token,
            CONF_NODE_ID: node_id,
            CONF_FINGERPRINT: worker.fingerprint,
            CONF_PLAIN_HTTP: worker.plain_http,
        },
    )


async def setup_ha(hass: HomeAssistant) -> None:
    """The components Assist needs, before Hearth (idempotent)."""
    assert await async_setup_component(hass, "homeassistant", {})
    assert await async_setup_component(hass, "conversation", {})
    assert await async_setup_component(hass, "intent", {})


async def setup_entry(hass: HomeAssistant, entry: MockConfigEntry) -> None:
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()


@pytest.fixture(scope="session")
def taught_worker(
    taught_chat_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker serving the model taught to call HassTurnOn (tests/model_fixtures.py)."""
    pytest_socket.enable_socket()  # session fixtures run before socket_enabled
    worker = start_worker([taught_chat_model], tmp_path_factory.mktemp("taught-worker"))
    yield worker
    worker.stop()


@pytest.fixture
def workers(tiny_chat_model: Path, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    """Two workers of the test alone, "Alpha" and "Beta" (one slot each; fail-over tests)."""
    started = {
        name: start_worker(
            [tiny_chat_model], tmp_path / name, extra=["--max-running", "1", "--no-warmup"]
        )
        for name in ("Alpha", "Beta")
    }
    yield started
    for worker in started.values():
        if worker.process.poll() is None:
            os.kill(worker.process.pid, signal.SIGCONT)  # in case a test froze it
        worker.stop()
