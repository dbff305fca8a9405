"""The routing policy, as plain data (no Home Assistant)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from custom_components.hearth.router import (
    DEFAULT_DECODE_TOK_S,
    DEFAULT_PREFILL_TOK_S,
    LOW_MEMORY_MB,
    STICKY_FACTOR,
    STICKY_TTL_S,
    BreakerState,
    Candidate,
    ModelRate,
    Reservation,
    Router,
    RouteRequest,
    WorkerState,
    finish_seconds,
    flagged,
    request_seconds,
)

FAST = ModelRate(prefill_tok_s=1000.0, decode_tok_s=100.0)
SLOW = ModelRate(prefill_tok_s=100.0, decode_tok_s=10.0)
REQUEST = RouteRequest(prompt_tokens=200, max_new_tokens=100)


class Clock:
    """Injected time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rank(workers: list[WorkerState], request: RouteRequest = REQUEST) -> list[Candidate]:
    """What the household's router (`Router.rank`, as household.py uses it) makes of snapshots."""
    return Router(Clock()).rank(workers, request)


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
        rank([worker("w", running=r, queued=q)])[0].estimated_s
        for r, q in [(0, 0), (1, 0), (2, 0), (2, 1), (2, 3)]
    ]
    assert times == sorted(times)
    assert len(set(times)) == len(times)
    # Other clients' requests in the snapshot, each the size of this one (1.2 s): one
    # running shares the machine; with both slots taken it waits for all of them.
    assert times == pytest.approx([1.2, 2.4, 3.6, 4.8, 7.2])


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
    # Without a wish, each worker offers its fastest measured model, wherever it is listed.
    assert rank([a], RouteRequest())[0].model == "small"
    slow_first = WorkerState("c", {"big": SLOW, "small": FAST, "new": ModelRate()}, max_running=1)
    assert rank([slow_first], RouteRequest())[0].model == "small"
    # Nothing measured yet: the first one listed.
    unmeasured = WorkerState("d", {"first": ModelRate(), "second": ModelRate()}, max_running=1)
    assert rank([unmeasured], RouteRequest())[0].model == "first"


# A laptop that would finish in 1.2 s against a plugged-in worker at 1.5 s: each
# penalty alone (x2 battery, x1.5 someone using it, x2 low memory) must put it behind,
# by a margin (no tie, no alphabetical order: "laptop" < "plugged").
PLUGGED = ModelRate(prefill_tok_s=400.0, decode_tok_s=100.0)  # 0.5 + 1.0 = 1.5 s


@pytest.mark.parametrize(
    ("condition", "factor", "reasons"),
    [
        ({"on_battery": True}, 2.0, ("on_battery",)),
        ({"user_active": True}, 1.5, ("user_active",)),
        ({"memory_free_mb": LOW_MEMORY_MB - 1}, 2.0, ("low_memory",)),
        ({"on_battery": True, "user_active": True}, 3.0, ("on_battery", "user_active")),
    ],
    ids=["battery", "user-active", "low-memory", "battery-and-user-active"],
)
def test_each_penalty_puts_a_faster_worker_behind(
    condition: dict[str, object], factor: float, reasons: tuple[str, ...]
) -> None:
    plugged = worker("plugged", PLUGGED)
    assert rank([plugged])[0].estimated_s == pytest.approx(1.5)
    # Without the condition the laptop is clearly first.
    assert [c.worker_id for c in rank([plugged, worker("laptop", FAST)])] == ["laptop", "plugged"]
    laptop = worker("laptop", FAST, **condition)  # type: ignore[arg-type]
    ranked = rank([plugged, laptop])
    assert [c.worker_id for c in ranked] == ["plugged", "laptop"]
    assert ranked[1].estimated_s == pytest.approx(1.2 * factor)
    assert ranked[1].reasons == reasons


def test_slow_down_of_a_worker_in_use_is_not_counted_twice() -> None:
    """Its rates are measured on what it served: once they show the slow-down, they count.

    The penalty bounds the rates the worker had in normal conditions (its last
    snapshot without the condition) instead of multiplying an estimate whose
    rates already fell.
    """
    r = Router(Clock())
    other = idle("b", ModelRate(400.0, 40.0))  # 0.5 + 2.5 = 3.0 s
    assert [c.worker_id for c in r.rank([idle("a", FAST), other], REQUEST)] == ["a", "b"]  # 1.2 s
    # In use, rates not fallen yet: planned 1.5x slower than normal, as before.
    assert r.rank([idle("a", FAST, user_active=True)], REQUEST)[0].estimated_s == pytest.approx(
        1.5 * 1.2
    )
    # Its rates fell by 1.2x since: the expected 1.5x still holds.
    slight = ModelRate(1000.0 / 1.2, 100.0 / 1.2)
    assert r.rank([idle("a", slight, user_active=True)], REQUEST)[0].estimated_s == pytest.approx(
        1.8
    )
    # Its rates show a 2x slow-down: 2.4 s, not 1.5 x 2.4 = 3.6 s, and it stays first.
    slowed = idle("a", ModelRate(500.0, 50.0), user_active=True)
    ranked = r.rank([slowed, other], REQUEST)
    assert [c.worker_id for c in ranked] == ["a", "b"]
    assert ranked[0].estimated_s == pytest.approx(2.4)
    assert "user_active" in ranked[0].reasons
    # The speed check still compares with the rates it reported.
    assert ranked[0].reported_work_s == pytest.approx(2.4)
    # Never seen in normal conditions: the penalty multiplies the estimate.
    assert Router(Clock()).rank([slowed], REQUEST)[0].estimated_s == pytest.approx(1.5 * 2.4)
    # A worker that leaves takes its normal rates along.
    r.forget("a")
    assert r.rank([slowed], REQUEST)[0].estimated_s == pytest.approx(1.5 * 2.4)


def test_enough_memory_and_unknown_conditions_are_not_penalised() -> None:
    for condition in (
        {"memory_free_mb": LOW_MEMORY_MB},
        {"on_battery": False, "user_active": False},
        {"on_battery": None, "user_active": None, "memory_free_mb": None},
    ):
        ranked = rank([worker("laptop", FAST, **condition)])
        assert ranked[0].estimated_s == pytest.approx(1.2)
        assert ranked[0].reasons == ()


def test_ties_broken_by_worker_id() -> None:
    assert [c.worker_id for c in rank([worker("b"), worker("a")], REQUEST)] == ["a", "b"]


# --- Router: reservations, stickiness, flags, breaker, learning ---------------------


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
    assert r.expected_new_tokens(RouteRequest(purpose="other")) == 128
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
    # Slower by more than 1.5x (1.6x: 1.92 s against 1.2 s): move.
    slower_by_1_6 = idle("b", ModelRate(625.0, 62.5))
    ranked = r.rank([a, slower_by_1_6], turn)
    assert [c.worker_id for c in ranked] == ["a", "b"]
    assert ranked[1].estimated_s == pytest.approx(1.6 * ranked[0].estimated_s)
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
    r.report_failure("b")
    r.forget("b")
    assert r.sticky_worker("c1") is None
    assert r.in_flight("b") == 0
    # A worker that comes back (added again) starts with a closed breaker.
    assert r.breaker_state("b") is BreakerState.CLOSED
    ranked = r.rank([idle("b")], turn)
    assert ranked[0].reasons == ()
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


def test_breaker_back_off_doubles_up_to_its_cap() -> None:
    """Open for 2, 4, 8, 16 s after 1, 2, 3, 4 failures in a row, never longer than the cap."""
    clock = Clock()
    r = Router(clock, breaker_base_s=2.0, breaker_max_s=20.0)
    for backoff in (2.0, 4.0, 8.0, 16.0, 20.0, 20.0):
        r.report_failure("a")
        clock.now += backoff - 0.01
        assert r.breaker_state("a") is BreakerState.OPEN, backoff
        clock.now += 0.01
        assert r.breaker_state("a") is BreakerState.HALF_OPEN, backoff
    # The defaults: 2 s at first, at most 2 minutes.
    r = Router(clock)
    r.report_failure("a")
    clock.now += 1.99
    assert r.breaker_state("a") is BreakerState.OPEN
    for _ in range(10):
        r.report_failure("a")
    clock.now += 119.99
    assert r.breaker_state("a") is BreakerState.OPEN
    clock.now += 0.01
    assert r.breaker_state("a") is BreakerState.HALF_OPEN


def test_probe_that_ends_without_verdict_lets_the_next_one_probe() -> None:
    """A probe released with neither success nor failure (e.g. cancelled) frees the probe."""
    clock = Clock()
    r = Router(clock)
    a, b = idle("a"), idle("b", SLOW)
    r.report_failure("a")
    clock.now += 2.0
    probe = r.reserve(r.rank([a, b], REQUEST)[0], REQUEST)
    assert probe.worker_id == "a"
    assert [c.worker_id for c in r.rank([a, b], REQUEST)] == ["b", "a"]  # one probe at a time
    r.release(probe)
    ranked = r.rank([a, b], REQUEST)
    assert [c.worker_id for c in ranked] == ["a", "b"]
    assert "breaker_half_open" in ranked[0].reasons
    assert r.breaker_state("a") is BreakerState.HALF_OPEN


def test_flagged_workers_come_before_open_breakers() -> None:
    """Tiers: free workers by estimate, then household-flagged ones, then open breakers."""
    r = Router(Clock())
    free = idle("free", SLOW)  # 12 s
    flagged_laptop = idle("laptop", FAST, only_when_idle=True, user_active=True)  # 1.8 s
    broken = idle("broken", FAST)  # 1.2 s
    r.report_failure("broken")
    ranked = r.rank([broken, flagged_laptop, free], REQUEST)
    assert [c.worker_id for c in ranked] == ["free", "laptop", "broken"]
    assert "only_when_idle" in ranked[1].reasons
    assert "breaker_open" in ranked[2].reasons
    # Without a free worker the flagged one still comes before the open breaker.
    assert [c.worker_id for c in r.rank([broken, flagged_laptop], REQUEST)] == [
        "laptop",
        "broken",
    ]


def test_overdue_reservation_counts_a_quarter_of_its_estimate() -> None:
    clock = Clock()
    r = Router(clock)
    a = idle("a")  # one slot: a new request waits for what is ahead
    place(r, [a])  # 1.2 s of work
    clock.now += 0.5
    assert r.rank([a], REQUEST)[0].estimated_s == pytest.approx(0.7 + 1.2)
    # Long past its estimate, it is still running: a quarter of it (0.3 s) is left.
    clock.now += 60.0
    assert r.rank([a], REQUEST)[0].estimated_s == pytest.approx(0.3 + 1.2)
    # One queued behind the overdue one has all of its work left: 0.3 + 1.2 ahead.
    place(r, [a])
    assert r.rank([a], REQUEST)[0].estimated_s == pytest.approx(0.3 + 1.2 + 1.2)


def test_queued_reservations_count_their_own_work_once() -> None:
    """What is ahead is the work each of our requests has left, not when each ends.

    Three 1.2 s requests queued on a one-slot worker are 3.6 s of work ahead of a
    fourth (which ends at 4.8 s); adding up their end times (1.2 + 2.4 + 3.6)
    counted the first one three times and sent bursts to slower workers.
    """
    clock = Clock()
    r = Router(clock)
    a = idle("a")
    for _ in range(3):
        place(r, [a])
    assert r.rank([a], REQUEST)[0].estimated_s == pytest.approx(4 * 1.2)
    clock.now += 0.5  # the first has 0.7 s left, the two behind it all of theirs
    assert r.rank([a], REQUEST)[0].estimated_s == pytest.approx(0.7 + 1.2 + 1.2 + 1.2)
    # On a two-slot worker with no free slot it waits for the same work to drain.
    r2 = Router(Clock())
    two = worker("b")  # max_running=2
    for _ in range(3):
        r2.reserve(r2.rank([two], REQUEST)[0], REQUEST)
    assert r2.rank([two], REQUEST)[0].estimated_s == pytest.approx(4 * 1.2)


def test_burst_fills_a_fast_worker_while_it_still_finishes_first() -> None:
    r = Router(Clock())
    fast, slow = idle("fast", FAST), idle("slow", ModelRate(100.0, 50.0))  # 1.2 s vs 4 s
    picks = [place(r, [fast, slow]).worker_id for _ in range(5)]
    # fast ends at 1.2, 2.4, 3.6 s (< 4 s); the 4th goes to slow (4 s < 4.8 s);
    # the 5th to fast again (4.8 s < 8 s).
    assert picks == ["fast", "fast", "fast", "slow", "fast"]


def test_answer_length_is_a_moving_average() -> None:
    """The first answer sets it; each later one moves it a fifth of the way."""
    clock = Clock()
    r = Router(clock)
    for tokens, expected in ((20, 20.0), (70, 30.0), (30, 30.0), (80, 40.0)):
        res = place(r, [idle("a")])
        clock.now += 1.0
        r.release(res, completion_tokens=tokens)
        assert r.expected_new_tokens(REQUEST) == pytest.approx(expected)
    # A failed or empty answer teaches nothing.
    r.release(place(r, [idle("a")]), completion_tokens=0)
    r.release(place(r, [idle("a")]))
    assert r.expected_new_tokens(REQUEST) == pytest.approx(40.0)


@pytest.mark.parametrize(
    ("takes_s", "scale"),
    [(12.0, 4.0), (0.12, 0.25), (2.4, 2.0)],
    ids=["ten-times-slower", "ten-times-faster", "twice-as-slow"],
)
def test_speed_correction_is_bounded(takes_s: float, scale: float) -> None:
    """Reported 1.2 s a request; the correction follows what it takes, within 1/4x..4x."""
    clock = Clock()
    r = Router(clock)
    a = idle("a")
    for _ in range(10):
        res = r.reserve(r.rank([a], REQUEST)[0], REQUEST)
        clock.now += takes_s
        r.release(res, completion_tokens=100)
    assert r.scale("a") == pytest.approx(scale, rel=0.01)
    assert r.rank([a], REQUEST)[0].estimated_s == pytest.approx(1.2 * scale, rel=0.01)


KEY = "ab" * 32
VOICE = RouteRequest(prompt_tokens=1000, max_new_tokens=20, prefix_key=KEY, prefix_tokens=900)


def test_warm_worker_skips_the_prefill_of_its_prefix() -> None:
    rate = ModelRate(prefill_tok_s=200.0, decode_tok_s=50.0)
    warm = idle("a", rate, warm_keys={"m": frozenset({KEY})})
    cold = idle("b", rate)
    other_model = idle("c", rate, warm_keys={"other": frozenset({KEY})})
    ranked = rank([cold, other_model, warm], VOICE)
    assert [c.worker_id for c in ranked] == ["a", "b", "c"]
    assert "warm" in ranked[0].reasons and "warm" not in ranked[1].reasons
    # 100 prompt tokens left to prefill at 200 tok/s, 20 to decode at 50 tok/s.
    assert ranked[0].estimated_s == pytest.approx(100 / 200 + 20 / 50)
    assert ranked[1].estimated_s == pytest.approx(1000 / 200 + 20 / 50)
    assert ranked[2].estimated_s == ranked[1].estimated_s  # a key of another model
    # Without a key, or with another one, nobody is warm.
    for request in (
        RouteRequest(prompt_tokens=1000, max_new_tokens=20, prefix_tokens=900),
        RouteRequest(prompt_tokens=1000, max_new_tokens=20, prefix_key="cd" * 32),
    ):
        assert {c.estimated_s for c in rank([cold, warm], request)} == {ranked[1].estimated_s}


def test_warm_worker_wins_unless_a_cold_one_is_faster_even_so() -> None:
    request = RouteRequest(prompt_tokens=200, max_new_tokens=100, prefix_key=KEY, prefix_tokens=100)
    cold = idle("b", FAST)  # 0.2 s prefill + 1.0 s decode
    keys = {"m": frozenset({KEY})}
    # Slower rates (1.5 s cold) but warm: 0.125 s prefill + 1.0 s decode.
    warm = idle("a", ModelRate(800.0, 100.0), warm_keys=keys)
    ranked = rank([cold, warm], request)
    assert [c.worker_id for c in ranked] == ["a", "b"]
    assert ranked[0].estimated_s == pytest.approx(100 / 800 + 100 / 100)
    # Warm and much slower (2.75 s against 1.2 s): the cold, faster one answers.
    slow_warm = idle("a", ModelRate(400.0, 40.0), warm_keys=keys)
    assert [c.worker_id for c in rank([cold, slow_warm], request)] == ["b", "a"]
    # No allowance on top of the known saving: warm at 1.25 s against 1.2 s loses.
    close = idle("a", ModelRate(800.0, 1 / 0.01125), warm_keys=keys)
    ranked = rank([cold, close], request)
    assert [c.worker_id for c in ranked] == ["b", "a"]
    assert ranked[1].estimated_s == pytest.approx(1.25)


def test_worker_that_answered_the_key_is_warm_until_its_next_snapshot() -> None:
    r = Router(Clock())
    cold = {"a": idle("a"), "b": idle("b")}
    first = r.rank(list(cold.values()), VOICE)[0]
    r.release(r.reserve(first, VOICE), completion_tokens=20)
    ranked = r.rank(list(cold.values()), VOICE)
    assert ranked[0].worker_id == first.worker_id and "warm" in ranked[0].reasons
    # Failed or cancelled (no answer): nothing learned.
    other = next(w for w in cold if w != first.worker_id)
    failed = r.reserve(replace(ranked[1]), VOICE)
    r.release(failed)
    assert "warm" not in r.rank([cold[other]], VOICE)[0].reasons
    # Its next snapshot tells what its cache holds now (here: not the key).
    r.observe_snapshot(first.worker_id)
    assert all("warm" not in c.reasons for c in r.rank(list(cold.values()), VOICE))


def test_speed_check_counts_the_prefill_the_cache_really_saved() -> None:
    clock = Clock()
    rate = ModelRate(prefill_tok_s=100.0, decode_tok_s=100.0)
    keys = {"m": frozenset({KEY})}
    r = Router(clock)
    for _ in range(10):
        # Planned warm (1 s: 100 tokens to prefill, 20 to decode at 0.2 s), but the
        # worker's usage says its cache held nothing: it did 10.2 s of work, in 10.2 s.
        candidate = r.rank([idle("a", rate, warm_keys=keys)], VOICE)[0]
        assert candidate.estimated_s == pytest.approx((100 + 20) / 100 * r.scale("a"))
        reservation = r.reserve(candidate, VOICE)
        clock.now += 10.2
        r.release(reservation, completion_tokens=20, cached_tokens=0)
    assert r.scale("a") == pytest.approx(1.0)  # not taken for a 10x slower worker


def test_conversation_worker_comes_before_a_warm_one() -> None:
    r = Router(Clock())
    turn = RouteRequest(
        prompt_tokens=200,
        max_new_tokens=100,
        conversation_id="c1",
        prefix_key=KEY,
        prefix_tokens=100,
    )
    r.release(place(r, [idle("b")], turn))
    warm = idle("a", warm_keys={"m": frozenset({KEY})})  # 1.1 s; b: 1.2 s
    ranked = r.rank([warm, idle("b")], turn)
    assert [c.worker_id for c in ranked] == ["b", "a"]
    assert "sticky" in ranked[0].reasons
