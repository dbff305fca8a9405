"""Routing benchmark: a discrete-event simulation of one household.

Heterogeneous workers (rates scaled from a real `scripts/bench_worker` run,
table below) serve bursts of voice requests (long prompt, short answer,
conversations of a few turns) and bursts of background automation requests
(one trigger firing several at once); a few requests from another client
reach the desktop directly; a person uses the laptop now and then, unplugs
it, and finally takes it away mid-run (it comes back later). Each policy runs
the very same workload (common random numbers):

* hearth: the real `custom_components.hearth.router.Router` on the simulated
  clock. It sees only what the integration sees: capacity snapshots polled
  every 10 s (stale in between; an unreachable worker is noticed when its poll
  times out, and the poll interval backs off while it stays away), rates the
  worker measured on the requests it served, its own in-flight reservations,
  and the failures of its own requests;
* random, round_robin, least_outstanding (fewest of its own requests
  outstanding), power_of_two (two random workers, the one with fewer): the same
  polled online/flag view and the same fail-over;
* oracle: knows the true state and the true service time of every request
  (noise, answer length, sharing, slow-downs) and picks the earliest finish.

Every policy honours the household flags the same way (a flagged worker only
when no other one is left) and fails over the same way: connection errors and
stalls are noticed after a 5 s timeout, a full worker answers 429 at once.
Latency: arrival to last token, including failed attempts; "lost": requests
no worker took within 60 s (every worker full or failing). Fixed seed.

The worker's prompt cache is modelled as it works (prompt_cache.py): it keeps
the last `CACHE_ENTRIES` prompts (LRU; its budget); a request started there
reuses the entry sharing the most with its prompt (taken out while it runs,
put back with its prompt when done) and skips that prefill: the previous turn's
prompt for the next turn of a conversation, the household prefix (system prompt
and tools, `PREFIX_TOKENS`, the same for every voice request) for another
conversation. A worker that leaves loses its cache. Capacity snapshots tell
whether a worker holds the household prefix (`warm_keys`, polled, so up to a
poll interval stale); hearth sends the prefix key (router.py: a warm worker is
estimated without that prefill) and keeps conversations on their worker
(stickiness); the oracle knows every cache; the other policies get the saving
wherever they happen to land.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from custom_components.hearth import router  # noqa: E402

# --------------------------------------------------------------------------- measured rates
# `scripts/bench_worker` on the 2-core development VM, tiny int4 bench model
# (135M Llama shape), 64-token prompt: the engine decodes ~165 tok/s, time to
# first token through the API ~84 ms, i.e. ~760 tok/s prefill (64 / 0.084).
REF_DECODE_TOK_S = 165.0
REF_PREFILL_TOK_S = 64 / 0.084


@dataclass(frozen=True)
class Device:
    """One household machine: its speed relative to the reference VM."""

    name: str
    role: str
    speed: float
    slots: int  # --max-running
    only_when_idle: bool = False
    not_on_battery: bool = False
    # Fraction of the time a person uses it, and how much slower it then is.
    active_share: float = 0.0
    active_slowdown: float = 1.0
    battery_share: float = 0.0
    leaves: bool = False  # taken away mid-run


DEVICES: tuple[Device, ...] = (
    # 8-core desktop, two generations at once; someone games on it now and then.
    Device("desktop", "8-core desktop", 2.5, 2, active_share=0.3, active_slowdown=0.6),
    # laptop: "only when idle" and "not on battery"; it leaves mid-run and comes back.
    Device(
        "laptop",
        "4-core laptop",
        1.2,
        1,
        only_when_idle=True,
        not_on_battery=True,
        active_share=0.25,
        active_slowdown=0.5,
        battery_share=0.2,
        leaves=True,
    ),
    Device("mini_pc", "N100-class mini-PC", 1.0, 1),
    Device("ha_host", "Home Assistant host (Pi 5 class)", 0.4, 1),
)


def device_table() -> str:
    """The workers as a Markdown table: speed, the rates it implies, flags, behaviour."""
    lines = [
        "| worker | machine | speed x ref | prefill tok/s | decode tok/s | slots | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in DEVICES:
        notes = [
            *(["only when idle"] if d.only_when_idle else []),
            *(["not on battery"] if d.not_on_battery else []),
            *(
                [f"in use {d.active_share:.0%} of the time ({d.active_slowdown}x)"]
                if d.active_share
                else []
            ),
            *([f"on battery {d.battery_share:.0%}"] if d.battery_share else []),
            *([f"away {LEAVE_AT:.0%}-{RETURN_AT:.0%} of the run"] if d.leaves else []),
        ]
        lines.append(
            f"| {d.name} | {d.role} | {d.speed} | {REF_PREFILL_TOK_S * d.speed:.0f} | "
            f"{REF_DECODE_TOK_S * d.speed:.0f} | {d.slots} | {', '.join(notes) or '-'} |"
        )
    return "\n".join(lines)


MAX_QUEUED = 8  # the worker's default --max-queued
POLL_S = 10.0  # coordinator SCAN_INTERVAL
POLL_TIMEOUT_S = 10.0  # client REQUEST_TIMEOUT
MAX_POLL_S = 60.0  # coordinator MAX_SCAN_INTERVAL
FAIL_DETECT_S = 5.0  # connect timeout / stall on a worker that went silent
REJECT_S = 0.005  # a 429 comes back at once
RETRY_AFTER_S = 0.5  # every worker full: wait and try again
GIVE_UP_S = 60.0
NOISE_SIGMA = 0.15  # true service time noise (lognormal)
WARMUP_NOISE_SIGMA = 0.1  # the warm-up measurement's error
RATE_ALPHA = 0.3  # the worker's RateTracker
LEAVE_AT, RETURN_AT = 0.40, 0.65  # shares of the run
EXTERNAL_SHARE = 0.05  # another client's load on the desktop, share of its capacity
VOICE_WORK_SHARE = 0.5
# The household prefix every voice request starts with (system prompt, tools),
# and how many prompts a worker's prompt cache keeps (LRU): the worker's default
# budget (1024 MB) over one entry of the reference model (135M Llama shape: 30
# layers x 2 x 3 KV heads x 64 x 4 bytes = 46 KB a token) sized for a voice
# prompt (~1,400 tokens with chat_engine's headroom): ~64 MB, 16 entries. (A 3B
# model's entries, ~0.5 GB, leave 2: run with CACHE_ENTRIES = 2 to see that.)
PREFIX_TOKENS = 400
CACHE_ENTRIES = 16
PREFIX_KEY = "household"


# --------------------------------------------------------------------------- workload


@dataclass
class Request:
    rid: int
    arrival: float
    kind: str
    prompt: int
    max_new: int
    new: int
    noise: float
    conversation: str | None = None
    external: bool = False
    target: str | None = None  # external requests go straight to this worker
    prefix: bool = False  # starts with the household prefix (voice)

    @property
    def nominal(self) -> float:
        """Seconds on the reference machine without noise."""
        return self.prompt / REF_PREFILL_TOK_S + self.new / REF_DECODE_TOK_S

    @property
    def work(self) -> float:
        """True seconds on the reference machine, alone."""
        return self.nominal * self.noise


def _voice_session(rng: random.Random, t0: float, sid: int) -> list[tuple[float, dict[str, Any]]]:
    turns = 1 + min(int(rng.expovariate(1 / 1.2)), 3)
    out = []
    t = t0
    for turn in range(turns):
        out.append(
            (
                t,
                {
                    "kind": "voice",
                    "prompt": 500 + 120 * turn + rng.randint(-100, 100),
                    "max_new": 64,
                    "new": rng.randint(8, 48),
                    "conversation": f"c{sid}",
                    "prefix": True,
                },
            )
        )
        t += rng.uniform(4.0, 10.0)
    return out


def _voice_burst(rng: random.Random, t: float, sid: int) -> list[tuple[float, dict[str, Any]]]:
    out = []
    for i in range(rng.choice((1, 1, 2, 3))):
        out += _voice_session(rng, t + rng.uniform(0.0, 1.5), sid * 10 + i)
    return out


def _task_burst(rng: random.Random, t: float) -> list[tuple[float, dict[str, Any]]]:
    return [
        (
            t,
            {
                "kind": "task",
                "prompt": rng.randint(200, 1200),
                "max_new": 256,
                "new": rng.randint(32, 256),
            },
        )
        for _ in range(rng.choice((1, 1, 2, 3, 4, 6)))
    ]


def _mean_work(make: Callable[[random.Random], list[tuple[float, dict[str, Any]]]]) -> float:
    rng = random.Random(1234)
    total = 0.0
    n = 4000
    for _ in range(n):
        for _, spec in make(rng):
            total += spec["prompt"] / REF_PREFILL_TOK_S + spec["new"] / REF_DECODE_TOK_S
    return total / n


def usable_capacity() -> float:
    """Reference-machine seconds of work per second the household can serve, on average."""
    total = 0.0
    for d in DEVICES:
        speed = d.speed * (1 - d.active_share + d.active_share * d.active_slowdown)
        share = 1.0
        if d.leaves:
            share *= 1 - (RETURN_AT - LEAVE_AT)
        if d.only_when_idle:
            share *= 1 - d.active_share
        if d.not_on_battery:
            share *= 1 - d.battery_share
        if d.name == "desktop":
            speed *= 1 - EXTERNAL_SHARE
        total += speed * share
    return total


def workload(load: float, duration: float, seed: int) -> list[Request]:
    """The household's requests for one load level: arrivals, sizes, true noise."""
    rng = random.Random(f"{seed}-{load}")
    capacity = usable_capacity()
    voice_rate = VOICE_WORK_SHARE * load * capacity / _mean_work(lambda r: _voice_burst(r, 0, 0))
    task_rate = (1 - VOICE_WORK_SHARE) * load * capacity / _mean_work(lambda r: _task_burst(r, 0))
    items: list[tuple[float, dict[str, Any]]] = []
    t, sid = 0.0, 0
    while (t := t + rng.expovariate(voice_rate)) < duration:
        sid += 1
        items += _voice_burst(rng, t, sid)
    t = 0.0
    while (t := t + rng.expovariate(task_rate)) < duration:
        items += _task_burst(rng, t)
    desktop = next(d for d in DEVICES if d.name == "desktop")
    ext_mean = _mean_work(lambda r: _task_burst(r, 0)[:1])
    ext_rate = EXTERNAL_SHARE * desktop.speed / ext_mean
    t = 0.0
    while (t := t + rng.expovariate(ext_rate)) < duration:
        spec = _task_burst(rng, t)[0][1]
        items.append((t, {**spec, "kind": "external", "external": True, "target": "desktop"}))
    items.sort(key=lambda item: item[0])
    return [
        Request(i, t, noise=math.exp(rng.gauss(0.0, NOISE_SIGMA)), **spec)
        for i, (t, spec) in enumerate(items)
    ]


def schedule(duration: float, seed: int) -> list[tuple[float, str, str, bool]]:
    """(time, worker, what, value): people using machines, unplugging, leaving."""
    rng = random.Random(f"{seed}-people")
    out: list[tuple[float, str, str, bool]] = []
    for d in DEVICES:
        for what, share, mean_on in (
            ("user_active", d.active_share, 90.0),
            ("on_battery", d.battery_share, 120.0),
        ):
            if share <= 0:
                continue
            mean_off = mean_on * (1 - share) / share
            t, on = rng.uniform(0, mean_off), False
            while t < duration:
                on = not on
                out.append((t, d.name, what, on))
                t += rng.expovariate(1 / (mean_on if on else mean_off))
        if d.leaves:
            out.append((LEAVE_AT * duration, d.name, "gone", True))
            out.append((RETURN_AT * duration, d.name, "gone", False))
    return sorted(out)


# --------------------------------------------------------------------------- workers


@dataclass
class Job:
    request: Request
    worker: str
    left: float  # reference seconds of work left
    sent: float
    started: float | None = None
    token: Any = None  # the policy's bookkeeping (hearth: its reservation)
    saved: float = 0.0  # reference seconds (no noise) the prompt cache saved it
    cached_tokens: int = 0  # prompt tokens the prompt cache supplied


@dataclass
class Snapshot:
    online: bool = True
    running: int = 0
    queued: int = 0
    user_active: bool = False
    on_battery: bool = False
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    warm: bool = False  # its prompt cache holds the household prefix


@dataclass
class SimWorker:
    device: Device
    rng: random.Random
    running: list[Job] = field(default_factory=list)
    queue: deque[Job] = field(default_factory=deque)
    user_active: bool = False
    on_battery: bool = False
    gone: bool = False
    last: float = 0.0
    version: int = 0
    rate_factor: float = 1.0  # measured speed / reference (the worker's RateTracker)
    snapshot: Snapshot = field(default_factory=Snapshot)  # what the integration last polled
    poll_interval: float = POLL_S
    # The prompt cache, oldest first: (conversation, prompt tokens, has the prefix).
    cache: list[tuple[str | None, int, bool]] = field(default_factory=list)

    @property
    def warm(self) -> bool:
        return any(prefix for _, _, prefix in self.cache)

    def reuse(self, request: Request) -> tuple[int, int]:
        """(index of the cache entry sharing the most with `request`, tokens shared); -1: none."""
        best, shared = -1, 0
        for i, (conversation, tokens, prefix) in enumerate(self.cache):
            if request.conversation is not None and conversation == request.conversation:
                n = min(tokens, request.prompt - 1)
            elif prefix and request.prefix:
                n = min(PREFIX_TOKENS, request.prompt - 1)
            else:
                n = 0
            if n > shared:
                best, shared = i, n
        return best, shared

    def work_for(self, request: Request) -> float:
        """True reference seconds `request` takes here if it started now."""
        return request.work - self.reuse(request)[1] / REF_PREFILL_TOK_S * request.noise

    def __post_init__(self) -> None:
        self.warm_up()

    def warm_up(self) -> None:
        self.rate_factor = self.device.speed * math.exp(self.rng.gauss(0.0, WARMUP_NOISE_SIGMA))
        self.poll()

    @property
    def speed(self) -> float:
        return self.device.speed * (self.device.active_slowdown if self.user_active else 1.0)

    @property
    def full(self) -> bool:
        return len(self.running) + len(self.queue) >= self.device.slots + MAX_QUEUED

    def advance(self, now: float) -> None:
        if self.running and now > self.last:
            done = self.speed * (now - self.last) / len(self.running)
            for job in self.running:
                job.left -= done
        self.last = now

    def next_done(self) -> float | None:
        if not self.running:
            return None
        return self.last + min(j.left for j in self.running) * len(self.running) / self.speed

    def record(self, job: Job, now: float) -> None:
        assert job.started is not None
        sample = (job.request.nominal - job.saved) / max(now - job.started, 1e-9)
        self.rate_factor = RATE_ALPHA * sample + (1 - RATE_ALPHA) * self.rate_factor

    def poll(self) -> None:
        self.snapshot = Snapshot(
            online=True,
            running=len(self.running),
            queued=len(self.queue),
            user_active=self.user_active,
            on_battery=self.on_battery,
            prefill_tok_s=REF_PREFILL_TOK_S * self.rate_factor,
            decode_tok_s=REF_DECODE_TOK_S * self.rate_factor,
            warm=self.warm,
        )

    def true_finish(self, work: float) -> float:
        """Seconds until a new job of `work` would finish here, with no later arrivals."""
        running = [j.left for j in self.running]
        queue = [j.left for j in self.queue]
        mine = len(running) + len(queue)
        items = running + queue + [work]
        active = list(range(min(len(items), self.device.slots)))
        waiting = list(range(len(active), len(items)))
        left = items[:]
        t = 0.0
        while True:
            k = len(active)
            i = min(active, key=lambda a: left[a])
            step = left[i]
            t += step * k / self.speed
            for a in active:
                left[a] -= step
            if i == mine:
                return t
            active.remove(i)
            if waiting:
                active.append(waiting.pop(0))


# --------------------------------------------------------------------------- policies


class Policy:
    """Sees the polled snapshots and its own requests; picks a worker."""

    name = "policy"

    def __init__(self, sim: Simulation, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.outstanding: dict[str, int] = {d.name: 0 for d in DEVICES}

    def eligible(self, excluded: set[str]) -> list[str]:
        """Polled online, not already tried; flagged workers only if nothing else."""
        online = [
            name
            for name, w in self.sim.workers.items()
            if w.snapshot.online and name not in excluded
        ]
        free = [n for n in online if not self._flagged(n)]
        return free or online

    def _flagged(self, name: str) -> bool:
        w = self.sim.workers[name]
        return bool(
            (w.device.only_when_idle and w.snapshot.user_active)
            or (w.device.not_on_battery and w.snapshot.on_battery)
        )

    def choose(self, request: Request, excluded: set[str]) -> str | None:
        raise NotImplementedError

    def sent(self, job: Job) -> None:
        self.outstanding[job.worker] += 1

    def finished(self, job: Job, outcome: str) -> None:
        """outcome: done, failed (error/timeout) or rejected (429)."""
        self.outstanding[job.worker] -= 1

    def observed(self, worker: str) -> None:
        """A fresh snapshot of `worker` arrived."""


class RandomPolicy(Policy):
    name = "random"

    def choose(self, request: Request, excluded: set[str]) -> str | None:
        names = self.eligible(excluded)
        return self.rng.choice(names) if names else None


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, sim: Simulation, rng: random.Random) -> None:
        super().__init__(sim, rng)
        self.turn = itertools.cycle([d.name for d in DEVICES])

    def choose(self, request: Request, excluded: set[str]) -> str | None:
        names = set(self.eligible(excluded))
        if not names:
            return None
        while (name := next(self.turn)) not in names:
            pass
        return name


class LeastOutstandingPolicy(Policy):
    name = "least_outstanding"

    def choose(self, request: Request, excluded: set[str]) -> str | None:
        names = self.eligible(excluded)
        if not names:
            return None
        fewest = min(self.outstanding[n] for n in names)
        return self.rng.choice([n for n in names if self.outstanding[n] == fewest])


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"

    def choose(self, request: Request, excluded: set[str]) -> str | None:
        names = self.eligible(excluded)
        if len(names) < 2:
            return names[0] if names else None
        a, b = self.rng.sample(names, 2)
        if self.outstanding[a] == self.outstanding[b]:
            return self.rng.choice((a, b))
        return a if self.outstanding[a] < self.outstanding[b] else b


class OraclePolicy(Policy):
    """Knows the true state and true service times; earliest true finish."""

    name = "oracle"

    def choose(self, request: Request, excluded: set[str]) -> str | None:
        best: tuple[int, float, str] | None = None
        for name, w in self.sim.workers.items():
            if w.gone or w.full or name in excluded:
                continue
            flagged = (w.device.only_when_idle and w.user_active) or (
                w.device.not_on_battery and w.on_battery
            )
            w.advance(self.sim.now)
            key = (int(flagged), w.true_finish(w.work_for(request)), name)
            if best is None or key < best:
                best = key
        return best[2] if best else None


class HearthPolicy(Policy):
    """The integration's own policy: custom_components.hearth.router.Router."""

    name = "hearth"

    def __init__(self, sim: Simulation, rng: random.Random) -> None:
        super().__init__(sim, rng)
        self.router = router.Router(clock=lambda: sim.now)
        self.chosen: dict[int, tuple[router.Candidate, router.RouteRequest]] = {}

    def _state(self, name: str) -> router.WorkerState:
        w = self.sim.workers[name]
        s = w.snapshot
        return router.WorkerState(
            worker_id=name,
            chat_models={"tiny": router.ModelRate(s.prefill_tok_s, s.decode_tok_s)},
            online=s.online,
            running=s.running,
            queued=s.queued,
            max_running=w.device.slots,
            max_queued=MAX_QUEUED,
            on_battery=s.on_battery,
            user_active=s.user_active,
            warm_keys={"tiny": frozenset({PREFIX_KEY})} if s.warm else {},
            only_when_idle=w.device.only_when_idle,
            not_on_battery=w.device.not_on_battery,
        )

    def choose(self, request: Request, excluded: set[str]) -> str | None:
        route = router.RouteRequest(
            model=None,
            prompt_tokens=request.prompt,
            max_new_tokens=request.max_new,
            conversation_id=request.conversation,
            purpose=request.kind,
            prefix_key=PREFIX_KEY if request.prefix else None,
            prefix_tokens=PREFIX_TOKENS if request.prefix else 0,
        )
        states = [self._state(n) for n in self.sim.workers if n not in excluded]
        ranked = self.router.rank(states, route)
        if not ranked:
            return None
        self.chosen[request.rid] = (ranked[0], route)
        return ranked[0].worker_id

    def sent(self, job: Job) -> None:
        super().sent(job)
        candidate, route = self.chosen.pop(job.request.rid)
        job.token = self.router.reserve(candidate, route)

    def finished(self, job: Job, outcome: str) -> None:
        super().finished(job, outcome)
        if outcome == "done":
            self.router.report_success(job.worker)
            # The worker's usage tells how many prompt tokens its cache supplied.
            self.router.release(
                job.token, completion_tokens=job.request.new, cached_tokens=job.cached_tokens
            )
        else:
            if outcome == "failed":
                self.router.report_failure(job.worker)
            self.router.release(job.token)

    def observed(self, worker: str) -> None:
        self.router.observe_snapshot(worker)


POLICIES: dict[str, type[Policy]] = {
    p.name: p
    for p in (
        HearthPolicy,
        OraclePolicy,
        RandomPolicy,
        RoundRobinPolicy,
        LeastOutstandingPolicy,
        PowerOfTwoPolicy,
    )
}


# --------------------------------------------------------------------------- simulation


class Simulation:
    def __init__(
        self,
        policy: type[Policy],
        requests: list[Request],
        changes: list[tuple[float, str, str, bool]],
        seed: int,
    ) -> None:
        self.now = 0.0
        self.workers = {d.name: SimWorker(d, random.Random(f"{seed}-{d.name}")) for d in DEVICES}
        self.policy = policy(self, random.Random(f"{seed}-{policy.name}"))
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.latencies: dict[str, list[float]] = {"voice": [], "task": []}
        self.failed = 0
        self.pending = 0  # user requests not yet answered or given up
        self.samples: list[tuple[float, float]] = []  # (arrival, latency)
        self.last_done = 0.0
        self.first_arrival = requests[0].arrival if requests else 0.0
        self.tried: dict[int, set[str]] = {}
        for r in requests:
            self.push(r.arrival, "arrive", r)
        for t, name, what, value in changes:
            self.push(t, "change", (name, what, value))
        for i, name in enumerate(self.workers):
            self.push(POLL_S * (i + 1) / (len(self.workers) + 1), "poll", name)
        self.end = max((r.arrival for r in requests), default=0.0)

    def push(self, t: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> None:
        while self.events and (self.pending or self.now < self.end):
            t, _, kind, payload = heapq.heappop(self.events)
            self.now = t
            getattr(self, f"_on_{kind}")(payload)

    # events

    def _on_arrive(self, request: Request) -> None:
        if request.external:
            assert request.target is not None
            w = self.workers[request.target]
            if not w.gone and not w.full:
                self._enqueue(w, Job(request, w.device.name, request.work, self.now))
            return
        self.tried[request.rid] = set()
        self.pending += 1
        self._dispatch(request)

    def _dispatch(self, request: Request) -> None:
        if self.now - request.arrival > GIVE_UP_S:
            self.failed += 1
            self.pending -= 1
            return
        tried = self.tried[request.rid]
        name = self.policy.choose(request, tried)
        if name is None:
            tried.clear()  # everything tried or full: wait, then start over
            self.push(self.now + RETRY_AFTER_S, "retry", request)
            return
        w = self.workers[name]
        job = Job(request, name, request.work, self.now)
        self.policy.sent(job)
        tried.add(name)
        if w.gone:
            self.push(self.now + FAIL_DETECT_S, "fail", job)
        elif w.full:
            self.push(self.now + REJECT_S, "reject", job)
        else:
            self._enqueue(w, job)

    def _enqueue(self, w: SimWorker, job: Job) -> None:
        w.advance(self.now)
        w.queue.append(job)
        self._fill(w)

    def _fill(self, w: SimWorker) -> None:
        changed = False
        while w.queue and len(w.running) < w.device.slots:
            job = w.queue.popleft()
            job.started = self.now
            index, shared = w.reuse(job.request)
            if index >= 0:  # taken out of the cache while it runs
                del w.cache[index]
                job.cached_tokens = shared
                job.saved = shared / REF_PREFILL_TOK_S
                job.left -= job.saved * job.request.noise
            w.running.append(job)
            changed = True
        if changed:
            self._reschedule(w)

    def _reschedule(self, w: SimWorker) -> None:
        w.version += 1
        if (t := w.next_done()) is not None:
            self.push(t, "done", (w.device.name, w.version))

    def _on_done(self, payload: tuple[str, int]) -> None:
        name, version = payload
        w = self.workers[name]
        if version != w.version:
            return
        w.advance(self.now)
        job = min(w.running, key=lambda j: j.left)
        w.running.remove(job)
        w.record(job, self.now)
        w.cache.append((job.request.conversation, job.request.prompt, job.request.prefix))
        del w.cache[:-CACHE_ENTRIES]
        if not job.request.external:
            self.policy.finished(job, "done")
            self.latencies[job.request.kind].append(self.now - job.request.arrival)
            self.samples.append((job.request.arrival, self.now - job.request.arrival))
            self.last_done = self.now
            self.pending -= 1
            self.tried.pop(job.request.rid, None)
        self._reschedule(w)
        self._fill(w)

    def _on_fail(self, job: Job) -> None:
        self.policy.finished(job, "failed")
        self._dispatch(job.request)

    def _on_reject(self, job: Job) -> None:
        self.policy.finished(job, "rejected")
        self._dispatch(job.request)

    def _on_retry(self, request: Request) -> None:
        self._dispatch(request)

    def _on_change(self, payload: tuple[str, str, bool]) -> None:
        name, what, value = payload
        w = self.workers[name]
        w.advance(self.now)
        if what == "gone":
            w.gone = value
            if value:  # everything on it is lost; its clients notice after a timeout
                for job in [*w.running, *w.queue]:
                    if not job.request.external:
                        self.push(self.now + FAIL_DETECT_S, "fail", job)
                w.running.clear()
                w.queue.clear()
                w.cache.clear()
            else:
                w.rate_factor = w.device.speed * math.exp(w.rng.gauss(0.0, WARMUP_NOISE_SIGMA))
        else:
            setattr(w, what, value)
        self._reschedule(w)

    def _on_poll(self, name: str) -> None:
        w = self.workers[name]
        if w.gone:
            self.push(self.now + POLL_TIMEOUT_S, "poll_failed", name)
            return
        w.advance(self.now)
        w.poll()
        w.poll_interval = POLL_S
        self.policy.observed(name)
        self.push(self.now + POLL_S, "poll", name)

    def _on_poll_failed(self, name: str) -> None:
        w = self.workers[name]
        w.snapshot = Snapshot(online=False)
        w.poll_interval = min(w.poll_interval * 2, MAX_POLL_S)
        self.push(self.now + w.poll_interval, "poll", name)

    def results(self) -> dict[str, float]:
        everything = sorted(self.latencies["voice"] + self.latencies["task"])
        span = max(self.last_done - self.first_arrival, 1e-9)
        return {
            "p50_ms": round(percentile(everything, 50) * 1000, 1),
            "p95_ms": round(percentile(everything, 95) * 1000, 1),
            "p99_ms": round(percentile(everything, 99) * 1000, 1),
            "throughput_rps": round(len(everything) / span, 3),
            "voice_p95_ms": round(percentile(sorted(self.latencies["voice"]), 95) * 1000, 1),
            "task_p95_ms": round(percentile(sorted(self.latencies["task"]), 95) * 1000, 1),
            "completed": len(everything),
            "failed": self.failed,
        }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(values)))
    return values[rank - 1]


JSON_KEYS = ("p50_ms", "p95_ms", "p99_ms", "throughput_rps")


def run(loads: list[float], duration: float, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    changes = schedule(duration, seed)
    for load in loads:
        requests = workload(load, duration, seed)
        out[str(load)] = {}
        for policy in POLICIES.values():
            sim = Simulation(policy, requests, changes, seed)
            sim.run()
            out[str(load)][policy.name] = sim.results()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--duration", type=float, default=3600.0, help="simulated seconds per run (default 3600)"
    )
    parser.add_argument(
        "--loads", default="0.5,0.8", help="offered loads, shares of usable capacity"
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",")]

    started = time.perf_counter()
    print(
        f"reference: {REF_PREFILL_TOK_S:.0f} tok/s prefill, {REF_DECODE_TOK_S:.0f} tok/s decode "
        "(bench_worker, tiny int4 model, 2-core VM)"
    )
    print(device_table())
    print(
        f"usable capacity {usable_capacity():.2f} x reference; poll every {POLL_S:.0f} s; "
        f"seed {args.seed}; {args.duration:.0f} s simulated per run"
    )
    results = run(loads, args.duration, args.seed)
    ok = True
    for load, by_policy in results.items():
        print(f"\nload {float(load):.0%}")
        print(
            f"{'policy':<18}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>8}"
            f"{'voice p95':>11}{'task p95':>10}{'done':>7}{'lost':>6}"
        )
        for name, r in by_policy.items():
            print(
                f"{name:<18}{r['p50_ms']:>9.0f}{r['p95_ms']:>9.0f}{r['p99_ms']:>9.0f}"
                f"{r['throughput_rps']:>8.2f}{r['voice_p95_ms']:>11.0f}{r['task_p95_ms']:>10.0f}"
                f"{r['completed']:>7.0f}{r['failed']:>6.0f}"
            )
        hearth, oracle = by_policy["hearth"]["p95_ms"], by_policy["oracle"]["p95_ms"]
        baselines = {k: v["p95_ms"] for k, v in by_policy.items() if k not in ("hearth", "oracle")}
        ratio = hearth / oracle
        beats = all(hearth < v for v in baselines.values())
        print(
            f"hearth p95 / oracle p95 = {ratio:.3f} (target <= 1.15); "
            f"below every baseline: {'yes' if beats else 'NO'}"
        )
        ok = ok and ratio <= 1.15 and beats
    verdict = "requirement met" if ok else "REQUIREMENT NOT MET"
    print(f"\n{verdict} ({time.perf_counter() - started:.1f} s)")
    if args.json:
        print(
            json.dumps(
                {
                    load: {name: {k: r[k] for k in JSON_KEYS} for name, r in by_policy.items()}
                    for load, by_policy in results.items()
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
