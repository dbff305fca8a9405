"""No request lost: fail-over before the first token, partial answers, bounded waits.

Every test runs real worker processes on 127.0.0.1 and a real Home Assistant. A
`Tap` watches the cluster's own worker clients (calls go through unchanged) to
act at the right moment: SIGKILL a worker right after it accepted a request, or
after its first text reached Home Assistant, or freeze it (SIGSTOP) there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import threading
import time
import urllib.request
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent
from worker_process import WorkerProcess, start_worker

from custom_components.hearth import router
from custom_components.hearth.client import ChatDelta, StreamTimeouts
from custom_components.hearth.cluster import Cluster
from custom_components.hearth.const import (
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_PREFER_LOCAL_INTENTS,
    CONF_TEMPERATURE,
    DOMAIN,
)

from .conftest import entry_for, setup_entry

# With greedy decoding the tiny model runs this one to max_tokens (thousands of tokens,
# about a second), so a worker stopped after its first delta is stopped mid-answer.
LONG_STORY = "Write a very long story about the sea and the mountains."
# About 5,400 prompt tokens: the tiny model needs ~0.4 s of prefill before its first
# token, while the worker accepts the request (headers, role delta) at once.
LONG_PROMPT = " ".join(["the sea and the mountains"] * 600)
CUT_OFF = "The answer was cut off: the Hearth worker {name} stopped responding."
NO_WORKER = "None of the household's Hearth workers can answer right now."

Action = Callable[[str], Awaitable[None] | None]


class Tap:
    """Wraps every loaded worker's `client.chat_stream` to watch and act; data is untouched."""

    def __init__(self, cluster: Cluster) -> None:
        self.tried: list[str] = []  # worker names, in the order the cluster tried them
        self.first_text: list[str] = []  # workers whose first text reached Home Assistant
        self.after_accept: Action | None = None
        self.after_first_text: Action | None = None
        for handle in cluster.workers.values():
            real = handle.client.chat_stream
            handle.client.chat_stream = self._wrap(handle.name, real)  # type: ignore[method-assign]

    def _wrap(self, name: str, real: Any) -> Any:
        async def chat_stream(body: Any, timeouts: Any = None) -> AsyncGenerator[ChatDelta]:
            self.tried.append(name)
            deltas = await real(body, timeouts)
            if self.after_accept is not None:
                await _call(self.after_accept, name)
            return self._watch(name, deltas)

        return chat_stream

    async def _watch(
        self, name: str, deltas: AsyncGenerator[ChatDelta]
    ) -> AsyncGenerator[ChatDelta]:
        try:
            async for delta in deltas:
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


@pytest.fixture
def workers(tiny_chat_model: Path, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    """Two workers of this test alone, "Alpha" and "Beta" (one slot each)."""
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


async def household(hass: HomeAssistant, workers: dict[str, WorkerProcess]) -> Cluster:
    for name, worker in workers.items():
        await setup_entry(hass, entry_for(worker, name))
    cluster: Cluster = hass.data[DOMAIN]
    await cluster.async_update_settings(
        {
            **cluster.settings,
            CONF_LLM_HASS_API: [],
            CONF_PREFER_LOCAL_INTENTS: False,
            CONF_MAX_TOKENS: 4000,
            CONF_TEMPERATURE: 0.0,
        }
    )
    # Short bounds, so a test waits seconds, not minutes.
    cluster.timeouts = StreamTimeouts(connect=2, first_token=3, between_tokens=1.5, total=30)
    return cluster


def killer(workers: dict[str, WorkerProcess], sig: signal.Signals = signal.SIGKILL) -> Action:
    def kill(name: str) -> None:
        os.kill(workers[name].process.pid, sig)

    return kill


async def ask(hass: HomeAssistant, prompt: str, max_tokens: int) -> dict[str, Any]:
    response = await hass.services.async_call(
        DOMAIN,
        "ask",
        {"prompt": prompt, "max_tokens": max_tokens},
        blocking=True,
        return_response=True,
    )
    assert response is not None
    return dict(response)


def kill_once(workers: dict[str, WorkerProcess], killed: list[str]) -> Action:
    """SIGKILL the first worker the action sees (recorded in `killed`); later calls do nothing."""

    def kill(name: str) -> None:
        if not killed:
            killed.append(name)
            os.kill(workers[name].process.pid, signal.SIGKILL)

    return kill


def other(workers: dict[str, WorkerProcess], name: str) -> str:
    return next(n for n in workers if n != name)


async def test_killed_after_accepting_next_worker_answers(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """SIGKILL right after a worker accepted the request (headers, no token yet)."""
    cluster = await household(hass, workers)
    tap = Tap(cluster)
    killed: list[str] = []
    tap.after_accept = kill_once(workers, killed)
    async with asyncio.timeout(20):
        response = await ask(hass, LONG_PROMPT, 8)
    assert killed == tap.tried[:1]
    assert tap.tried == [killed[0], other(workers, killed[0])]
    assert response["worker"] == other(workers, killed[0])
    assert response["partial"] is False
    assert response["error"] is None
    assert workers[killed[0]].process.wait(5) == -signal.SIGKILL


async def test_failed_worker_leaves_rotation_and_reservations_are_released(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """The live cluster feeds the router: a failure opens the breaker, answers release."""
    cluster = await household(hass, workers)
    tap = Tap(cluster)
    ids = {handle.name: entry_id for entry_id, handle in cluster.workers.items()}
    killed: list[str] = []
    tap.after_accept = kill_once(workers, killed)
    async with asyncio.timeout(20):
        await ask(hass, LONG_PROMPT, 8)
    survivor = other(workers, killed[0])
    assert cluster.routing.breaker_state(ids[killed[0]]) is router.BreakerState.OPEN
    assert cluster.routing.breaker_state(ids[survivor]) is router.BreakerState.CLOSED
    assert all(cluster.routing.in_flight(entry_id) == 0 for entry_id in ids.values())

    # Until its back-off ends, the failed worker is tried last, not first.
    tap.tried.clear()
    async with asyncio.timeout(20):
        response = await ask(hass, "hi", 8)
    assert tap.tried == [survivor]
    assert response["worker"] == survivor
    assert all(cluster.routing.in_flight(entry_id) == 0 for entry_id in ids.values())


async def test_killed_mid_answer_gives_partial_answer(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """hearth.ask: a cut-off answer is asked again of the next worker (nobody saw it
    yet); when every worker breaks off, the longest answer one produced, flagged
    partial, with the translated reason."""
    cluster = await household(hass, workers)
    tap = Tap(cluster)
    tap.after_first_text = killer(workers)
    started = time.monotonic()
    async with asyncio.timeout(20):
        response = await ask(hass, LONG_STORY, 4000)
    assert sorted(tap.tried) == ["Alpha", "Beta"]  # once each: the second after the first broke
    assert tap.first_text == tap.tried
    name = response["worker"]
    assert name in tap.tried
    assert response["partial"] is True
    assert response["answer"]
    assert response["error"] == CUT_OFF.format(name=name)
    for worker in workers.values():
        assert worker.process.wait(5) == -signal.SIGKILL
    assert time.monotonic() - started < 15  # a dead connection is noticed at once


async def test_killed_mid_answer_in_conversation(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """Assist: the answer so far, then the translated note; kept in the chat log."""
    cluster = await household(hass, workers)
    tap = Tap(cluster)
    tap.after_first_text = killer(workers)
    async with asyncio.timeout(20):
        result = await conversation.async_converse(
            hass, LONG_STORY, None, Context(), language="en", agent_id="conversation.hearth"
        )
    name = tap.first_text[0]
    assert tap.tried == [name]
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    speech = result.response.speech["plain"]["speech"]
    note = CUT_OFF.format(name=name)
    assert speech.endswith("\n\n" + note)
    assert len(speech) > len(note) + 2  # the part the worker produced comes first


async def test_frozen_mid_answer_times_out_with_partial_answer(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """A worker that stops sending (SIGSTOP) mid-answer: the between-tokens timeout ends
    it, and Assist keeps the answer so far with the note. (hearth.ask would ask the
    next worker instead: nobody saw its answer yet.)"""
    cluster = await household(hass, workers)
    tap = Tap(cluster)
    frozen: list[str] = []

    def freeze_once(name: str) -> None:
        if not frozen:
            frozen.append(name)
            os.kill(workers[name].process.pid, signal.SIGSTOP)

    tap.after_first_text = freeze_once
    started = time.monotonic()
    try:
        async with asyncio.timeout(20):
            result = await conversation.async_converse(
                hass, LONG_STORY, None, Context(), language="en", agent_id="conversation.hearth"
            )
        elapsed = time.monotonic() - started
    finally:
        for name in frozen:
            os.kill(workers[name].process.pid, signal.SIGCONT)
    assert tap.tried == frozen
    speech = result.response.speech["plain"]["speech"]
    note = CUT_OFF.format(name=frozen[0])
    assert speech.endswith("\n\n" + note)
    assert len(speech) > len(note) + 2
    assert cluster.timeouts.between_tokens <= elapsed < cluster.timeouts.between_tokens + 5


async def test_total_timeout_cuts_a_long_answer(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    cluster = await household(hass, workers)
    cluster.timeouts = StreamTimeouts(connect=2, first_token=3, between_tokens=3, total=0.3)
    started = time.monotonic()
    async with asyncio.timeout(20):
        response = await ask(hass, LONG_STORY, 8000)
    assert time.monotonic() - started < 3
    assert response["partial"] is True
    assert response["answer"]


class SilentServer:
    """Accepts connections on 127.0.0.1:`port` and never sends a byte of HTTP.

    With `tls` (the worker's own certificate and key) it completes the TLS
    handshake first; without, it stays silent from the TCP handshake on.
    """

    def __init__(self) -> None:
        self.accepted: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self, port: int, tls: ssl.SSLContext | None) -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted.append(writer)  # and say nothing

        self.server = await asyncio.start_server(
            hold, "127.0.0.1", port, reuse_address=True, ssl=tls
        )

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.accepted:
            writer.close()
        await self.server.wait_closed()


def _post(worker: WorkerProcess, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        worker.url + path,
        data=json.dumps(body).encode(),
        headers={**worker.headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60, context=worker.ssl) as response:
        response.read()


def _capacity(worker: WorkerProcess) -> dict[str, Any]:
    request = urllib.request.Request(worker.url + "/v1/capacity", headers=worker.headers)
    with urllib.request.urlopen(request, timeout=10, context=worker.ssl) as response:
        return dict(json.load(response))


@pytest.mark.parametrize("after_tls", [False, True], ids=["silent-tcp", "silent-after-tls"])
async def test_silent_worker_times_out_then_next_answers(
    hass: HomeAssistant, workers: dict[str, WorkerProcess], after_tls: bool
) -> None:
    """A worker that accepts TCP but never answers: a timeout, then fail-over.

    Silent from the TCP handshake on, the connect bound (TCP + TLS handshake) ends
    the wait; silent after the TLS handshake, the first-token bound does.
    """
    cluster = await household(hass, workers)
    alpha, beta = workers["Alpha"], workers["Beta"]
    tls = None
    if after_tls:
        assert alpha.fingerprint is not None  # an HTTPS worker
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(alpha.state_dir / "tls-cert.pem", alpha.state_dir / "tls-key.pem")
    # Alpha's process is replaced by a server that accepts and says nothing; its last
    # capacity snapshot (idle) is what the router still sees.
    alpha.stop()
    silent = SilentServer()
    await silent.start(alpha.port, tls)
    # Beta really is busy when its snapshot is taken, so the router tries Alpha first.
    busy = threading.Thread(
        target=_post,
        args=(beta, "/v1/chat/completions", {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": LONG_STORY}],
            "max_tokens": 8000,
            "temperature": 0,
        }),
    )  # fmt: skip
    busy.start()
    try:
        deadline = time.monotonic() + 10
        while _capacity(beta)["running"] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        beta_handle = next(h for h in cluster.workers.values() if h.name == "Beta")
        await beta_handle.coordinator.async_refresh()
        assert beta_handle.coordinator.data.running == 1
    finally:
        await hass.async_add_executor_job(busy.join, 60)
    ranked = cluster.candidates(router.RouteRequest(None, 256, 8))
    by_id = {h.entry_id: h.name for h in cluster.workers.values()}
    assert [by_id[c.worker_id] for c in ranked] == ["Alpha", "Beta"]

    tap = Tap(cluster)
    started = time.monotonic()
    try:
        async with asyncio.timeout(20):
            response = await ask(hass, "hi", 8)
    finally:
        await silent.close()
    elapsed = time.monotonic() - started
    assert tap.tried == ["Alpha", "Beta"]
    assert silent.accepted  # Alpha's port really took the connection
    assert response["worker"] == "Beta"
    assert response["partial"] is False
    bound = cluster.timeouts.first_token if after_tls else cluster.timeouts.connect
    assert bound <= elapsed < bound + 5


async def test_nothing_produced_raises_translated_error(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """Every worker dies after accepting: hearth.ask raises no_worker, Assist says it."""
    cluster = await household(hass, workers)
    tap = Tap(cluster)
    tap.after_accept = killer(workers)
    with pytest.raises(HomeAssistantError) as err:
        async with asyncio.timeout(20):
            await ask(hass, LONG_PROMPT, 8)
    assert err.value.translation_key == "no_worker"
    assert str(err.value).startswith(NO_WORKER)
    assert sorted(tap.tried) == ["Alpha", "Beta"]
    async with asyncio.timeout(20):
        result = await conversation.async_converse(
            hass, "hi", None, Context(), language="en", agent_id="conversation.hearth"
        )
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert result.response.speech["plain"]["speech"].startswith(NO_WORKER)


async def test_ai_task_cut_off_raises_translated_error(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """A task's data must be whole: a cut-off answer goes to the next worker; when every
    worker breaks off, it is an error (2026.2.3 leg only)."""
    ai_task = pytest.importorskip("homeassistant.components.ai_task")
    cluster = await household(hass, workers)
    tap = Tap(cluster)
    tap.after_first_text = killer(workers)
    with pytest.raises(HomeAssistantError) as err:
        async with asyncio.timeout(20):
            await ai_task.async_generate_data(
                hass, task_name="story", entity_id="ai_task.hearth", instructions=LONG_STORY
            )
    assert sorted(tap.first_text) == ["Alpha", "Beta"]
    assert tap.first_text == tap.tried
    name = (err.value.translation_placeholders or {})["name"]
    assert name in tap.tried
    assert err.value.translation_key == "answer_cut_off"
    # (Newer Home Assistant drops the final full stop of an exception's message.)
    assert str(err.value).rstrip(".") == CUT_OFF.format(name=name).rstrip(".")
