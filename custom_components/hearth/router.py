"""Routing policy: which worker should answer a chat request.

A plain module with no Home Assistant imports: dataclasses in, a ranked list
out. The caller tries the first candidate and fails over to the next one if a
worker fails before its first token.

The estimate is the time until the answer is finished:

* per-request work = prompt tokens / prefill rate + new tokens / decode rate,
  with measured rates where the worker has served the model, defaults where not;
* requests beyond the worker's parallel slots wait for the queue to drain;
* requests running in parallel on one machine share its compute;
* a worker on battery or in use by a person is made to look slower, so it is
  picked only when it is clearly the better choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_PREFILL_TOK_S = 200.0
DEFAULT_DECODE_TOK_S = 20.0
BATTERY_PENALTY = 2.0
USER_ACTIVE_PENALTY = 1.5


@dataclass(frozen=True, slots=True)
class ModelRate:
    """Measured speed of one model on one worker (None: not measured yet)."""

    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What the router knows about one worker."""

    worker_id: str
    chat_models: Mapping[str, ModelRate]
    online: bool = True
    running: int = 0
    queued: int = 0
    max_running: int = 1
    max_queued: int = 0
    on_battery: bool | None = None
    user_active: bool | None = None


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """The request to place. `model` None: any chat model will do."""

    model: str | None = None
    prompt_tokens: int = 256
    max_new_tokens: int = 128


@dataclass(frozen=True, slots=True)
class Candidate:
    """One worker that can answer, with its estimated finish time."""

    worker_id: str
    model: str
    estimated_s: float
    reasons: tuple[str, ...] = field(default=(), compare=False)


def _rate(measured: float | None, default: float) -> float:
    return measured if measured is not None and measured > 0 else default


def request_seconds(rate: ModelRate, request: RouteRequest) -> float:
    """Time one request takes on an otherwise idle worker."""
    prefill = _rate(rate.prefill_tok_s, DEFAULT_PREFILL_TOK_S)
    decode = _rate(rate.decode_tok_s, DEFAULT_DECODE_TOK_S)
    return request.prompt_tokens / prefill + request.max_new_tokens / decode


def estimate(worker: WorkerState, rate: ModelRate, request: RouteRequest) -> float | None:
    """Estimated seconds until `request` would be finished on `worker`; None: cannot take it."""
    if not worker.online:
        return None
    slots = max(1, worker.max_running)
    if worker.running >= slots and worker.queued >= worker.max_queued:
        return None  # it would answer 429
    work = request_seconds(rate, request)
    ahead = worker.running + worker.queued
    # Beyond the free slots a request waits, on average, for the queue ahead
    # of it to drain `slots` at a time; then it shares the machine with the rest.
    waiting = max(0, ahead - slots + 1) / slots
    sharing = min(ahead, slots - 1) + 1
    seconds = (waiting + sharing) * work
    if worker.on_battery:
        seconds *= BATTERY_PENALTY
    if worker.user_active:
        seconds *= USER_ACTIVE_PENALTY
    return seconds


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


def rank(workers: Iterable[WorkerState], request: RouteRequest) -> list[Candidate]:
    """Every worker that can answer, fastest expected finish first."""
    candidates: list[Candidate] = []
    for worker in workers:
        model = _pick_model(worker, request)
        if model is None:
            continue
        seconds = estimate(worker, worker.chat_models[model], request)
        if seconds is None:
            continue
        reasons = tuple(
            reason
            for reason, flag in (
                ("on_battery", worker.on_battery),
                ("user_active", worker.user_active),
                ("busy", worker.running + worker.queued > 0),
            )
            if flag
        )
        candidates.append(Candidate(worker.worker_id, model, seconds, reasons))
    candidates.sort(key=lambda c: (c.estimated_s, c.worker_id))
    return candidates
