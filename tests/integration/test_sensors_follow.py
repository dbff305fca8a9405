"""The running and queued sensors follow Hearth's own requests at once, not at the next poll.

A worker's capacity is polled every SCAN_INTERVAL; between polls the sensors add what
Hearth itself started or finished on that worker since the snapshot. The answers
here go through the household agent to the fake worker (tests/fake_worker.py), held
after their first words; time never moves on, and the tests check that no poll
happened while they looked (the interval is set to an hour, so none comes by itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from fake_worker import FakeWorker
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import entity_registry as er

from custom_components.hearth.const import DOMAIN

from .conftest import setup_fake_entry

POLL = "GET /v1/capacity"


@pytest.fixture(autouse=True)
def polls_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """No interval poll comes during a test, however slow the machine: only the polls a
    test makes (`async_refresh`) refresh the snapshot."""
    monkeypatch.setattr("custom_components.hearth.coordinator.SCAN_INTERVAL", timedelta(hours=1))


def load(hass: HomeAssistant, fake: FakeWorker) -> tuple[str, str]:
    """The worker's (running, queued) sensor states."""
    registry = er.async_get(hass)
    states = []
    for key in ("running", "queued"):
        entity_id = registry.async_get_entity_id("sensor", DOMAIN, f"{fake.node_id}_{key}")
        assert entity_id is not None
        state = hass.states.get(entity_id)
        assert state is not None
        states.append(state.state)
    return states[0], states[1]


@asynccontextmanager
async def held_answer(hass: HomeAssistant, fake: FakeWorker) -> AsyncIterator[None]:
    """A question to the household agent, its answer held by the fake after its first
    words while the block runs; the whole answer has arrived when the block is left."""
    fake.hold_answers()
    task = hass.async_create_task(
        conversation.async_converse(
            hass, "Tell me a story", None, Context(), agent_id="conversation.hearth"
        )
    )
    async with asyncio.timeout(60):
        await fake.answering.wait()
    yield
    fake.release_answers()
    result = await task
    assert result.response.speech["plain"]["speech"] == fake.answer


async def test_running_follows_a_request_between_polls(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    """1 while the answer comes, 0 as soon as it is over: no poll in between."""
    await setup_fake_entry(hass, fake)
    assert load(hass, fake) == ("0", "0")
    polls = fake.count(POLL)
    async with held_answer(hass, fake):
        assert load(hass, fake) == ("1", "0")
    assert load(hass, fake) == ("0", "0")
    assert fake.count(POLL) == polls


async def test_running_drops_after_a_request_a_poll_saw(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    """A poll during the answer shows it running; it ends: 0 at once, not at the next poll."""
    entry = await setup_fake_entry(hass, fake)
    coordinator = entry.runtime_data.coordinator
    async with held_answer(hass, fake):
        await coordinator.async_refresh()  # the worker's own count: 1
        assert coordinator.data.running == 1
        assert load(hass, fake) == ("1", "0")
        polls = fake.count(POLL)
    assert load(hass, fake) == ("0", "0")
    assert fake.count(POLL) == polls


async def test_own_requests_add_to_other_clients(hass: HomeAssistant, fake: FakeWorker) -> None:
    """Others' requests come from the snapshot, Hearth's own on top; beyond the worker's
    parallel slots they count as queued."""
    entry = await setup_fake_entry(hass, fake)
    fake.running = 2  # two requests of other clients fill both slots
    await entry.runtime_data.coordinator.async_refresh()
    assert load(hass, fake) == ("2", "0")
    polls = fake.count(POLL)
    async with held_answer(hass, fake):
        assert load(hass, fake) == ("2", "1")
    assert load(hass, fake) == ("2", "0")
    assert fake.count(POLL) == polls
