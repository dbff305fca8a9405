"""The routing policy, as plain data (no Home Assistant)."""

from __future__ import annotations

import pytest

from custom_components.hearth.router import (
    DEFAULT_DECODE_TOK_S,
    DEFAULT_PREFILL_TOK_S,
    ModelRate,
    RouteRequest,
    WorkerState,
    estimate,
    rank,
    request_seconds,
)

FAST = ModelRate(prefill_tok_s=1000.0, decode_tok_s=100.0)
SLOW = ModelRate(prefill_tok_s=100.0, decode_tok_s=10.0)
REQUEST = RouteRequest(prompt_tokens=200, max_new_tokens=100)


def worker(name: str, rate: ModelRate = FAST, model: str = "m", **kwargs: object) -> WorkerState:
    return WorkerState(name, {model: rate}, max_running=2, max_queued=4, **kwargs)  # type: ignore[arg-type]


def test_request_seconds_uses_measured_rates_and_defaults() -> None:
    assert request_seconds(FAST, REQUEST) == pytest.approx(0.2 + 1.0)
    unmeasured = request_seconds(ModelRate(), REQUEST)
    assert unmeasured == pytest.approx(200 / DEFAULT_PREFILL_TOK_S + 100 / DEFAULT_DECODE_TOK_S)
    assert request_seconds(ModelRate(0.0, -1.0), REQUEST) == unmeasured


def test_fastest_idle_worker_first() -> None:
    ranked = rank([worker("slow", SLOW), worker("fast", FAST)], REQUEST)
    assert [c.worker_id for c in ranked] == ["fast", "slow"]
    assert ranked[0].model == "m"
    assert ranked[0].estimated_s < ranked[1].estimated_s


def test_busy_fast_worker_loses_to_idle_one() -> None:
    busy = worker("fast", FAST, running=2, queued=4 - 1)
    idle = worker("medium", ModelRate(500.0, 40.0))
    assert [c.worker_id for c in rank([busy, idle], REQUEST)] == ["medium", "fast"]
    assert rank([busy], REQUEST)[0].reasons == ("busy",)


def test_queue_and_running_raise_the_estimate() -> None:
    times = [
        estimate(worker("w", running=r, queued=q), FAST, REQUEST)
        for r, q in [(0, 0), (1, 0), (2, 0), (2, 1), (2, 3)]
    ]
    assert all(t is not None for t in times)
    assert times == sorted(times)
    assert len(set(times)) == len(times)


def test_full_offline_and_modelless_workers_are_skipped() -> None:
    full = worker("full", running=2, queued=4)
    offline = worker("offline", online=False)
    other = worker("other", model="another-model")
    nothing = WorkerState("nothing", {})
    assert rank([full, offline, nothing], REQUEST) == []
    assert rank([other], RouteRequest(model="m")) == []
    assert [c.model for c in rank([other], RouteRequest())] == ["another-model"]


def test_requested_model_only_where_served() -> None:
    a = WorkerState("a", {"small": FAST, "big": SLOW}, max_running=1)
    b = WorkerState("b", {"small": SLOW}, max_running=1)
    assert [(c.worker_id, c.model) for c in rank([a, b], RouteRequest(model="big"))] == [
        ("a", "big")
    ]
    # Without a wish, each worker offers its fastest measured model.
    assert rank([a], RouteRequest())[0].model == "small"


def test_battery_and_user_activity_penalised() -> None:
    plugged = worker("plugged", SLOW)
    laptop = worker("laptop", ModelRate(150.0, 15.0), on_battery=True, user_active=True)
    ranked = rank([laptop, plugged], REQUEST)
    assert [c.worker_id for c in ranked] == ["plugged", "laptop"]
    assert ranked[1].reasons == ("on_battery", "user_active")


def test_ties_broken_by_worker_id() -> None:
    assert [c.worker_id for c in rank([worker("b"), worker("a")], REQUEST)] == ["a", "b"]
