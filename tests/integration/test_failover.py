"""No request lost: fail-over before the first token, partial answers, bounded waits.

Every test runs real worker processes on 127.0.0.1 and a real Home Assistant. A
`Tap` watches the household's own worker clients (calls go through unchanged) to
act at the right moment: SIGKILL a worker right after it accepted a request, or
after its first text reached Home Assistant, or freeze it (SIGSTOP) there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time

import pytest
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent
from worker_process import WorkerProcess

from custom_components.hearth import router
from custom_components.hearth.client import StreamTimeouts
from custom_components.hearth.const import (
    CONF_MAX_TOKENS,
    CONF_TEMPERATURE,
    CONNECT_TIMEOUT,
    FIRST_TOKEN_TIMEOUT,
)
from custom_components.hearth.household import Household

from .conftest import Action, Tap, ask, setup_household

# With greedy decoding the tiny model runs this one to max_tokens (thousands of tokens,
# about a second), so a worker stopped after its first delta is stopped mid-answer.
LONG_STORY = "Write a very long story about the sea and the mountains."
# About 5,400 prompt tokens: the tiny model needs ~0.4 s of prefill before its first
# token, while the worker accepts the request (headers, role delta) at once.
LONG_PROMPT = " ".join(["the sea and the mountains"] * 600)
CUT_OFF = "The answer was cut off: the Hearth worker {name} stopped responding."
NO_WORKER = "None of the household's Hearth workers can answer right now."


async def set_up_household(hass: HomeAssistant, workers: dict[str, WorkerProcess]) -> Household:
    household = await setup_household(hass, workers, {CONF_MAX_TOKENS: 4000, CONF_TEMPERATURE: 0.0})
    # Bounds of seconds, not minutes, yet ample for a loaded machine: a worker that is
    # alive gets its first token of LONG_PROMPT out and keeps streaming well within them.
    household.timeouts = StreamTimeouts(connect=10, first_token=30, between_tokens=8, total=60)
    return household


class FrozenClock:
    """Injected time for the household's router: it moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def killer(workers: dict[str, WorkerProcess], sig: signal.Signals = signal.SIGKILL) -> Action:
    def kill(name: str) -> None:
        os.kill(workers[name].process.pid, sig)

    return kill


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
    household = await set_up_household(hass, workers)
    tap = Tap(household)
    killed: list[str] = []
    tap.after_accept = kill_once(workers, killed)
    async with asyncio.timeout(90):
        response = await ask(hass, LONG_PROMPT, 8)
    assert killed == tap.tried[:1]
    assert tap.tried == [killed[0], other(workers, killed[0])]
    assert response["worker"] == other(workers, killed[0])
    assert response["finish_reason"] in ("stop", "length")  # no break-off: the worker finished
    assert response["partial"] is (response["finish_reason"] == "length")
    assert workers[killed[0]].process.wait(5) == -signal.SIGKILL


async def test_failed_worker_leaves_rotation_and_reservations_are_released(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """The live household feeds the router: a failure opens the breaker, answers release.

    The router runs on an injected clock, so the breaker's back-off (2 s) ends only
    when the test says so, however slow the machine is.
    """
    household = await set_up_household(hass, workers)
    clock = FrozenClock()
    household.routing = router.Router(clock)
    tap = Tap(household)
    ids = {handle.name: entry_id for entry_id, handle in household.workers.items()}
    killed: list[str] = []
    tap.after_accept = kill_once(workers, killed)
    async with asyncio.timeout(90):
        await ask(hass, LONG_PROMPT, 8)
    survivor = other(workers, killed[0])
    assert household.routing.breaker_state(ids[killed[0]]) is router.BreakerState.OPEN
    assert household.routing.breaker_state(ids[survivor]) is router.BreakerState.CLOSED
    assert all(household.routing.in_flight(entry_id) == 0 for entry_id in ids.values())

    # Until its back-off ends, the failed worker is tried last, not first.
    tap.tried.clear()
    async with asyncio.timeout(90):
        response = await ask(hass, "hi", 8)
    assert tap.tried == [survivor]
    assert response["worker"] == survivor
    assert all(household.routing.in_flight(entry_id) == 0 for entry_id in ids.values())
    assert household.routing.breaker_state(ids[killed[0]]) is router.BreakerState.OPEN
    clock.now += router.BREAKER_BASE_S
    assert household.routing.breaker_state(ids[killed[0]]) is router.BreakerState.HALF_OPEN


async def test_killed_mid_answer_gives_partial_answer(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """hearth.ask: a cut-off answer is asked again of the next worker (nobody saw it
    yet); when every worker breaks off, the longest answer one produced, flagged
    partial, with the translated reason."""
    household = await set_up_household(hass, workers)
    tap = Tap(household)
    tap.after_first_text = killer(workers)
    started = time.monotonic()
    async with asyncio.timeout(90):
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
    household = await set_up_household(hass, workers)
    tap = Tap(household)
    tap.after_first_text = killer(workers)
    async with asyncio.timeout(90):
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


async def cut_off_by_a_freeze(
    hass: HomeAssistant, household: Household, workers: dict[str, WorkerProcess]
) -> float:
    """LONG_STORY; the worker answering is frozen (SIGSTOP) after its first text, and thawed.

    Assist keeps the part so far with the note naming that worker, which alone was asked.
    Returns the seconds the answer took.
    """
    tap = Tap(household)
    frozen: list[str] = []

    def freeze_once(name: str) -> None:
        if not frozen:
            frozen.append(name)
            os.kill(workers[name].process.pid, signal.SIGSTOP)

    tap.after_first_text = freeze_once
    started = time.monotonic()
    try:
        async with asyncio.timeout(90):
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
    return elapsed


async def test_frozen_mid_answer_times_out_with_partial_answer(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """A worker that stops sending (SIGSTOP) mid-answer: the between-tokens timeout ends
    it, and Assist keeps the answer so far with the note. (hearth.ask would ask the
    next worker instead: nobody saw its answer yet.)"""
    household = await set_up_household(hass, workers)
    elapsed = await cut_off_by_a_freeze(hass, household, workers)
    assert household.timeouts.between_tokens <= elapsed < household.timeouts.between_tokens + 5


async def test_total_timeout_cuts_a_long_answer(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """Only the total bound can end this answer: it stalls after its first text (SIGSTOP)
    while the between-tokens bound is far longer. Assist keeps the part with the note.

    The bounds leave a loaded machine ample time for the first token.
    """
    household = await set_up_household(hass, workers)
    household.timeouts = StreamTimeouts(connect=10, first_token=30, between_tokens=120, total=8)
    elapsed = await cut_off_by_a_freeze(hass, household, workers)
    assert household.timeouts.total <= elapsed < household.timeouts.between_tokens


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
        async with asyncio.timeout(30):  # bounded: never hang the test
            await self.server.wait_closed()


@pytest.mark.parametrize("after_tls", [False, True], ids=["silent-tcp", "silent-after-tls"])
async def test_silent_worker_times_out_then_next_answers(
    hass: HomeAssistant, workers: dict[str, WorkerProcess], after_tls: bool
) -> None:
    """A worker that accepts TCP but never answers: a timeout, then fail-over.

    Silent from the TCP handshake on, the connect bound (TCP + TLS handshake) ends
    the wait; silent after the TLS handshake, the first-token bound does.
    """
    household = await set_up_household(hass, workers)
    alpha = workers["Alpha"]
    tls = None
    if after_tls:
        assert alpha.fingerprint is not None  # an HTTPS worker
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(alpha.state_dir / "tls-cert.pem", alpha.state_dir / "tls-key.pem")
    # Another of our requests (100 s) is open on Beta, so the router tries Alpha first.
    beta_handle = next(h for h in household.workers.values() if h.name == "Beta")
    model = beta_handle.coordinator.info.chat_models[0]
    busy = household.routing.reserve(
        router.Candidate(beta_handle.entry_id, model, 100.0, work_s=100.0),
        router.RouteRequest(purpose="other"),
    )
    # Alpha's process is replaced by a server that accepts and says nothing; its last
    # capacity snapshot (idle) is what the router still sees. (A poll of the silent
    # server only fails after its own timeout, long after the ranking below.)
    alpha.stop()
    silent = SilentServer()
    await silent.start(alpha.port, tls)
    ranked = household.candidates(router.RouteRequest(None, 256, 8))
    by_id = {h.entry_id: h.name for h in household.workers.values()}
    assert [by_id[c.worker_id] for c in ranked] == ["Alpha", "Beta"]

    # The bound under test, well below its default (5 s connect, 60 s first token).
    household.timeouts = StreamTimeouts(connect=2, first_token=5, between_tokens=8, total=60)
    tap = Tap(household)
    try:
        async with asyncio.timeout(60):
            response = await ask(hass, "hi", 8)
    finally:
        # No more polls of Alpha: a connection accepted just as the server closes trips
        # an assertion in asyncio's server.
        alpha_id = next(h.entry_id for h in household.workers.values() if h.name == "Alpha")
        await hass.config_entries.async_unload(alpha_id)
        await silent.close()
    assert tap.tried == ["Alpha", "Beta"]
    assert silent.accepted  # Alpha's port really took the connection
    assert response["worker"] == "Beta"
    assert response["finish_reason"] in ("stop", "length")  # answered to the end
    # How long Alpha was waited for: the bound, not the default (margin for a loaded machine).
    waited = tap.tried_at[1] - tap.tried_at[0]
    if after_tls:
        assert household.timeouts.first_token <= waited < FIRST_TOKEN_TIMEOUT / 2
    else:
        assert household.timeouts.connect <= waited < CONNECT_TIMEOUT
    household.routing.release(busy)


async def test_nothing_produced_raises_translated_error(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """Every worker dies after accepting: hearth.ask raises no_worker, Assist says it."""
    household = await set_up_household(hass, workers)
    tap = Tap(household)
    tap.after_accept = killer(workers)
    with pytest.raises(HomeAssistantError) as err:
        async with asyncio.timeout(90):
            await ask(hass, LONG_PROMPT, 8)
    assert err.value.translation_key == "no_worker"
    assert str(err.value).startswith(NO_WORKER)
    assert sorted(tap.tried) == ["Alpha", "Beta"]
    async with asyncio.timeout(90):
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
    household = await set_up_household(hass, workers)
    tap = Tap(household)
    tap.after_first_text = killer(workers)
    with pytest.raises(HomeAssistantError) as err:
        async with asyncio.timeout(90):
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
