"""Embeddings go through the household's one door to the workers: `Household.async_embed`.

Routed like chat (router.Router): a worker whose circuit breaker is open, or that is
busier, is asked last; each try is reserved against its worker while it runs; a worker
that dies is passed over for the next one and its breaker opens. The workers here are
the fast fake (tests/fake_worker.py) with an embedding model added; the real-process
contract is in test_preferences.py (`test_relevant_preferences_chosen_by_real_embeddings`)
and test_options_menu.py (`test_household_embedding_model_is_the_one_used`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fake_worker import FakeWorker, check_schema
from hearth_worker.validation import ApiError
from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry
from worker_process import tls_closed

from custom_components.hearth import router
from custom_components.hearth.const import CONF_EMBEDDING_MODEL, DOMAIN
from custom_components.hearth.household import Household, NoWorkerError, WorkerHandle
from custom_components.hearth.preferences import DATA_PREFERENCES

EMBED = "POST /v1/embeddings"


class EmbeddingFake(FakeWorker):
    """The fake worker, serving an embedding model too.

    POST /v1/embeddings answers one small vector per input (its length and its
    count of the letters a and e), checked against openapi.yaml both ways. Knobs:
    `embedded` ((model, inputs) of every request), `embed_status` (answer that HTTP
    error instead), `hold_embeddings()` / `release_embeddings()` (a request waits,
    `embedding_arrived` is set once one does).
    """

    def __init__(self, state_dir: Path, *, embedding_model: str, **kwargs: Any) -> None:
        super().__init__(state_dir, **kwargs)
        self.embedding_model = embedding_model
        self.embedded: list[tuple[str, list[str]]] = []
        self.embed_status: int | None = None
        self.embedding_arrived = asyncio.Event()
        self._embed_gate = asyncio.Event()
        self._embed_gate.set()

    def hold_embeddings(self) -> None:
        self.embedding_arrived.clear()
        self._embed_gate.clear()

    def release_embeddings(self) -> None:
        self._embed_gate.set()

    async def stop(self) -> None:
        self._embed_gate.set()
        await super().stop()

    def info_json(self) -> dict[str, Any]:
        info = super().info_json()
        embedding = {
            **self.model_json(),
            "id": self.embedding_model,
            "kind": "embedding",
            "quantization": "fp32",
            "context_length": 512,
            "dimensions": 3,
        }
        info["models"] = [*info["models"], embedding]
        return info

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # The fake's routes are fixed when it starts: this one is added here, behind
        # the same token check.
        if request.method == "POST" and request.path == "/v1/embeddings":
            handler = self.embeddings
        response: web.StreamResponse = await super()._authenticate(request, handler)
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._json(request, "EmbeddingRequest")
        if body["model"] != self.embedding_model:
            raise ApiError(404, "Unknown model", code="model_not_found", param="model")
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.embedded.append((body["model"], inputs))
        self.embedding_arrived.set()
        await self._embed_gate.wait()
        if self.embed_status is not None:
            raise ApiError(self.embed_status, "Refused by the test", code="test")
        answer = {
            "object": "list",
            "model": self.embedding_model,
            "data": [
                {
                    "object": "embedding",
                    "index": n,
                    "embedding": [float(len(text)), float(text.count("a")), float(text.count("e"))],
                }
                for n, text in enumerate(inputs)
            ],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        }
        check_schema(answer, "EmbeddingList")
        return web.json_response(answer)


@pytest.fixture(autouse=True)
def polls_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the polls a test makes (or a failure makes) refresh the snapshots."""
    monkeypatch.setattr("custom_components.hearth.coordinator.SCAN_INTERVAL", timedelta(hours=1))


@pytest.fixture
async def fakes(tmp_path: Path) -> AsyncIterator[tuple[EmbeddingFake, EmbeddingFake]]:
    """Two fake workers serving the same embedding model, "One" and "Two"."""
    one = EmbeddingFake(
        tmp_path / "one", name="One", node_id="fake0000node0001", embedding_model="fake-embed"
    )
    two = EmbeddingFake(
        tmp_path / "two", name="Two", node_id="fake0000node0002", embedding_model="fake-embed"
    )
    async with one, two:
        yield one, two
    await tls_closed()


async def add(hass: HomeAssistant, fake: FakeWorker) -> WorkerHandle:
    entry = MockConfigEntry(
        domain=DOMAIN, title=fake.name, unique_id=fake.node_id, data=fake.entry_data()
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    return Household.get(hass).workers[entry.entry_id]


async def set_up_household(
    hass: HomeAssistant, fakes: tuple[EmbeddingFake, EmbeddingFake]
) -> tuple[Household, str, str]:
    """Both fakes loaded, "One" first; the household and their two entry ids.

    "One" is the worker a plain walk over the loaded workers would ask first: the
    tests make routing prefer the other one where the policy says so.
    """
    one = await add(hass, fakes[0])
    two = await add(hass, fakes[1])
    # A breaker stays open for the whole test, however slow the machine.
    Household.get(hass).routing.breaker_base_s = 3600.0
    return Household.get(hass), one.entry_id, two.entry_id


async def busy(household: Household, entry_id: str, fake: EmbeddingFake, running: int) -> None:
    """`running` of the fake's 2 slots taken by another client, as its next snapshot says."""
    fake.running = running
    await household.workers[entry_id].coordinator.async_refresh()


async def relevance(hass: HomeAssistant) -> list[float] | None:
    """What the preferences' relevance gets for one item (it asks through the household)."""
    prefs = hass.data[DATA_PREFERENCES]
    return await prefs.async_similarities("tea", [{"category": "diet", "value": "tea"}])


async def test_an_open_circuit_is_asked_last(
    hass: HomeAssistant, fakes: tuple[EmbeddingFake, EmbeddingFake]
) -> None:
    one, two = fakes
    household, entry_one, entry_two = await set_up_household(hass, fakes)
    household.routing.report_failure(entry_one)  # as if it had just failed

    assert [c.worker_id for c in household.embedding_candidates()] == [entry_two, entry_one]
    assert household.embedding_model() == "fake-embed"
    model, vectors = await household.async_embed(["bread", "tea"])
    assert (model, vectors) == ("fake-embed", [[5.0, 1.0, 1.0], [3.0, 1.0, 1.0]])
    assert await relevance(hass) is not None
    assert two.embedded == [("fake-embed", ["bread", "tea"]), ("fake-embed", ["tea", "Diet: tea"])]
    assert one.count(EMBED) == 0
    assert household.routing.breaker_state(entry_one) is router.BreakerState.OPEN


async def test_a_busy_worker_is_asked_last_and_a_reservation_counts(
    hass: HomeAssistant, fakes: tuple[EmbeddingFake, EmbeddingFake]
) -> None:
    """Another client keeps a worker busy: the other one embeds. While an embedding runs
    it is reserved against its worker, so one at the same time goes to the other."""
    one, two = fakes
    household, entry_one, entry_two = await set_up_household(hass, fakes)
    await busy(household, entry_one, one, 2)
    assert household.embedding_candidates()[0].worker_id == entry_two
    assert await relevance(hass) is not None
    assert (one.count(EMBED), two.count(EMBED)) == (0, 1)

    await busy(household, entry_one, one, 0)
    await busy(household, entry_two, two, 1)  # now "One" is sooner done
    one.hold_embeddings()
    long_text = "soup " * 800  # ~1,000 tokens: still running, as far as routing knows
    held = hass.async_create_task(household.async_embed([long_text]))
    await one.embedding_arrived.wait()
    assert household.routing.in_flight(entry_one) == 1
    await busy(household, entry_two, two, 0)
    # Both idle by their snapshots: the reservation makes "Two" the sooner done.
    assert household.embedding_candidates()[0].worker_id == entry_two
    assert await relevance(hass) is not None
    assert (one.count(EMBED), two.count(EMBED)) == (1, 2)
    one.release_embeddings()
    assert await held == ("fake-embed", [[4000.0, 0.0, 0.0]])
    assert household.routing.in_flight(entry_one) == household.routing.in_flight(entry_two) == 0


async def test_failover_when_the_first_embedder_dies(
    hass: HomeAssistant, fakes: tuple[EmbeddingFake, EmbeddingFake]
) -> None:
    """The worker asked first is gone: the next one answers and the dead one's breaker
    opens; with every worker gone there are no embeddings (and no relevance)."""
    one, two = fakes
    household, entry_one, entry_two = await set_up_household(hass, fakes)
    await busy(household, entry_two, two, 1)  # "One" is asked first
    assert household.embedding_candidates()[0].worker_id == entry_one
    await one.stop()

    assert await relevance(hass) is not None
    assert two.embedded == [("fake-embed", ["tea", "Diet: tea"])]
    assert household.routing.breaker_state(entry_one) is router.BreakerState.OPEN
    assert household.routing.breaker_state(entry_two) is router.BreakerState.CLOSED
    assert household.routing.in_flight(entry_one) == household.routing.in_flight(entry_two) == 0
    assert await household.async_embed(["jam"]) == ("fake-embed", [[3.0, 1.0, 0.0]])

    await two.stop()
    with pytest.raises(NoWorkerError):
        await household.async_embed(["jam"])
    assert await relevance(hass) is None
    for entry_id in (entry_one, entry_two):
        assert await hass.config_entries.async_unload(entry_id)


async def test_a_busy_answer_moves_on_without_opening_the_breaker(
    hass: HomeAssistant, fakes: tuple[EmbeddingFake, EmbeddingFake]
) -> None:
    """A 429 means "not now", not "gone"; a 5xx opens the breaker."""
    one, two = fakes
    household, entry_one, entry_two = await set_up_household(hass, fakes)
    await busy(household, entry_two, two, 1)  # "One" is asked first
    one.embed_status = 429
    assert await household.async_embed(["egg"]) == ("fake-embed", [[3.0, 0.0, 1.0]])
    assert (one.count(EMBED), two.count(EMBED)) == (1, 1)
    assert household.routing.breaker_state(entry_one) is router.BreakerState.CLOSED

    one.embed_status = 500
    assert household.embedding_candidates()[0].worker_id == entry_one
    assert await household.async_embed(["egg"]) == ("fake-embed", [[3.0, 0.0, 1.0]])
    assert (one.count(EMBED), two.count(EMBED)) == (2, 2)
    assert household.routing.breaker_state(entry_one) is router.BreakerState.OPEN


async def test_the_households_embedding_model_comes_first(
    hass: HomeAssistant, tmp_path: Path
) -> None:
    """The chosen model's worker is asked first even when the other one looks sooner
    done; while none serves it, the worker sooner done answers with its own model."""
    async with (
        EmbeddingFake(tmp_path / "a", node_id="fake0000node000a", embedding_model="embed-a") as a,
        EmbeddingFake(tmp_path / "b", node_id="fake0000node000b", embedding_model="embed-b") as b,
    ):
        a.running = 1  # busy with another client: b looks sooner done
        await add(hass, a)
        await add(hass, b)
        household = Household.get(hass)
        settings = dict(household.settings)
        assert household.embedding_model() == "embed-b"  # none chosen
        for wanted in ("embed-a", "embed-b"):
            await household.async_update_settings({**settings, CONF_EMBEDDING_MODEL: wanted})
            assert household.embedding_model() == wanted
            assert (await household.async_embed(["x"]))[0] == wanted
        await household.async_update_settings({**settings, CONF_EMBEDDING_MODEL: "gone"})
        assert await household.async_embed(["y"]) == ("embed-b", [[1.0, 0.0, 0.0]])
        assert a.embedded == [("embed-a", ["x"])]
        assert b.embedded == [("embed-b", ["x"]), ("embed-b", ["y"])]
        for entry in hass.config_entries.async_entries(DOMAIN):
            assert await hass.config_entries.async_unload(entry.entry_id)
    await tls_closed()


async def test_the_callers_deadline_passes_over_without_opening_the_breaker(
    hass: HomeAssistant, fakes: tuple[EmbeddingFake, EmbeddingFake]
) -> None:
    """A worker slower than the caller's per-try deadline (a prompt waits 3 s for
    relevance) is passed over, but it has not failed: its breaker stays closed."""
    one, two = fakes
    household, entry_one, entry_two = await set_up_household(hass, fakes)
    await busy(household, entry_two, two, 1)  # "One" is asked first
    one.hold_embeddings()  # it never answers in time
    assert await household.async_embed(["pie"], per_try_s=3.0) == ("fake-embed", [[3.0, 0.0, 1.0]])
    assert (one.count(EMBED), two.count(EMBED)) == (1, 1)
    assert household.routing.breaker_state(entry_one) is router.BreakerState.CLOSED
    assert household.routing.in_flight(entry_one) == household.routing.in_flight(entry_two) == 0
    one.release_embeddings()
