"""The routing policy, as plain data (no Home Assistant)."""

from __future__ import annotations

import pytest

from custom_components.hearth.router import (
    DEFAULT_DECODE_TOK_S,
    DEFAULT_PREFILL_TOK_S,
    LOW_MEMORY_MB,
    STICKY_FACTOR,
    STICKY_TTL_S,
    BreakerState,
    ModelRate,
    Reservation,
    Router,
    RouteRequest,
    WorkerState,
    estimate,
    finish_seconds,
    flagged,
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


# --- Router: reservations, stickiness, flags, breaker, learning ---------------------


class Clock:
    """Injected time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def idle(name: str, rate: ModelRate = FAST, **kwargs: object) -> WorkerState:
    return WorkerState(name, {"m": rate}, max_running=1, max_queued=8, **kwargs)  # type: ignore[arg-type]


def place(r: Router, workers: list[WorkerState], request: RouteRequest = REQUEST) -> Reservation:
    best = r.rank(workers, request)[0]
    return r.reserve(best, request)


def test_finish_seconds_shares_the_machine_then_queues() -> None:
    assert finish_seconds(1.0, [], 1) == 1.0
    # A free slot: runs at once, shares the machine with the running one while both run.
    assert finish_seconds(1.0, [0.5], 2) == pytest.approx(1.5)
    assert finish_seconds(1.0, [3.0], 2) == pytest.approx(2.0)
    # No free slot: waits for the work ahead.
    assert finish_seconds(1.0, [0.5, 2.0], 2) == pytest.approx(3.5)


def test_reservations_spread_a_burst_over_equal_workers() -> None:
    """Snapshots say both are idle; without reservations all three would herd onto one."""
    clock = Clock()
    r = Router(clock)
    workers = [idle("a"), idle("b")]
    assert [c.worker_id for c in rank(workers, REQUEST)] == ["a", "b"]
    picks = [place(r, workers).worker_id for _ in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"]
    assert r.in_flight("a") == 2
    assert "reserved" in r.rank(workers, REQUEST)[0].reasons


def test_burst_goes_to_fast_worker_until_slow_one_finishes_sooner() -> None:
    clock = Clock()
    r = Router(clock)
    fast, slow = idle("fast", FAST), idle("slow", ModelRate(500.0, 48.0))  # 1.2 s vs ~2.5 s
    picks = [place(r, [fast, slow]).worker_id for _ in range(3)]
    # 1st fast (1.2 s), 2nd fast (2.4 s behind the first, < 2.5), 3rd slow (2.5 < 3.6)
    assert picks == ["fast", "fast", "slow"]


def test_release_frees_the_worker_and_learns_answer_length() -> None:
    clock = Clock()
    r = Router(clock)
    workers = [idle("a")]
    first = place(r, workers)
    busy = r.rank(workers, REQUEST)[0].estimated_s
    clock.now += 0.5
    r.release(first, completion_tokens=20)
    r.release(first, completion_tokens=20)  # idempotent
    assert r.in_flight("a") == 0
    # Answers of this kind are ~20 tokens, not max_new_tokens (100): planned shorter.
    assert r.expected_new_tokens(REQUEST) == 20
    assert r.expected_new_tokens(RouteRequest(max_new_tokens=10)) == 10
    assert r.expected_new_tokens(RouteRequest(kind="other")) == 128
    assert r.rank(workers, REQUEST)[0].estimated_s < busy


def test_snapshot_showing_our_requests_is_not_counted_twice() -> None:
    clock = Clock()
    r = Router(clock)
    res = place(r, [idle("a")])
    r.observe_snapshot("a")  # the worker's next snapshot shows our request running
    shown = idle("a", running=1)
    with_ours = r.rank([shown], REQUEST)[0].estimated_s
    # After it finished, the (stale) snapshot still shows one running: not ours, so nothing.
    r.release(res)
    assert r.rank([shown], REQUEST)[0].estimated_s == pytest.approx(request_seconds(FAST, REQUEST))
    assert with_ours == pytest.approx(2 * request_seconds(FAST, REQUEST))
    # Requests of other clients in the snapshot do count (one of the two was ours).
    other = idle("a", running=1, queued=1)
    assert r.rank([other], REQUEST)[0].estimated_s == pytest.approx(
        2 * request_seconds(FAST, REQUEST)
    )


def test_full_with_reservations_is_skipped() -> None:
    r = Router(Clock())
    tiny = WorkerState("a", {"m": FAST}, max_running=1, max_queued=1)
    place(r, [tiny])
    place(r, [tiny])
    assert r.rank([tiny], REQUEST) == []


def test_conversation_sticks_unless_much_slower() -> None:
    clock = Clock()
    r = Router(clock)
    turn = RouteRequest(prompt_tokens=200, max_new_tokens=100, conversation_id="c1")
    a, b = idle("a"), idle("b")
    first = place(r, [b], turn)  # the first turn was answered by b
    r.release(first)
    # a is a bit faster now (b reports slower rates): within 1.5x, stay on b.
    slower_b = idle("b", ModelRate(800.0, 80.0))
    ranked = r.rank([a, slower_b], turn)
    assert ranked[0].worker_id == "b"
    assert "sticky" in ranked[0].reasons
    assert ranked[0].estimated_s <= STICKY_FACTOR * ranked[1].estimated_s
    # Much slower (more than 1.5x): move.
    much_slower_b = idle("b", ModelRate(400.0, 40.0))
    assert r.rank([a, much_slower_b], turn)[0].worker_id == "a"
    # Other conversations are not sticky.
    assert (
        r.rank([a, slower_b], RouteRequest(prompt_tokens=200, max_new_tokens=100))[0].worker_id
        == "a"
    )
    # Stickiness lapses with the conversation.
    clock.now += STICKY_TTL_S + 1
    assert r.sticky_worker("c1") is None
    assert r.rank([a, slower_b], turn)[0].worker_id == "a"


def test_forgotten_worker_loses_its_conversations() -> None:
    r = Router(Clock())
    turn = RouteRequest(conversation_id="c1")
    place(r, [idle("b")], turn)
    assert r.sticky_worker("c1") == "b"
    r.forget("b")
    assert r.sticky_worker("c1") is None
    assert r.in_flight("b") == 0
    assert r.sticky_worker(None) is None


def test_only_when_idle_and_not_on_battery_are_last_resorts() -> None:
    r = Router(Clock())
    laptop_in_use = idle("laptop", FAST, only_when_idle=True, user_active=True)
    laptop_unplugged = idle("laptop", FAST, not_on_battery=True, on_battery=True)
    slow = idle("pi", SLOW)
    for laptop, flag in ((laptop_in_use, "only_when_idle"), (laptop_unplugged, "not_on_battery")):
        ranked = r.rank([laptop, slow], REQUEST)
        assert [c.worker_id for c in ranked] == ["pi", "laptop"]
        assert flag in ranked[1].reasons
        # Nothing else can answer: it still answers.
        assert [c.worker_id for c in r.rank([laptop], REQUEST)] == ["laptop"]
    # Flags only bite while their condition holds.
    laptop_idle = idle("laptop", FAST, only_when_idle=True, not_on_battery=True, user_active=False)
    assert r.rank([laptop_idle, slow], REQUEST)[0].worker_id == "laptop"
    # Flagged but busy-and-plugged: battery flag does not apply.
    assert flagged(idle("x", not_on_battery=True, on_battery=False)) == ()


def test_low_memory_is_penalised() -> None:
    roomy = idle("roomy", FAST, memory_free_mb=4096)
    tight = idle("tight", FAST, memory_free_mb=LOW_MEMORY_MB - 1)
    ranked = rank([tight, roomy], REQUEST)
    assert [c.worker_id for c in ranked] == ["roomy", "tight"]
    assert "low_memory" in ranked[1].reasons


def test_circuit_breaker_backs_off_and_probes() -> None:
    clock = Clock()
    r = Router(clock, breaker_base_s=2.0, breaker_max_s=8.0)
    a, b = idle("a"), idle("b", SLOW)
    assert r.breaker_state("a") is BreakerState.CLOSED
    r.report_failure("a")
    assert r.breaker_state("a") is BreakerState.OPEN
    ranked = r.rank([a, b], REQUEST)
    assert [c.worker_id for c in ranked] == ["b", "a"]  # open: last resort only
    assert "breaker_open" in ranked[1].reasons
    # After the back-off: half-open, one probe at a time.
    clock.now += 2.0
    assert r.breaker_state("a") is BreakerState.HALF_OPEN
    ranked = r.rank([a, b], REQUEST)
    assert ranked[0].worker_id == "a"
    assert "breaker_half_open" in ranked[0].reasons
    probe = r.reserve(ranked[0], REQUEST)
    assert r.rank([a, b], REQUEST)[0].worker_id == "b"  # while the probe runs
    # The probe fails: open again, twice as long.
    r.report_failure("a")
    r.release(probe)
    clock.now += 2.0
    assert r.breaker_state("a") is BreakerState.OPEN
    clock.now += 2.0
    assert r.breaker_state("a") is BreakerState.HALF_OPEN
    # Back-off is capped.
    r.report_failure("a")
    r.report_failure("a")
    r.report_failure("a")
    clock.now += 8.0
    assert r.breaker_state("a") is BreakerState.HALF_OPEN
    # A success closes it.
    r.report_success("a")
    assert r.breaker_state("a") is BreakerState.CLOSED
    assert r.rank([a, b], REQUEST)[0].worker_id == "a"


def test_every_worker_open_still_gives_candidates() -> None:
    r = Router(Clock())
    r.report_failure("a")
    assert [c.worker_id for c in r.rank([idle("a")], REQUEST)] == ["a"]


def test_model_availability_with_router() -> None:
    r = Router(Clock())
    a = WorkerState("a", {"small": FAST}, max_running=1, max_queued=4)
    b = WorkerState("b", {"big": SLOW}, max_running=1, max_queued=4)
    assert [c.worker_id for c in r.rank([a, b], RouteRequest(model="big"))] == ["b"]
    assert r.rank([a], RouteRequest(model="big")) == []
    offline = WorkerState("c", {"big": FAST}, online=False)
    assert [c.worker_id for c in r.rank([b, offline], RouteRequest(model="big"))] == ["b"]


def test_worker_slower_than_it_reports_is_corrected() -> None:
    """Its rates say 1.2 s a request; it keeps taking 2.4 s: the router learns the 2x."""
    clock = Clock()
    r = Router(clock)
    a, b = idle("a"), idle("b", ModelRate(700.0, 70.0))  # b: ~1.7 s
    assert r.rank([a, b], REQUEST)[0].worker_id == "a"
    for _ in range(10):
        res = r.reserve(r.rank([a], REQUEST)[0], REQUEST)
        clock.now += 2.4
        r.release(res, completion_tokens=100)
    assert r.scale("a") == pytest.approx(2.0, rel=0.01)
    assert r.scale("b") == 1.0
    assert r.rank([a, b], REQUEST)[0].worker_id == "b"
