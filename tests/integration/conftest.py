"""Fixtures for the integration tests: a real Home Assistant, real workers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import model_fixtures
import pytest
import pytest_socket
from fake_worker import FakeWorker
from homeassistant.components import conversation
from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import INSTANCES, MockConfigEntry
from worker_process import WorkerProcess, cli, start_worker, tls_closed

from custom_components.hearth.const import (
    CONF_FINGERPRINT,
    CONF_LLM_HASS_API,
    CONF_NODE_ID,
    CONF_PLAIN_HTTP,
    DOMAIN,
)
from custom_components.hearth.household import Household
from custom_components.hearth.worker_api import ChatDelta


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(
    tls_shutdowns_finish: None, enable_custom_integrations: None
) -> None:
    """Let Home Assistant load custom_components/hearth.

    `enable_custom_integrations` sets up Home Assistant (`hass`); `tls_shutdowns_finish`
    comes first, so that its wait runs after Home Assistant has stopped.
    """


@pytest.fixture(autouse=True)
async def tls_shutdowns_finish(expected_lingering_timers: bool) -> AsyncIterator[None]:
    """Connections Home Assistant closed (an entry reloaded or unloaded, Home Assistant
    stopped) finish their TLS shutdown before the test plugin looks for lingering
    timers: on a loaded machine the worker's answer to it can take a while (this waits
    up to 10 s and returns as soon as they are done). A test that expects a timer to
    stay (a frozen worker never answers) waits 2 s at most. It first lets the loop run
    a moment: a close already scheduled starts its shutdown (and its timer) before the
    wait looks.

    Set up before Home Assistant (`auto_enable_custom_integrations` asks for it first),
    so torn down after Home Assistant has stopped and closed its connections (torn
    down before, it waited while Home Assistant still ran, and a worker slow to answer
    the shutdowns of the stop failed a test now and then). Checked at each end.
    """
    assert not INSTANCES, "set up after Home Assistant: its wait would come too early"
    yield
    assert not INSTANCES, "torn down before Home Assistant stopped"
    await asyncio.sleep(0.05)
    await tls_closed(timeout=2.0 if expected_lingering_timers else 10.0)


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
    yield from _session_worker(tiny_chat_model, tmp_path_factory.mktemp("chat-worker"))


def _session_worker(model: Path, state: Path) -> Iterator[WorkerProcess]:
    """A real worker serving ``model`` for the whole session (a session fixture's body)."""
    pytest_socket.enable_socket()  # session fixtures run before socket_enabled
    worker = start_worker([model], state)
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


def zeroconf_announcement(worker: WorkerProcess, properties: dict[str, str]) -> ZeroconfServiceInfo:
    """What Home Assistant's zeroconf hands the flow when `worker` announces itself from
    127.0.0.1 as kitchen-laptop, with these TXT `properties`."""
    return ZeroconfServiceInfo(
        ip_address=ip_address("127.0.0.1"),
        ip_addresses=[ip_address("127.0.0.1")],
        port=worker.port,
        hostname="kitchen-laptop.local.",
        type="_hearth._tcp.local.",
        name="kitchen-laptop._hearth._tcp.local.",
        properties=properties,
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


def fake_entry(fake: FakeWorker, title: str = "Fake worker") -> MockConfigEntry:
    """An entry for the fake worker as pairing makes it: token, node id, pinned certificate."""
    return MockConfigEntry(
        domain=DOMAIN, title=title, unique_id=fake.node_id, data=fake.entry_data()
    )


async def setup_fake_entry(
    hass: HomeAssistant, fake: FakeWorker, title: str = "Fake worker"
) -> MockConfigEntry:
    entry = fake_entry(fake, title)
    await setup_entry(hass, entry)
    return entry


def suggested(result: Mapping[str, Any]) -> dict[str, Any]:
    """The values a flow's form suggests, by field name."""
    return {
        str(key): key.description.get("suggested_value")
        for key in result["data_schema"].schema
        if key.description
    }


Action = Callable[[str], Awaitable[None] | None]


class Tap:
    """Wraps every loaded worker's `client.chat_stream` to watch and act; data is untouched."""

    def __init__(self, household: Household) -> None:
        self.tried: list[str] = []  # worker names, in the order the household tried them
        self.tried_at: list[float] = []  # when (time.monotonic()) each was tried
        self.bodies: list[dict[str, Any]] = []  # what each was asked
        self.completion_tokens: list[int] = []  # as the workers reported them
        self.first_text: list[str] = []  # workers whose first text reached Home Assistant
        self.before_call: dict[str, Action] = {}  # worker name -> run just before it is asked
        self.after_accept: Action | None = None
        self.after_first_text: Action | None = None
        for handle in household.workers.values():
            real = handle.client.chat_stream
            handle.client.chat_stream = self._wrap(handle.name, real)  # type: ignore[method-assign]

    def _wrap(self, name: str, real: Any) -> Any:
        async def chat_stream(body: Any, *args: Any) -> AsyncGenerator[ChatDelta]:
            self.tried.append(name)
            self.tried_at.append(time.monotonic())
            self.bodies.append(body)
            if hook := self.before_call.get(name):
                await _call(hook, name)
            deltas = await real(body, *args)
            if self.after_accept is not None:
                await _call(self.after_accept, name)
            return self._watch(name, deltas)

        return chat_stream

    async def _watch(
        self, name: str, deltas: AsyncGenerator[ChatDelta]
    ) -> AsyncGenerator[ChatDelta]:
        try:
            async for delta in deltas:
                if delta.completion_tokens:
                    self.completion_tokens.append(delta.completion_tokens)
                yield delta
                if delta.content and name not in self.first_text:
                    self.first_text.append(name)
                    if self.after_first_text is not None:
                        await _call(self.after_first_text, name)
        finally:
            await deltas.aclose()


async def _call(action: Action, name: str) -> None:
    result = action(name)
    if result is not None:
        await result


def user_input(
    text: str, context: Context, conversation_id: str | None = None
) -> conversation.ConversationInput:
    """A conversation input for Hearth's agent, with the fields this Home Assistant has."""
    values = {
        "text": text,
        "context": context,
        "conversation_id": conversation_id,
        "device_id": None,
        "satellite_id": None,
        "language": "en",
        "agent_id": "conversation.hearth",
    }
    names = {f.name for f in dataclasses.fields(conversation.ConversationInput)}
    return conversation.ConversationInput(**{k: v for k, v in values.items() if k in names})


async def ask(hass: HomeAssistant, prompt: str, max_tokens: int) -> dict[str, Any]:
    """hearth.ask, with its response."""
    response = await hass.services.async_call(
        DOMAIN,
        "ask",
        {"prompt": prompt, "max_tokens": max_tokens},
        blocking=True,
        return_response=True,
    )
    assert response is not None
    return dict(response)


async def setup_household(
    hass: HomeAssistant, workers: dict[str, WorkerProcess], settings: Mapping[str, Any]
) -> Household:
    """Each worker as a config entry titled by its key; no Home Assistant tools, `settings`."""
    for name, worker in workers.items():
        await setup_entry(hass, entry_for(worker, name))
    household = Household.get(hass)
    await household.async_update_settings({**household.settings, CONF_LLM_HASS_API: [], **settings})
    return household


@pytest.fixture(scope="session")
def taught_worker(
    taught_chat_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker serving the model taught to call HassTurnOn (tests/model_fixtures.py)."""
    yield from _session_worker(taught_chat_model, tmp_path_factory.mktemp("taught-worker"))


def two_workers(
    tiny_chat_model: Path,
    tmp_path: Path,
    alpha_model: Path | None = None,
    alpha_extra: tuple[str, ...] = (),
) -> dict[str, WorkerProcess]:
    """Alpha and Beta, one slot each, no warm-up (neither has measured rates yet)."""
    common = ["--max-running", "1", "--no-warmup"]
    return {
        "Alpha": start_worker(
            [alpha_model or tiny_chat_model], tmp_path / "Alpha", extra=[*common, *alpha_extra]
        ),
        "Beta": start_worker([tiny_chat_model], tmp_path / "Beta", extra=common),
    }


@pytest.fixture
def workers(tiny_chat_model: Path, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    """Two workers of the test alone, "Alpha" and "Beta" (one slot each; fail-over tests)."""
    started = two_workers(tiny_chat_model, tmp_path)
    yield started
    for worker in started.values():
        if worker.process.poll() is None:
            os.kill(worker.process.pid, signal.SIGCONT)  # in case a test froze it
        worker.stop()


def speech_worker(workdir: Path, *served: Path) -> WorkerProcess:
    """A worker whose models directory holds `served` (links: no copies). Warmed up: its
    self-check at start measures its speech costs (the router's estimates)."""
    models = workdir / "models"
    models.mkdir(parents=True)
    for folder in served:
        (models / folder.name).symlink_to(folder, target_is_directory=True)
    home = workdir / "home"
    home.mkdir()
    return start_worker(
        [],
        workdir,
        extra=["--models-dir", str(models)],
        env={"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")},
    )


def speech_settled(worker: WorkerProcess, timeout: float = 180.0) -> None:
    """Wait until the worker's start-up work is done: its voices loaded and its
    self-check's speech-to-text costs measured (tests then time their own work only)."""
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(worker.url + "/v1/capacity", headers=worker.headers)
        with urllib.request.urlopen(request, timeout=10, context=worker.ssl) as response:
            models = json.load(response)["models"].values()
        if all(
            m.get("stt_fixed_ms") is not None if m.get("kind") == "stt" else m.get("loaded", True)
            for m in models
        ) and any(m.get("kind") == "stt" for m in models):
            return
        assert time.monotonic() < deadline, f"speech not settled: {list(models)}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def speech_workers(
    tmp_path_factory: pytest.TempPathFactory, taught_chat_model: Path
) -> Iterator[dict[str, WorkerProcess]]:
    """Alpha and Beta, each serving the real Piper voice, the real Whisper base and the
    chat model taught to turn on the kitchen light (tests/model_fixtures.py), for the
    speech tests (test_speech_entities.py, test_speech_routing.py). A test that kills
    one starts it again (`restart`)."""
    served = [model_fixtures.piper_voice(), model_fixtures.whisper_base(), taught_chat_model]
    pytest_socket.enable_socket()  # session fixtures run before socket_enabled
    workers = {
        name: speech_worker(tmp_path_factory.mktemp(f"speech-{name}"), *served)
        for name in ("Alpha", "Beta")
    }
    for worker in workers.values():
        speech_settled(worker)
    yield workers
    for worker in workers.values():
        worker.stop()
