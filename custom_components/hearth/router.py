"""Routing policy: which worker should answer a chat request.

A plain module with no Home Assistant imports: dataclasses in, a ranked list
out. The caller tries the first candidate and fails over to the next one if a
worker fails before its first token. Time is injected (``Router(clock=...)``)
so that everything here is deterministic and unit-testable; the benchmark
(`scripts/bench/bench_router.py`) runs this very code on a simulated clock.

The estimate is the time until the answer is finished:

* per-request work = prompt tokens / prefill rate + new tokens / decode rate,
  with measured rates where the worker has served the model, defaults where not;
  new tokens: the answer length seen so far for this purpose (an
  average learned from finished requests), never more than ``max_new_tokens``;
* a worker is one machine: the requests it runs at once share its compute, and
  the ones beyond its parallel slots wait for the queue to drain. What is ahead
  of a new request is (a) this Home Assistant's own requests still open on the
  worker (in-flight reservations, with their estimated remaining work) and
  (b) requests from other clients, counted from the last capacity snapshot
  after taking out our own requests it already showed. Reservations are what
  stop a burst of simultaneous requests from herding onto the same worker
  whose last snapshot (up to a poll interval old) still says "idle";
* a worker on battery, in use by a person or short of memory is made to look
  slower, so it is picked only when it is clearly the better choice: it is
  planned at least that much slower than its rates in normal conditions (its
  last snapshot without the condition), and where the rates it measured since
  show the slow-down already, they count instead of being penalised again.

On top of the estimate (`Router.rank`):

* **Household flags** (per worker): "only when idle" keeps requests off a
  worker while a person uses it, "not on battery" while it runs on battery.
  Such a worker is not dropped but ranked after every other worker: it answers
  only when no other worker can (none left, or all others failed), because a
  slow answer from the household's own laptop beats no answer.
* **Stickiness**: a conversation goes back to the worker that served its
  previous turn unless that worker's estimate is more than ``STICKY_FACTOR``
  (1.5x) the best one's. The previous turn's prompt (system prompt, tools,
  history) is most of the next prompt; where the worker keeps it cached, the
  next turn skips that prefill, which for voice-sized requests (long prompt,
  short answer) is about half of the estimated time or more. Below 1.5x the
  warm cache is expected to win; above it the other worker is faster even if
  the whole prompt is prefilled again, and 1.5x caps what a sticky turn can
  lose where there is no cache. It lapses after ``STICKY_TTL_S`` (5 minutes,
  when Home Assistant forgets the conversation too).
* **Warm prefixes**: a request carries the key of its household part (the
  system prompt and tools every member's request starts with,
  ``RouteRequest.prefix_key``) and each worker lists the keys its prompt cache
  holds (``WorkerState.warm_keys``, from /v1/capacity). On a worker holding
  the key the estimate leaves out the prefill of that part
  (``prefix_tokens`` at the worker's prefill rate): that is the whole
  preference, a warm worker wins unless another is faster even so. Unlike a
  conversation's history, the saving is known, so no ``sticky_factor``
  allowance is added on top (that counts the cache twice: in the routing
  benchmark with 2 cache entries, seeds 1-3 at 50% and 80% load, p95 averaged
  1.155x the oracle's with it and 1.137x without). A worker that has just
  answered one of our requests with the key holds it (the worker caches a
  prompt when its answer ends) though its last snapshot does not say so yet:
  until its next snapshot, the router counts it warm too.
* **Circuit breaker** per worker: a failure or timeout opens it (the worker is
  left out, or ranked last when nothing else is left) for a back-off that
  doubles with every failure in a row (``BREAKER_BASE_S`` up to
  ``BREAKER_MAX_S``); then it is half-open: one real request at a time may
  probe it (fail-over covers a failed probe); a success closes it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import count

DEFAULT_PREFILL_TOK_S = 200.0
DEFAULT_DECODE_TOK_S = 20.0
BATTERY_PENALTY = 2.0
USER_ACTIVE_PENALTY = 1.5
LOW_MEMORY_MB = 256
LOW_MEMORY_PENALTY = 2.0

STICKY_FACTOR = 1.5
STICKY_TTL_S = 300.0
STICKY_MAX_CONVERSATIONS = 256

BREAKER_BASE_S = 2.0
BREAKER_MAX_S = 120.0

# A reservation that outlives its estimate is still running: count at least
# this share of its estimate as still to do.
OVERDUE_SHARE = 0.25
# Weight of a new observation in the learned answer length.
ANSWER_LENGTH_ALPHA = 0.2
# A worker's correction: how much busy time (seconds) its memory spans, how
# much forecast work it needs before it counts, and its bounds.
CALIBRATION_TAU_S = 120.0
CALIBRATION_MIN_WORK_S = 5.0
CALIBRATION_LIMIT = 4.0


@dataclass(frozen=True, slots=True)
class ModelRate:
    """Measured speed of one model on one worker (None: not measured yet)."""

    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What the router knows about one worker (its last capacity snapshot and flags)."""

    worker_id: str
    chat_models: Mapping[str, ModelRate]
    online: bool = True
    running: int = 0
    queued: int = 0
    max_running: int = 1
    max_queued: int = 0
    on_battery: bool | None = None
    user_active: bool | None = None
    memory_free_mb: int | None = None
    # Per chat model: the household prefix keys its prompt cache holds.
    warm_keys: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Household flags (options of the worker's config entry).
    only_when_idle: bool = False
    not_on_battery: bool = False


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """The request to place. `model` None: any chat model will do.

    `conversation_id` makes later turns stick to the worker of the earlier
    ones; `prefix_key` prefers a worker whose prompt cache holds the prefix;
    `purpose` groups requests whose answers have similar lengths ("voice",
    "task", ...) for the learned answer length.
    """

    model: str | None = None
    prompt_tokens: int = 256
    max_new_tokens: int = 128
    conversation_id: str | None = None
    purpose: str = "chat"
    # The household prefix: its key (X-Hearth-Prefix) and its size in tokens
    # (of `prompt_tokens`), roughly.
    prefix_key: str | None = None
    prefix_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Candidate:
    """One worker that can answer, with its estimated finish time."""

    worker_id: str
    model: str
    estimated_s: float
    reasons: tuple[str, ...] = field(default=(), compare=False)
    # The request's own work on this worker (no queue, no penalties), and what
    # `Router` checks the worker's speed with: the work at the reported rates,
    # seconds per answer token at them, the answer length planned for.
    work_s: float = field(default=0.0, compare=False)
    reported_work_s: float = field(default=0.0, compare=False)
    token_s: float = field(default=0.0, compare=False)
    new_tokens: float = field(default=0.0, compare=False)
    # Seconds per prompt token at the reported rate; prompt tokens planned as cached.
    prompt_token_s: float = field(default=0.0, compare=False)
    cached_tokens: int = field(default=0, compare=False)


class BreakerState(StrEnum):
    """Circuit breaker states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class _Breaker:
    failures: int = 0  # failures in a row
    open_until: float = 0.0
    probing: bool = False


@dataclass(frozen=True, slots=True)
class Reservation:
    """A request this Home Assistant has sent to a worker and not yet seen finish."""

    reservation_id: int
    worker_id: str
    purpose: str
    estimated_s: float  # its own work
    started: float
    reported_work_s: float = 0.0
    token_s: float = 0.0
    new_tokens: float = 0.0
    model: str = ""
    prefix_key: str | None = None
    prompt_token_s: float = 0.0
    cached_tokens: int = 0


def _rate(measured: float | None, default: float) -> float:
    return measured if measured is not None and measured > 0 else default


def request_seconds(
    rate: ModelRate,
    request: RouteRequest,
    new_tokens: float | None = None,
    cached_tokens: int = 0,
) -> float:
    """Time one request takes on an otherwise idle worker.

    `new_tokens`: the expected answer length (default: `request.max_new_tokens`);
    `cached_tokens`: prompt tokens the worker's cache holds (not prefilled).
    """
    prefill = _rate(rate.prefill_tok_s, DEFAULT_PREFILL_TOK_S)
    decode = _rate(rate.decode_tok_s, DEFAULT_DECODE_TOK_S)
    tokens = request.max_new_tokens if new_tokens is None else new_tokens
    prompt = max(0, request.prompt_tokens - max(0, cached_tokens))
    return prompt / prefill + tokens / decode


def holds_prefix(
    worker: WorkerState,
    model: str,
    request: RouteRequest,
    answered: frozenset[tuple[str, str]] = frozenset(),
) -> bool:
    """Whether `worker`'s prompt cache holds the request's household prefix for `model`.

    `answered`: (model, key) of our requests it answered since its last snapshot.
    """
    key = request.prefix_key
    if key is None:
        return False
    return key in worker.warm_keys.get(model, frozenset()) or (model, key) in answered


def finish_seconds(work: float, ahead: Sequence[float], slots: int) -> float:
    """When a request of `work` seconds finishes behind requests with `ahead` seconds left.

    The machine's compute is shared by what runs at once (no parallel speed-up
    on a CPU-bound worker). With a free slot the request starts now and, while
    it runs, shares the machine with each running request until that one ends
    (processor sharing); without one it waits for the work ahead to drain.
    """
    if len(ahead) < max(1, slots):
        return work + sum(min(left, work) for left in ahead)
    return sum(ahead) + work


def _penalty(worker: WorkerState) -> float:
    factor = 1.0
    if worker.on_battery:
        factor *= BATTERY_PENALTY
    if worker.user_active:
        factor *= USER_ACTIVE_PENALTY
    if worker.memory_free_mb is not None and worker.memory_free_mb < LOW_MEMORY_MB:
        factor *= LOW_MEMORY_PENALTY
    return factor


def estimate(
    worker: WorkerState, work: float, ahead_s: Sequence[float], penalty: float | None = None
) -> float | None:
    """Estimated seconds until a request of `work` seconds would be finished on `worker`.

    `ahead_s`: the remaining seconds of each request ahead of this one. None:
    the worker cannot take it (offline, or its queue is full). `penalty`: the
    factor for its conditions (default: all of them, on `work` at its rates).
    """
    if not worker.online:
        return None
    slots = max(1, worker.max_running)
    if len(ahead_s) >= slots + max(0, worker.max_queued):
        return None  # it would answer 429
    factor = _penalty(worker) if penalty is None else penalty
    return finish_seconds(work, ahead_s, slots) * factor


def _slower(measured: float | None, bound: float) -> float:
    """The measured rate, or `bound` where that is slower (or nothing is measured)."""
    return bound if measured is None or measured <= 0 else min(measured, bound)


def _pick_model(worker: WorkerState, request: RouteRequest) -> str | None:
    if request.model is not None:
        return request.model if request.model in worker.chat_models else None
    if not worker.chat_models:
        return None
    # The fastest measured model, else the first one the worker lists.
    return max(
        worker.chat_models,
        key=lambda name: worker.chat_models[name].decode_tok_s or 0.0,
    )


def _reasons(worker: WorkerState) -> tuple[str, ...]:
    return tuple(
        reason
        for reason, flag in (
            ("on_battery", worker.on_battery),
            ("user_active", worker.user_active),
            (
                "low_memory",
                worker.memory_free_mb is not None and worker.memory_free_mb < LOW_MEMORY_MB,
            ),
            ("busy", worker.running + worker.queued > 0),
        )
        if flag
    )


def _with_reasons(candidate: Candidate, *reasons: str) -> Candidate:
    return replace(candidate, reasons=(*candidate.reasons, *reasons))


def flagged(worker: WorkerState) -> tuple[str, ...]:
    """The household flags that keep requests off `worker` right now."""
    reasons: list[str] = []
    if worker.only_when_idle and worker.user_active:
        reasons.append("only_when_idle")
    if worker.not_on_battery and worker.on_battery:
        reasons.append("not_on_battery")
    return tuple(reasons)


class Router:
    """The routing policy with memory: reservations, stickiness, circuit breakers.

    Use: ``candidates = router.rank(states, request)``; try them in order; for
    the one that takes the request ``res = router.reserve(candidate, request)``
    before sending, ``router.report_failure(worker_id)`` if it fails or times
    out (and `release`), ``router.report_success(worker_id)`` once it answers,
    and ``router.release(res, completion_tokens=n)`` when the answer is done.
    Call ``router.observe_snapshot(worker_id)`` whenever a fresh capacity
    snapshot of a worker arrives.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        sticky_factor: float = STICKY_FACTOR,
        sticky_ttl_s: float = STICKY_TTL_S,
        breaker_base_s: float = BREAKER_BASE_S,
        breaker_max_s: float = BREAKER_MAX_S,
    ) -> None:
        self._clock = clock
        self.sticky_factor = sticky_factor
        self.sticky_ttl_s = sticky_ttl_s
        self.breaker_base_s = breaker_base_s
        self.breaker_max_s = breaker_max_s
        self._ids = count(1)
        # worker id -> open reservations, oldest first
        self._open: dict[str, dict[int, Reservation]] = {}
        self._last_release: dict[str, float] = {}
        # worker id -> how many of our reservations were open when its last snapshot came
        self._own_at_snapshot: dict[str, int] = {}
        self._sticky: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._breakers: dict[str, _Breaker] = {}
        self._answer_tokens: dict[str, float] = {}
        # worker id -> since when our open requests keep it busy (accounted up to then)
        self._busy_mark: dict[str, float] = {}
        self._busy_s: dict[str, float] = {}
        self._work_s: dict[str, float] = {}
        # worker id -> (model, prefix key) of our requests it answered since its last snapshot
        self._answered: dict[str, set[tuple[str, str]]] = {}
        # (worker id, speech kind) -> our speech jobs open there
        self._speech: dict[tuple[str, str], int] = {}
        # (worker id, model) -> its rates in its last snapshot without a penalised condition
        self._normal_rates: dict[tuple[str, str], ModelRate] = {}

    # --- what the caller reports --------------------------------------------

    def observe_snapshot(self, worker_id: str) -> None:
        """A fresh capacity snapshot of `worker_id` arrived (it shows our open requests)."""
        self._own_at_snapshot[worker_id] = len(self._open.get(worker_id, {}))
        self._answered.pop(worker_id, None)  # the snapshot tells what its cache holds now

    def reserve(self, candidate: Candidate, request: RouteRequest) -> Reservation:
        """Count `request` against `candidate`'s worker until `release`."""
        now = self._clock()
        worker_id = candidate.worker_id
        busy = self._open.setdefault(worker_id, {})
        if not busy:
            self._busy_mark[worker_id] = now
        work = candidate.work_s if candidate.work_s > 0 else candidate.estimated_s
        reservation = Reservation(
            next(self._ids),
            worker_id,
            request.purpose,
            work,
            now,
            candidate.reported_work_s,
            candidate.token_s,
            candidate.new_tokens,
            candidate.model,
            request.prefix_key,
            candidate.prompt_token_s,
            candidate.cached_tokens,
        )
        busy[reservation.reservation_id] = reservation
        if request.conversation_id is not None:
            self._sticky[request.conversation_id] = (worker_id, now)
            self._sticky.move_to_end(request.conversation_id)
            while len(self._sticky) > STICKY_MAX_CONVERSATIONS:
                self._sticky.popitem(last=False)
        breaker = self._breakers.get(worker_id)
        if breaker is not None and self._breaker_state(breaker, now) is BreakerState.HALF_OPEN:
            breaker.probing = True
        return reservation

    def release(
        self,
        reservation: Reservation,
        *,
        completion_tokens: int | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        """The request is over (answered, failed or cancelled); idempotent.

        `cached_tokens`: the prompt tokens the worker's cache supplied (its usage),
        when it said; the speed check then counts the prefill it really did.
        """
        worker_id = reservation.worker_id
        busy = self._open.get(worker_id, {})
        if busy.pop(reservation.reservation_id, None) is None:
            return
        now = self._clock()
        self._last_release[worker_id] = now
        busy_s = now - self._busy_mark.get(worker_id, now)
        self._busy_mark[worker_id] = now
        if breaker := self._breakers.get(reservation.worker_id):
            breaker.probing = False
        if completion_tokens is not None and reservation.prefix_key is not None:
            answered = self._answered.setdefault(worker_id, set())
            answered.add((reservation.model, reservation.prefix_key))
        if completion_tokens is not None and completion_tokens > 0:
            self._calibrate(reservation, busy_s, completion_tokens, cached_tokens)
            old = self._answer_tokens.get(reservation.purpose)
            self._answer_tokens[reservation.purpose] = (
                float(completion_tokens)
                if old is None
                else ANSWER_LENGTH_ALPHA * completion_tokens + (1 - ANSWER_LENGTH_ALPHA) * old
            )

    def _calibrate(
        self,
        reservation: Reservation,
        busy_s: float,
        completion_tokens: int,
        cached_tokens: int | None = None,
    ) -> None:
        """Check the worker's reported speed against the work it got done for us.

        The rates a worker reports are per request: a request that shared the
        machine looks slower, one that had it alone faster, and they lag when a
        person starts using the machine. What counts for a finish time is the
        machine's throughput: the work (at its reported rates) of our finished
        requests against the time it was busy with our requests. The ratio of the
        two, over about the last CALIBRATION_TAU_S seconds of busy time, scales
        the worker's estimates (within [1/CALIBRATION_LIMIT, CALIBRATION_LIMIT]).
        """
        worker_id = reservation.worker_id
        work = reservation.reported_work_s + reservation.token_s * (
            completion_tokens - reservation.new_tokens
        )
        if cached_tokens is not None:  # the prefill it did, not the one planned for
            work += reservation.prompt_token_s * (reservation.cached_tokens - cached_tokens)
        if work <= 0 or busy_s < 0:
            return
        keep = math.exp(-busy_s / CALIBRATION_TAU_S)
        self._busy_s[worker_id] = self._busy_s.get(worker_id, 0.0) * keep + busy_s
        self._work_s[worker_id] = self._work_s.get(worker_id, 0.0) * keep + work

    def scale(self, worker_id: str) -> float:
        """The correction applied to `worker_id`'s reported rates (1.0: none)."""
        work = self._work_s.get(worker_id, 0.0)
        if work < CALIBRATION_MIN_WORK_S:
            return 1.0
        ratio = self._busy_s.get(worker_id, 0.0) / work
        return min(max(ratio, 1 / CALIBRATION_LIMIT), CALIBRATION_LIMIT)

    def report_success(self, worker_id: str) -> None:
        """The worker answered (the whole answer arrived): close its breaker."""
        self._breakers.pop(worker_id, None)

    def report_failure(self, worker_id: str) -> None:
        """The worker failed or timed out: open its breaker, backing off."""
        breaker = self._breakers.setdefault(worker_id, _Breaker())
        breaker.failures += 1
        breaker.probing = False
        backoff = min(self.breaker_base_s * 2 ** (breaker.failures - 1), self.breaker_max_s)
        breaker.open_until = self._clock() + backoff

    def forget(self, worker_id: str) -> None:
        """A worker left the household."""
        self._open.pop(worker_id, None)
        self._last_release.pop(worker_id, None)
        self._own_at_snapshot.pop(worker_id, None)
        self._breakers.pop(worker_id, None)
        for table in (self._busy_mark, self._busy_s, self._work_s):
            table.pop(worker_id, None)
        self._answered.pop(worker_id, None)
        for pair in [pair for pair in self._normal_rates if pair[0] == worker_id]:
            del self._normal_rates[pair]
        for key in [key for key in self._speech if key[0] == worker_id]:
            del self._speech[key]
        for conversation in [c for c, (w, _) in self._sticky.items() if w == worker_id]:
            del self._sticky[conversation]

    def begin_speech(self, worker_id: str, kind: str) -> None:
        """A speech job of `kind` was sent to `worker_id` (until `end_speech`)."""
        self._speech[worker_id, kind] = self._speech.get((worker_id, kind), 0) + 1
        breaker = self._breakers.get(worker_id)
        if breaker is not None and self._breaker_state(breaker, self._clock()) is (
            BreakerState.HALF_OPEN
        ):
            breaker.probing = True

    def end_speech(self, worker_id: str, kind: str) -> None:
        """The speech job is over (answered, failed or given up)."""
        left = self._speech.get((worker_id, kind), 0) - 1
        if left > 0:
            self._speech[worker_id, kind] = left
        else:
            self._speech.pop((worker_id, kind), None)
        if breaker := self._breakers.get(worker_id):
            breaker.probing = False

    def speech_in_flight(self, worker_id: str, kind: str) -> int:
        """Our open speech jobs of `kind` on `worker_id`."""
        return self._speech.get((worker_id, kind), 0)

    def rank_speech(
        self, workers: Iterable[SpeechWorkerState], request: SpeechRequest
    ) -> list[SpeechCandidate]:
        """Workers for a speech job, best first (see `rank_speech`): our chat requests
        and speech jobs open on each, and the circuit breakers, count."""
        workers = list(workers)
        now = self._clock()
        breakers = {
            worker.worker_id: self._breaker_state(breaker, now)
            for worker in workers
            if (breaker := self._breakers.get(worker.worker_id)) is not None
        }
        probing = frozenset(
            worker_id for worker_id, breaker in self._breakers.items() if breaker.probing
        )
        return rank_speech(
            workers,
            request,
            own_chat={w.worker_id: self.in_flight(w.worker_id) for w in workers},
            own_speech={
                w.worker_id: self.speech_in_flight(w.worker_id, request.kind) for w in workers
            },
            breakers=breakers,
            probing=probing,
        )

    # --- what the caller may look at ----------------------------------------

    def breaker_state(self, worker_id: str) -> BreakerState:
        breaker = self._breakers.get(worker_id)
        if breaker is None:
            return BreakerState.CLOSED
        return self._breaker_state(breaker, self._clock())

    def in_flight(self, worker_id: str) -> int:
        """Our open requests on `worker_id`."""
        return len(self._open.get(worker_id, {}))

    def expected_new_tokens(self, request: RouteRequest) -> float:
        """The answer length to plan for: learned for this purpose, at most max_new_tokens."""
        learned = self._answer_tokens.get(request.purpose)
        if learned is None:
            return float(request.max_new_tokens)
        return min(float(request.max_new_tokens), learned)

    def sticky_worker(self, conversation_id: str | None) -> str | None:
        if conversation_id is None or conversation_id not in self._sticky:
            return None
        worker_id, since = self._sticky[conversation_id]
        if self._clock() - since > self.sticky_ttl_s:
            del self._sticky[conversation_id]
            return None
        return worker_id

    # --- ranking --------------------------------------------------------------

    def _breaker_state(self, breaker: _Breaker, now: float) -> BreakerState:
        if breaker.failures == 0:
            return BreakerState.CLOSED
        return BreakerState.OPEN if now < breaker.open_until else BreakerState.HALF_OPEN

    def _own_ahead(self, worker_id: str, now: float) -> list[float]:
        """Estimated seconds of work left of each of our open requests on `worker_id`.

        The worker drains them one after another at its estimated speed,
        starting when the oldest was sent or the last one finished, whichever
        is later: one not started by that reckoning has all of its work left
        (not the time until it ends: that counted the work ahead of it again);
        one that outlives its estimate still has a share of it left.
        """
        busy = self._open.get(worker_id)
        if not busy:
            return []
        left: list[float] = []
        first = next(iter(busy.values()))
        t = max(first.started, self._last_release.get(worker_id, -math.inf))
        for reservation in busy.values():
            start = max(t, reservation.started)
            if start > now:  # not started yet: all of its work is left
                remaining = reservation.estimated_s
            else:
                remaining = max(
                    start + reservation.estimated_s - now,
                    OVERDUE_SHARE * reservation.estimated_s,
                )
            left.append(remaining)
            t = max(start, now) + remaining
        return left

    def _conditions(self, worker: WorkerState, model: str) -> tuple[ModelRate, float]:
        """The rates to plan `model` on `worker` with, and the penalty left to apply.

        A worker on battery, in use or short of memory is expected to be
        `_penalty` times slower than in normal conditions. The rates it reports
        are measured on the requests it served, so once it has served some in
        these conditions they show the slow-down already: the penalty then
        bounds its rates (those of its last snapshot in normal conditions,
        divided by the penalty) instead of multiplying the estimate, so a
        slow-down is not counted twice. Without rates from normal conditions
        the whole estimate is multiplied by the penalty.
        """
        rate = worker.chat_models[model]
        penalty = _penalty(worker)
        key = (worker.worker_id, model)
        if penalty == 1.0:
            if rate.prefill_tok_s is not None or rate.decode_tok_s is not None:
                self._normal_rates[key] = rate
            return rate, 1.0
        normal = self._normal_rates.get(key)
        if normal is None:
            return rate, penalty
        prefill = _rate(normal.prefill_tok_s, DEFAULT_PREFILL_TOK_S) / penalty
        decode = _rate(normal.decode_tok_s, DEFAULT_DECODE_TOK_S) / penalty
        return ModelRate(
            _slower(rate.prefill_tok_s, prefill), _slower(rate.decode_tok_s, decode)
        ), 1.0

    def _candidate(
        self, worker: WorkerState, request: RouteRequest, now: float, new_tokens: float
    ) -> Candidate | None:
        model = _pick_model(worker, request)
        if model is None:
            return None
        reported = worker.chat_models[model]
        rate, penalty = self._conditions(worker, model)
        scale = self.scale(worker.worker_id)
        answered = frozenset(self._answered.get(worker.worker_id, ()))
        warm = holds_prefix(worker, model, request, answered)
        cached = min(request.prefix_tokens, request.prompt_tokens - 1) if warm else 0
        work = request_seconds(rate, request, new_tokens, cached) * scale
        own = self._own_ahead(worker.worker_id, now)
        shown = max(0, self._own_at_snapshot.get(worker.worker_id, 0))
        others = max(0, worker.running + worker.queued - shown)
        ahead = [*own, *[work] * others]
        seconds = estimate(worker, work, ahead, penalty)
        if seconds is None:
            return None
        reasons = _reasons(worker)
        if own:
            reasons = (*reasons, "reserved")
        if warm:
            reasons = (*reasons, "warm")
        # The speed check compares the work at the rates the worker reported.
        token_s = 1 / _rate(reported.decode_tok_s, DEFAULT_DECODE_TOK_S)
        prompt_token_s = 1 / _rate(reported.prefill_tok_s, DEFAULT_PREFILL_TOK_S)
        return Candidate(
            worker.worker_id,
            model,
            seconds,
            reasons,
            work,
            request_seconds(reported, request, new_tokens, cached),
            token_s,
            new_tokens,
            prompt_token_s,
            cached,
        )

    def rank(self, workers: Iterable[WorkerState], request: RouteRequest) -> list[Candidate]:
        """Every worker that can answer, best first, last resorts at the end.

        Order: workers free to take it by estimated finish (a sticky worker
        moved to the front when within `sticky_factor` of the best; a worker
        holding the request's household prefix is estimated without its
        prefill), then
        workers the household flags keep out right now, then workers whose
        breaker is open or that are being probed.
        """
        now = self._clock()
        new_tokens = self.expected_new_tokens(request)
        tiers: tuple[list[Candidate], list[Candidate], list[Candidate]] = ([], [], [])
        for worker in workers:
            candidate = self._candidate(worker, request, now, new_tokens)
            if candidate is None:
                continue
            tier = 0
            if flags := flagged(worker):
                tier = 1
                candidate = _with_reasons(candidate, *flags)
            breaker = self._breakers.get(worker.worker_id)
            if breaker is not None:
                state = self._breaker_state(breaker, now)
                if state is BreakerState.OPEN or breaker.probing:
                    tier = 2
                    candidate = _with_reasons(candidate, f"breaker_{state}")
                else:
                    candidate = _with_reasons(candidate, "breaker_half_open")
            tiers[tier].append(candidate)
        for tier_list in tiers:
            tier_list.sort(key=lambda c: (c.estimated_s, c.worker_id))
        first = tiers[0]
        sticky = self.sticky_worker(request.conversation_id)
        if sticky is not None and first:
            index = next((i for i, c in enumerate(first) if c.worker_id == sticky), None)
            if (
                index is not None
                and index > 0
                and first[index].estimated_s <= self.sticky_factor * first[0].estimated_s
            ):
                chosen = first.pop(index)
                first.insert(0, _with_reasons(chosen, "sticky"))
        return [*tiers[0], *tiers[1], *tiers[2]]


# --- speech -------------------------------------------------------------------------
#
# Speech jobs (speech-to-text, text-to-speech) are a class of their own: a person
# waits for them mid-sentence, so they are never queued behind chat or AI-task work
# on a worker when another worker can take them, and a worker runs one
# speech-to-text job at a time. The tiers, best first:
#
# 0. free: online, no chat work in flight (ours or, by its last snapshot, other
#    clients'), no speech job of the same kind of ours running there;
# 1. busy: chat work in flight, or a speech job of the same kind (the worker would
#    queue it), or the avoided worker (within one voice turn, text-to-speech goes
#    to another worker than the one generating the answer when one is free);
# 2. the household flags keep it out right now ("only when idle", "not on battery"),
#    or it runs on the Home Assistant host (the add-on): that machine, often a small
#    board, serves speech only when no other worker can;
# 3. its circuit breaker is open (or it is being probed).
#
# Within a tier: estimated seconds (measured costs where the worker reported them,
# defaults where not; a model not in memory adds COLD_START_S: warm models are
# preferred), then the worker id. A request names a model (a voice) or a language;
# a worker offers it when one of its speech models of that kind does.

STT = "stt"
TTS = "tts"
# Defaults until a worker has measured its speech models.
DEFAULT_STT_FIXED_S = 1.0
DEFAULT_STT_S_PER_AUDIO_S = 0.3
DEFAULT_TTS_FIRST_AUDIO_S = 0.3
DEFAULT_TTS_RTF = 0.2
# A model the worker has not in memory: loading it first.
COLD_START_S = 2.0
# Speech-to-text fails over to the next worker when the first is slower than
# SLOW_FACTOR times its own measured estimate, plus SLOW_SLACK_S.
SLOW_FACTOR = 3.0
SLOW_SLACK_S = 1.0
# A voice's rate when no worker says (Piper's medium voices).
DEFAULT_TTS_SAMPLE_RATE = 22050


@dataclass(frozen=True, slots=True)
class SpeechModelState:
    """One speech model on one worker: what it offers, whether warm, what it costs.

    Costs are None until the worker measured them (its /v1/capacity).
    """

    model: str
    kind: str  # STT or TTS
    languages: tuple[str, ...] = ()
    voices: tuple[str, ...] = ()
    sample_rate: int = 16000
    warm: bool = False
    stt_fixed_ms: float | None = None
    stt_ms_per_audio_s: float | None = None
    tts_first_audio_ms: float | None = None
    tts_rtf: float | None = None

    def offers(self, language: str | None) -> bool:
        """Whether it speaks or understands `language` (None, or no languages known: any)."""
        if language is None or not self.languages:
            return True
        wanted = _base_language(language)
        return any(_base_language(offered) == wanted for offered in self.languages)

    @property
    def measured(self) -> bool:
        if self.kind == STT:
            return self.stt_fixed_ms is not None and self.stt_ms_per_audio_s is not None
        return self.tts_first_audio_ms is not None


def _base_language(language: str) -> str:
    """ "en-US", "en_US" and "en" are one language for matching."""
    return language.replace("_", "-").split("-")[0].lower()


def language_tag(language: str) -> str:
    """A language as Home Assistant writes it: "en_US" -> "en-US", "EN" -> "en"."""
    base, _, region = language.replace("_", "-").partition("-")
    return f"{base.lower()}-{region.upper()}" if region else base.lower()


def offered_languages(models: Iterable[SpeechModelState]) -> list[str]:
    """The languages `models` offer together, as Home Assistant tags, sorted; each
    regional one ("en-US") with its base language ("en") too."""
    tags: set[str] = set()
    for model in models:
        for language in model.languages:
            tag = language_tag(language)
            tags.update({tag, tag.split("-")[0]})
    return sorted(tags)


def iso_language(language: str | None) -> str | None:
    """The ISO 639-1 code a worker's speech-to-text takes ("en-US" -> "en")."""
    return _base_language(language) if language else None


@dataclass(frozen=True, slots=True)
class SpeechWorkerState:
    """What the router knows about one worker for speech."""

    worker_id: str
    models: tuple[SpeechModelState, ...]
    online: bool = True
    # Chat and AI-task requests running or queued there by its last snapshot.
    chat_running: int = 0
    on_battery: bool | None = None
    user_active: bool | None = None
    only_when_idle: bool = False
    not_on_battery: bool = False
    on_home_assistant_host: bool = False  # the add-on

    def flagged(self) -> tuple[str, ...]:
        reasons: list[str] = []
        if self.on_home_assistant_host:
            reasons.append("home_assistant_host")
        if self.only_when_idle and self.user_active:
            reasons.append("only_when_idle")
        if self.not_on_battery and self.on_battery:
            reasons.append("not_on_battery")
        return tuple(reasons)


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    """A speech job to place.

    `model`: the model (voice) wanted, None: any of the kind offering `language`.
    `audio_s`: seconds of audio to transcribe (an estimate while it is spoken);
    `text_chars`: the text to speak. `avoid`: a worker to leave to other work
    when another is free (the one generating the answer of this voice turn).
    """

    kind: str
    language: str | None = None
    model: str | None = None
    audio_s: float = 5.0
    text_chars: int = 60
    avoid: str | None = None


@dataclass(frozen=True, slots=True)
class SpeechCandidate:
    """A worker that can take a speech job, with the model and its estimate."""

    worker_id: str
    model: str
    estimated_s: float
    # Seconds after the end of the audio by which an answer is overdue (the
    # worker is slower than its own measured costs allow): the next worker gets
    # the same audio. None: nothing measured, no such deadline.
    deadline_s: float | None = None
    reasons: tuple[str, ...] = field(default=(), compare=False)


def speech_seconds(model: SpeechModelState, request: SpeechRequest) -> float:
    """Estimated seconds of a speech job on an idle worker (after the audio's end for
    speech-to-text; to the first audio for text-to-speech), cold start included."""
    if model.kind == STT:
        fixed = model.stt_fixed_ms / 1000 if model.stt_fixed_ms is not None else DEFAULT_STT_FIXED_S
        per_s = (
            model.stt_ms_per_audio_s / 1000
            if model.stt_ms_per_audio_s is not None
            else DEFAULT_STT_S_PER_AUDIO_S
        )
        seconds = fixed + per_s * max(0.0, request.audio_s)
    else:
        first = (
            model.tts_first_audio_ms / 1000
            if model.tts_first_audio_ms is not None
            else DEFAULT_TTS_FIRST_AUDIO_S
        )
        seconds = first
    return seconds + (0.0 if model.warm else COLD_START_S)


def speech_deadline(model: SpeechModelState, request: SpeechRequest) -> float | None:
    """Seconds after the audio's end when an answer is overdue; None: nothing measured."""
    if model.kind != STT or not model.measured:
        return None
    return SLOW_FACTOR * speech_seconds(model, request) + SLOW_SLACK_S


def pick_speech_model(worker: SpeechWorkerState, request: SpeechRequest) -> SpeechModelState | None:
    """The worker's model for the request: the one named, else the best of its kind
    offering the language (warm first, then measured cost, then the first listed)."""
    offered = [
        model
        for model in worker.models
        if model.kind == request.kind
        and (request.model is None or model.model == request.model)
        and model.offers(request.language)
    ]
    if not offered:
        return None
    return min(offered, key=lambda model: speech_seconds(model, request))


def rank_speech(
    workers: Iterable[SpeechWorkerState],
    request: SpeechRequest,
    *,
    own_chat: Mapping[str, int] | None = None,
    own_speech: Mapping[str, int] | None = None,
    breakers: Mapping[str, BreakerState] | None = None,
    probing: frozenset[str] = frozenset(),
) -> list[SpeechCandidate]:
    """Every worker that can take the speech job, best first (tiers above).

    `own_chat`: our chat/AI-task requests open per worker; `own_speech`: our
    speech jobs of the request's kind open per worker; `breakers`: the circuit
    breaker state of each worker (missing: closed); `probing`: workers whose
    half-open breaker is being probed.
    """
    own_chat = own_chat or {}
    own_speech = own_speech or {}
    breakers = breakers or {}
    tiers: tuple[list[SpeechCandidate], ...] = ([], [], [], [])
    for worker in workers:
        if not worker.online:
            continue
        model = pick_speech_model(worker, request)
        if model is None:
            continue
        reasons: list[str] = []
        if not model.warm:
            reasons.append("cold")
        tier = 0
        if max(worker.chat_running, own_chat.get(worker.worker_id, 0)) > 0:
            tier, reasons = 1, [*reasons, "chat_in_flight"]
        if own_speech.get(worker.worker_id, 0) > 0:
            tier, reasons = 1, [*reasons, f"{request.kind}_in_flight"]
        if request.avoid is not None and worker.worker_id == request.avoid:
            tier, reasons = 1, [*reasons, "answering"]
        if flags := worker.flagged():
            tier, reasons = 2, [*reasons, *flags]
        state = breakers.get(worker.worker_id, BreakerState.CLOSED)
        if state is BreakerState.OPEN or worker.worker_id in probing:
            tier, reasons = 3, [*reasons, f"breaker_{state}"]
        elif state is BreakerState.HALF_OPEN:
            reasons.append("breaker_half_open")
        tiers[tier].append(
            SpeechCandidate(
                worker.worker_id,
                model.model,
                speech_seconds(model, request),
                speech_deadline(model, request),
                tuple(reasons),
            )
        )
    ranked: list[SpeechCandidate] = []
    for tier_list in tiers:
        ranked += sorted(tier_list, key=lambda c: (c.estimated_s, c.worker_id))
    return ranked
