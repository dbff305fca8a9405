"""The router wired into the household, end to end, with real workers on 127.0.0.1.

`tests/integration/test_router.py` checks the policy on plain data; these tests
check that the household feeds it and follows it: fail-over on a worker's 429 and
4xx, a probe that ends with no verdict, a conversation's second turn, answer
lengths learned from a real stream, capacity snapshots, the model fallback and
offline workers.

A `Tap` (conftest) wraps every loaded worker's `client.chat_stream` (calls go through
unchanged) to see which worker was asked, with what, and to act just before a
worker is asked. Which worker the router prefers is set up the way it happens in
a household: one worker has another of this Home Assistant's requests open
(a reservation), so the other one looks sooner done.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import intent
from worker_process import WorkerProcess, tls_closed

from custom_components.hearth import router
from custom_components.hearth.const import (
    CONF_CHAT_MODEL,
    CONF_MAX_TOKENS,
    CONF_TEMPERATURE,
)
from custom_components.hearth.household import Household, WorkerHandle
from custom_components.hearth.worker_api import ChatDelta

from . import conftest
from .conftest import Tap, entry_for, setup_entry, setup_household, two_workers

# Far more tokens than any test reads: a stream that is not read holds its slot.
HOLD_TOKENS = 8000
# About 1,800 prompt tokens for the tiny model's tokenizer (~9 a repetition).
LONG_PROMPT = " ".join(["the sea and the mountains"] * 200)
# With greedy decoding the tiny model runs this one to max_tokens.
LONG_STORY = "Write a very long story about the sea and the mountains."
SMALL_CONTEXT = 512


class Clock:
    """Injected time for the household's router: it moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SpyRouter(router.Router):
    """The real router; remembers what it was asked to rank."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.requests: list[router.RouteRequest] = []
        self.before_rank: Callable[[list[router.WorkerState], router.RouteRequest], None] | None = (
            None
        )

    def rank(
        self, workers: Iterable[router.WorkerState], request: router.RouteRequest
    ) -> list[router.Candidate]:
        states = list(workers)
        self.requests.append(request)
        if self.before_rank is not None:
            self.before_rank(states, request)
        return super().rank(states, request)


async def stop_all(workers: dict[str, WorkerProcess]) -> None:
    for worker in workers.values():
        await worker.astop()


async def set_up_household(
    hass: HomeAssistant, workers: dict[str, WorkerProcess], **settings: Any
) -> tuple[Household, SpyRouter, Clock]:
    """The workers as config entries; the household's router on an injected clock."""
    household = await setup_household(
        hass, workers, {CONF_MAX_TOKENS: 8, CONF_TEMPERATURE: 0.0, **settings}
    )
    clock = Clock()
    spy = SpyRouter(clock)
    household.routing = spy  # the snapshot listeners and every request use it from now on
    for entry_id in household.workers:
        spy.observe_snapshot(entry_id)
    return household, spy, clock


def handle(household: Household, name: str) -> WorkerHandle:
    return next(h for h in household.workers.values() if h.name == name)


def keep_busy(household: Household, name: str, seconds: float = 100.0) -> router.Reservation:
    """Another of our requests, `seconds` long, open on `name`: the router prefers the other."""
    worker = handle(household, name)
    model = worker.coordinator.info.chat_models[0]
    candidate = router.Candidate(worker.entry_id, model, seconds, work_s=seconds)
    return household.routing.reserve(candidate, router.RouteRequest(purpose="other"))


async def ask(hass: HomeAssistant, prompt: str, max_tokens: int = 8) -> dict[str, Any]:
    async with asyncio.timeout(60):
        return await conftest.ask(hass, prompt, max_tokens)


async def converse(hass: HomeAssistant, text: str, conversation_id: str | None = None) -> Any:
    async with asyncio.timeout(60):
        return await conversation.async_converse(
            hass, text, conversation_id, Context(), language="en", agent_id="conversation.hearth"
        )


async def first_turn_on_alpha(
    hass: HomeAssistant, workers: dict[str, WorkerProcess], text: str
) -> tuple[Household, SpyRouter, Tap, Any]:
    """The household set up; a first Assist turn, while Beta is kept busy, is answered
    (an action done) by Alpha; then Beta is free again. Returns the turn's result."""
    household, spy, _ = await set_up_household(hass, workers)
    recorder = Tap(household)
    busy = keep_busy(household, "Beta")
    first = await converse(hass, text)
    assert first.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert recorder.tried == ["Alpha"]
    spy.release(busy)
    return household, spy, recorder, first


def assert_beta_answered_alpha_stays(
    household: Household, spy: SpyRouter, recorder: Tap, response: dict[str, Any]
) -> None:
    """Alpha was asked first and failed over to Beta, which answered to the end; Alpha's
    breaker stays closed and nothing of ours is left open there."""
    assert recorder.tried == ["Alpha", "Beta"]
    assert response["worker"] == "Beta"
    assert response["finish_reason"] in ("stop", "length")  # answered to the end
    assert response["answer"]
    alpha_id = handle(household, "Alpha").entry_id
    assert spy.breaker_state(alpha_id) is router.BreakerState.CLOSED
    assert spy.in_flight(alpha_id) == 0


async def test_busy_worker_429_fails_over(
    hass: HomeAssistant, tiny_chat_model: Path, tmp_path: Path
) -> None:
    """Alpha's one slot is taken by another client the moment it is asked: 429, Beta answers."""
    workers = two_workers(tiny_chat_model, tmp_path, alpha_extra=("--max-queued", "0"))
    alpha = workers["Alpha"]
    session = aiohttp.ClientSession()
    held: list[aiohttp.ClientResponse] = []
    try:
        household, spy, _ = await set_up_household(hass, workers)
        recorder = Tap(household)
        busy = keep_busy(household, "Beta")

        async def take_the_slot(name: str) -> None:
            """Another client starts a long answer on Alpha and holds it (does not read)."""
            response = await session.post(
                alpha.url + "/v1/chat/completions",
                json={
                    "model": handle(household, "Alpha").coordinator.info.chat_models[0],
                    "messages": [{"role": "user", "content": LONG_STORY}],
                    "max_tokens": HOLD_TOKENS,
                    "stream": True,
                },
                headers=alpha.headers,
                ssl=alpha.ssl or False,
            )
            held.append(response)
            assert response.status == 200
            await response.content.readline()

        recorder.before_call["Alpha"] = take_the_slot
        response = await ask(hass, "hi")
        # Busy is not broken: Alpha stays in rotation, nothing of ours is left open there.
        assert_beta_answered_alpha_stays(household, spy, recorder, response)
        spy.release(busy)
    finally:
        for holder in held:
            holder.close()
        await session.close()
        await stop_all(workers)
        await tls_closed()


@pytest.fixture
def small_context_model(tiny_chat_model: Path, tmp_path: Path) -> Path:
    """The tiny model, set up with a 512-token context (as a smaller model would be)."""
    folder = tmp_path / "small-context"
    shutil.copytree(tiny_chat_model, folder)
    manifest = json.loads((folder / "hearth-model.json").read_text())
    manifest["context_length"] = SMALL_CONTEXT
    (folder / "hearth-model.json").write_text(json.dumps(manifest))
    return folder


async def test_refusing_worker_4xx_fails_over(
    hass: HomeAssistant, small_context_model: Path, tiny_chat_model: Path, tmp_path: Path
) -> None:
    """A prompt too long for Alpha's context: Alpha answers 400, Beta (8,192 tokens) answers."""
    workers = two_workers(tiny_chat_model, tmp_path, small_context_model)
    try:
        household, spy, _ = await set_up_household(hass, workers)
        recorder = Tap(household)
        busy = keep_busy(household, "Beta")
        response = await ask(hass, LONG_PROMPT)
        # The request, not the worker, was the problem: Alpha is not taken out of rotation.
        assert_beta_answered_alpha_stays(household, spy, recorder, response)
        spy.release(busy)
    finally:
        await stop_all(workers)


async def test_probe_ending_without_verdict_frees_the_probe(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """A half-open worker's probe is dropped by its caller (no success, no failure).

    The worker stays half-open and the next request may probe it again; a whole
    answer then closes its breaker.
    """
    household, spy, clock = await set_up_household(hass, workers)
    recorder = Tap(household)
    alpha_id = handle(household, "Alpha").entry_id
    busy = keep_busy(household, "Beta")
    spy.report_failure(alpha_id)  # an earlier failure
    assert spy.breaker_state(alpha_id) is router.BreakerState.OPEN
    clock.now += router.BREAKER_BASE_S
    assert spy.breaker_state(alpha_id) is router.BreakerState.HALF_OPEN

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    async with asyncio.timeout(60):
        stream = await household.async_open_chat(body)
        assert stream.worker.name == "Alpha"  # the probe
        # While it runs, nobody else probes Alpha: it is a last resort.
        ranked = household.candidates(router.RouteRequest())
        assert [c.worker_id for c in ranked][-1:] == [alpha_id]
        assert "breaker_half_open" in ranked[-1].reasons
        await anext(aiter(stream.deltas))
        await cast(
            AsyncGenerator[ChatDelta], stream.deltas
        ).aclose()  # e.g. the user went away: no verdict
    assert spy.breaker_state(alpha_id) is router.BreakerState.HALF_OPEN
    assert spy.in_flight(alpha_id) == 0

    response = await ask(hass, "hi")
    assert recorder.tried == ["Alpha", "Alpha"]  # probed again, not left out
    assert response["worker"] == "Alpha"
    assert spy.breaker_state(alpha_id) is router.BreakerState.CLOSED
    spy.release(busy)


async def test_second_turn_stays_on_its_worker(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """Through the agent: turn 2 goes back to turn 1's worker though the other looks faster.

    Just before turn 2 is ranked, turn 1's worker is made to look 1.25x slower than
    the other (another of our requests open on it), within the 1.5x that stickiness
    tolerates: without the conversation the other worker would be asked.
    """
    household, spy, recorder, first = await first_turn_on_alpha(hass, workers, "hello")
    alpha_id = handle(household, "Alpha").entry_id
    assert spy.sticky_worker(first.conversation_id) == alpha_id

    without_conversation: list[str] = []

    def slow_down_alpha(states: list[router.WorkerState], request: router.RouteRequest) -> None:
        if request.conversation_id != first.conversation_id or without_conversation:
            return
        plain = replace(request, conversation_id=None)
        ranked = router.Router.rank(spy, states, plain)
        by_id = {c.worker_id: c for c in ranked}
        beta = next(c for c in ranked if c.worker_id != alpha_id)
        left = 1.25 * beta.estimated_s - by_id[alpha_id].estimated_s
        if left > 0:  # one slot: what is ahead adds to Alpha's finish time
            spy.reserve(replace(by_id[alpha_id], estimated_s=left, work_s=left), plain)
        ranked = router.Router.rank(spy, states, plain)
        without_conversation.extend(household.workers[c.worker_id].name for c in ranked)

    spy.before_rank = slow_down_alpha
    second = await converse(hass, "and again", first.conversation_id)
    assert second.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert without_conversation == ["Beta", "Alpha"]
    assert recorder.tried == ["Alpha", "Alpha"]
    # A new conversation is not sticky: it goes to the worker that looks sooner done.
    spy.before_rank = None
    third = await converse(hass, "hello")
    assert third.conversation_id != first.conversation_id
    assert recorder.tried == ["Alpha", "Alpha", "Beta"]


async def test_answer_length_learned_from_a_real_stream(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    """The completion tokens the worker reports become the length the router plans for."""
    await setup_entry(hass, entry_for(chat_worker))
    household, spy, _ = await set_up_household(hass, {})
    recorder = Tap(household)
    response = await ask(hass, "Write a very long story about the sea.", max_tokens=8)
    assert response["finish_reason"] in ("stop", "length")  # answered to the end
    assert recorder.completion_tokens, "the worker reports usage at the end of a stream"
    tokens = recorder.completion_tokens[-1]
    assert 0 < tokens <= 8
    asked = spy.requests[-1]
    assert asked.max_new_tokens == 8
    # Planned from now on for requests of this kind, however long they may be.
    assert spy.expected_new_tokens(replace(asked, max_new_tokens=1000)) == tokens
    assert spy.expected_new_tokens(replace(asked, purpose="other", max_new_tokens=1000)) == 1000


async def test_capacity_snapshot_showing_our_request_is_not_counted_twice(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """The coordinator's listener tells the router which snapshots already show our requests."""
    household, spy, _ = await set_up_household(hass, workers)
    alpha = handle(household, "Alpha")
    busy = keep_busy(household, "Beta")
    body = {
        "messages": [{"role": "user", "content": LONG_STORY}],
        "max_tokens": HOLD_TOKENS,
        "temperature": 0,
    }
    request = router.RouteRequest(prompt_tokens=100, max_new_tokens=8)

    def alpha_estimate(running: int | None = None) -> float:
        state = alpha.state()
        if running is not None:
            state = replace(state, running=running)
        return spy.rank([state], request)[0].estimated_s

    async with asyncio.timeout(60):
        stream = await household.async_open_chat(body)  # not read on: it holds Alpha's slot
        try:
            assert stream.worker is alpha
            await anext(aiter(stream.deltas))
            await alpha.coordinator.async_refresh()
            assert alpha.coordinator.data.running == 1  # the snapshot shows our request
            # ... which is already counted as ours, not again as another client's.
            assert alpha_estimate() == pytest.approx(alpha_estimate(running=0))
        finally:
            await cast(AsyncGenerator[ChatDelta], stream.deltas).aclose()
    # Finished: the snapshot, now stale, still shows it running; it is not someone else's.
    assert alpha.coordinator.data.running == 1
    assert spy.in_flight(alpha.entry_id) == 0
    assert alpha_estimate() == pytest.approx(alpha_estimate(running=0))
    # A request of another client in a snapshot does count.
    assert alpha_estimate(running=2) > alpha_estimate(running=0)
    spy.release(busy)


async def test_preferred_model_served_nowhere_falls_back(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    await setup_entry(hass, entry_for(chat_worker))
    household, spy, _ = await set_up_household(hass, {}, **{CONF_CHAT_MODEL: "no-such-model"})
    recorder = Tap(household)
    response = await ask(hass, "hi")
    assert response["finish_reason"] in ("stop", "length")  # answered to the end
    served = household.workers[next(iter(household.workers))].coordinator.info.chat_models
    assert [body["model"] for body in recorder.bodies] == [served[0]]
    assert [r.model for r in spy.requests[-2:]] == ["no-such-model", None]


async def test_offline_worker_is_not_asked(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """A worker whose last poll failed is left out (not tried and failed over)."""
    household, spy, _ = await set_up_household(hass, workers)
    recorder = Tap(household)
    busy = keep_busy(household, "Beta")  # Alpha would be first if it were there
    await workers["Alpha"].astop()
    alpha = handle(household, "Alpha")
    await alpha.coordinator.async_refresh()
    assert not alpha.coordinator.last_update_success
    assert alpha.state().online is False
    response = await ask(hass, "hi")
    assert recorder.tried == ["Beta"]
    assert response["worker"] == "Beta"
    assert spy.breaker_state(alpha.entry_id) is router.BreakerState.CLOSED  # never failed
    spy.release(busy)
