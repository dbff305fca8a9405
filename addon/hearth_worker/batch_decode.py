"""Prefill and continuous batching of decode steps in a plain onnxruntime session.

A batched model's requests (chat_engine.py) run here, not on onnxruntime-genai
generators: `prefill()` feeds a prompt (in slices) into a request's own KV
buffer (`new_kv`, its cached prefix copied in first), and `run()` then decodes
it in a slot of one shared buffer: its KV cache copied in, every running request
shares each forward pass of the decoder. A request joins between steps and
leaves when it is done, stopped or cancelled (its slot freed: the last slot
moves into it, so the running requests always fill slots 0..n-1 and a step runs
at batch n); a job with `keep_from` takes its answer's keys and values with it
(for the prompt cache).

The buffer is laid out as onnxruntime-genai runs these exports
(GroupQueryAttention, `past_present_share_buffer`): one (slots, kv_heads,
length, head_size) tensor per past key/value, bound as both past and present;
each sequence right-padded, the attention mask giving its length. A right-padded
batch gives each sequence the logits it gets alone (scripts/bench/batch_step.py).

Sampling is the request's own (`Sampler`), with onnxruntime-genai's semantics:
repetition penalty over the whole sequence (prompt and answer), no-repeat n-grams
over the whole sequence, then greedy (argmax) or sampling with temperature, top-k
and top-p (nucleus within the top k). A seeded request draws from numpy's
generator seeded with its seed (not genai's mt19937: the same seed gives the same
answer here, not the answer genai would give).

A guided request (a grammar: tools under guidance, `response_format`) comes too,
with its own grammar matcher (`DecodeJob.guide`, guidance.BatchGrammars: an
llguidance matcher for the grammar genai's guidance would use). At each step the
tokens the grammar does not allow are masked out of the slot's scores before the
pick; once the grammar is complete it allows only the end of sequence, which ends
the job as on genai's generator.
genai masks before the penalties (a masked logit is its lowest float, which no
penalty raises); masking after them (to -inf) picks the same tokens.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

_LOGGER = logging.getLogger(__name__)

# The KV buffer's length grows in steps of this many tokens (as the longest running
# sequence needs: an answer's budget is not reserved).
LENGTH_STEP = 256
_LOWEST = float(np.finfo(np.float32).min)
Floats = npt.NDArray[np.float32]


class Sampler:
    """Picks a sequence's next tokens from its logits (onnxruntime-genai's semantics)."""

    def __init__(self, options: dict[str, Any], history: Sequence[int]) -> None:
        """`options`: onnxruntime-genai search options (Manifest.generation.search_options).

        `history`: the sequence so far (prompt and any generated tokens).
        """
        self.penalty = float(options.get("repetition_penalty", 1.0))
        self.ngram = int(options.get("no_repeat_ngram_size", 0))
        self.temperature = float(options.get("temperature", 1.0))
        self.top_k = int(options.get("top_k", 0))
        self.top_p = float(options.get("top_p", 1.0))
        self.greedy = (
            not bool(options.get("do_sample", False)) or self.top_k == 1 or self.temperature <= 0
        )
        seed = options.get("random_seed")
        self._rng = np.random.default_rng(None if seed is None else int(seed))
        self.history: list[int] = []
        self._seen: set[int] = set()
        self._seen_ids: npt.NDArray[np.int64] = np.zeros(0, np.int64)
        self._seen_changed = False
        self._followers: dict[tuple[int, ...], set[int]] = {}
        for token in history:
            self.append(token)

    def append(self, token: int) -> None:
        """`token` joined the sequence."""
        self.history.append(token)
        if token not in self._seen:
            self._seen.add(token)
            self._seen_changed = True
        n = self.ngram
        if n > 0 and len(self.history) >= n:
            prefix = tuple(self.history[len(self.history) - n : -1])
            self._followers.setdefault(prefix, set()).add(token)

    def scores(self, logits: Floats) -> Floats:
        """The logits after the repetition penalty and the no-repeat n-gram ban."""
        scores = np.array(logits, dtype=np.float32)
        vocab = scores.shape[0]
        if self.penalty != 1.0 and self._seen:
            if self._seen_changed:
                self._seen_ids = np.array([t for t in self._seen if 0 <= t < vocab], np.int64)
                self._seen_changed = False
            seen = scores[self._seen_ids]
            scores[self._seen_ids] = np.where(seen < 0, seen * self.penalty, seen / self.penalty)
        n = self.ngram
        if n > 0 and len(self.history) >= n:
            prefix = tuple(self.history[len(self.history) - n + 1 :]) if n > 1 else ()
            banned = [t for t in self._followers.get(prefix, ()) if 0 <= t < vocab]
            if banned:
                scores[banned] = _LOWEST
        return scores

    def pick(self, logits: Floats, allowed: npt.NDArray[np.bool_] | None = None) -> int:
        """The next token for these logits (one row, the vocabulary); `allowed`: the
        tokens a grammar allows (None: any)."""
        scores = self.scores(logits)
        if allowed is not None:
            scores[~allowed] = -np.inf
        if self.greedy:
            return int(np.argmax(scores))
        vocab = scores.shape[0]
        if self.top_k > 1:
            m = min(self.top_k, vocab)
            candidates = np.argpartition(-scores, m - 1)[:m] if m < vocab else np.arange(vocab)
        else:
            candidates = np.arange(vocab)
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        chosen = scores[order].astype(np.float64)
        probs = np.exp((chosen - chosen[0]) / self.temperature)
        probs /= probs.sum()
        if 0.0 < self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            order, probs = order[:keep], probs[:keep]
            probs = probs / probs.sum()
        return int(order[int(self._rng.choice(len(order), p=probs))])


class TurnLock:
    """A lock handed over in turn: waiting threads get it in the order they asked.

    A model's onnxruntime runs take it (each prefill slice and step of a
    generator, each batch step), so that they follow one another instead of
    sharing the cores: every run already uses all of them (its intra-op threads),
    and two at once only make each wait on the other's threads, spin-waiting ones
    above all (through a worker, 4 concurrent streams decoded about 5-10% more
    tokens a second so; docs/ARCHITECTURE.md "Batched decoding"). In turn, so
    that a long prefill's slices and the batch's steps alternate: neither stalls
    until the other has ended.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._queue: deque[threading.Event] = deque()

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for the lock (in turn); False: `timeout` seconds passed first, and the
        place in line is given up."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            self._queue.append(turn)
        try:
            if turn.wait(timeout):
                return True
        except BaseException:
            self._give_up(turn)
            raise
        self._give_up(turn)
        return False

    def _give_up(self, turn: threading.Event) -> None:
        with self._mutex:
            if turn in self._queue:  # not handed over yet: leave the line
                self._queue.remove(turn)
                return
        self.release()  # handed over meanwhile: pass it on

    def release(self) -> None:
        with self._mutex:
            if self._queue:
                self._queue.popleft().set()  # the next in line holds it now
            else:
                self._held = False

    def waiting(self) -> int:
        """Threads waiting for their turn."""
        with self._mutex:
            return len(self._queue)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


class TokenGuide(Protocol):
    """A request's grammar, step by step (guidance.GrammarMatcher)."""

    def allowed(self, vocab: int) -> npt.NDArray[np.bool_]:
        """The tokens allowed next (raises when the grammar is broken)."""

    def consume(self, token: int) -> None:
        """`token` was chosen."""


@dataclass(eq=False)
class DecodeJob:
    """One request's decode in the batch.

    `kv`: its KV cache, one (1, kv_heads, length, head_size) array per past
    input (in `BatchDecoder.past_names` order), `length` tokens long; `token`:
    the token to feed next (chosen, its KV not yet computed). `on_token(token)`
    is called (in the batch's thread) for each new token and returns True when
    the request is done with it (a stop sequence). The job ends with
    `finish_reason` "stop" (end of sequence or stop sequence), "length" (its
    `max_new` tokens) or "cancelled". `guide`: a guided request's grammar, already
    past its first token (None: unguided).
    """

    kv: list[Floats]
    length: int
    token: int
    generated: int  # tokens generated so far (the first one included)
    max_new: int
    sampler: Sampler
    on_token: Callable[[int], bool]
    cancelled: threading.Event
    guide: TokenGuide | None = None
    # When the job ends, its keys and values from this position on (to `length`) are
    # copied out of its slot into `kv` (the answer's, for the prompt cache); None: not.
    keep_from: int | None = None
    finish_reason: str = "stop"
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _zeros(count: int, shape: tuple[int, ...]) -> list[Floats]:
    """`count` zeroed float32 arrays of `shape`, each its own allocation: one per
    layer's keys or values (about 1 MB a household prompt for SmolLM2) is below
    glibc's mmap threshold once it has adapted, so freed buffers are reused from the
    heap; one block for all (106 MB) came as fresh pages each time, and a new
    conversation's prefix copy took 280-420 ms on this VM instead of about 20."""
    return [np.zeros(shape, np.float32) for _ in range(count)]


def _read_config(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ValueError("genai_config.json has no model section")  # noqa: TRY004
    return data


class BatchDecoder:
    """A shared decode session: running requests step together (see the module's notes)."""

    def __init__(
        self,
        folder: Path,
        *,
        threads: int,
        spinning: bool = True,
        turns: TurnLock | None = None,
    ) -> None:
        """`turns`: the lock the model's runs take in turn (see TurnLock); the
        batch's steps take it too."""
        config = _read_config(folder)
        model = config["model"]
        decoder = model["decoder"]
        inputs = decoder.get("inputs", {})
        outputs = decoder.get("outputs", {})
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder.get("num_key_value_heads") or decoder["num_attention_heads"])
        self.head_size = int(decoder["head_size"])
        self.eos: set[int] = set()
        eos = model.get("eos_token_id")
        for token in eos if isinstance(eos, list) else [eos]:
            if isinstance(token, int):
                self.eos.add(token)
        self.input_ids = str(inputs.get("input_ids", "input_ids"))
        self.attention_mask = str(inputs.get("attention_mask", "attention_mask"))
        self.logits = str(outputs.get("logits", "logits"))
        past_key = str(inputs.get("past_key_names", "past_key_values.%d.key"))
        past_value = str(inputs.get("past_value_names", "past_key_values.%d.value"))
        present_key = str(outputs.get("present_key_names", "present.%d.key"))
        present_value = str(outputs.get("present_value_names", "present.%d.value"))
        self.past_names = [n % i for i in range(self.layers) for n in (past_key, past_value)]
        self.present_names = [
            n % i for i in range(self.layers) for n in (present_key, present_value)
        ]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spinning:  # as the model's genai session (ChatModel.spinning)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(folder / decoder["filename"]), options, providers=["CPUExecutionProvider"]
        )
        vocab = next(o.shape for o in self.session.get_outputs() if o.name == self.logits)[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else int(model["vocab_size"])
        self._logits: Floats = np.empty(0, np.float32)
        names = {i.name for i in self.session.get_inputs()}
        expected = {self.input_ids, self.attention_mask, *self.past_names}
        if names != expected:
            raise ValueError(f"decoder inputs {sorted(names - expected)} are not batched here")
        self._turns = turns or TurnLock()
        self._cond = threading.Condition()
        self._pending: list[DecodeJob] = []
        self._running: list[DecodeJob] = []
        self._buffers: list[Floats] = []
        self._binding: Any = None
        self._bound = 0  # batch size the binding's KV inputs are bound for
        self._closed = False
        self._paused = False
        self._leading = False  # a caller is stepping the batch
        self.peak_bytes = 0  # the largest KV buffer held so far
        # Called with (bytes before, bytes now) when the KV buffer is grown or freed
        # (the worker counts it in the prompt cache's budget).
        self.on_bytes: Callable[[int, int], None] | None = None
        self.peak_batch = 0  # the most requests decoded in one step so far
        self.steps = 0

    @staticmethod
    def supports(folder: Path) -> bool:
        """Whether this model's export can be batched here (a decoder-only GQA export with
        its KV cache shared between past and present, no inputs beyond ids, mask and past)."""
        try:
            config = _read_config(folder)
        except (OSError, ValueError):
            return False
        model = config["model"]
        decoder = model.get("decoder")
        search = config.get("search") or {}
        if not isinstance(decoder, dict) or "encoder" in model or "vision" in model:
            return False
        inputs = set(decoder.get("inputs", {}))
        return (
            bool(search.get("past_present_share_buffer", False))
            and inputs <= {"input_ids", "attention_mask", "past_key_names", "past_value_names"}
            and all(k in decoder for k in ("filename", "num_hidden_layers", "head_size"))
        )

    def new_kv(
        self, length: int, prefix: list[Floats] | None = None, count: int = 0
    ) -> list[Floats]:
        """Keys and values for one sequence of up to `length` tokens (a request's own,
        for its prefill: one (1, kv_heads, length, head_size) array per past input),
        zeroed, or holding the first `count` positions of `prefix` (another such)."""
        kv = _zeros(len(self.past_names), (1, self.kv_heads, length, self.head_size))
        if prefix is not None:
            for mine, held in zip(kv, prefix, strict=True):
                mine[:, :, :count] = held[:, :, :count]
        return kv

    def prefill(self, kv: list[Floats], start: int, tokens: Sequence[int]) -> Floats:
        """Feed `tokens` to one sequence whose `kv` (new_kv) holds its first `start`
        tokens; their keys and values land in `kv` after those. Returns the last
        token's logits. Runs in the model's turns (one run: the caller slices a long
        prompt)."""
        count, length = len(tokens), kv[0].shape[2]
        if count < 1 or start + count > length:
            raise ValueError(f"{count} tokens after {start} do not fit {length}")
        binding = self.session.io_binding()
        logits = np.empty((1, count, self.vocab_size), np.float32)
        binding.bind_output(
            self.logits, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data
        )
        shape = [1, self.kv_heads, length, self.head_size]
        for past, present, buffer in zip(self.past_names, self.present_names, kv, strict=True):
            binding.bind_input(past, "cpu", 0, np.float32, shape, buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, np.float32, shape, buffer.ctypes.data)
        binding.bind_cpu_input(self.input_ids, np.array([list(tokens)], np.int64))
        binding.bind_cpu_input(self.attention_mask, np.ones((1, start + count), np.int64))
        with self._turns:
            self.session.run_with_iobinding(binding)
        last: Floats = logits[0, -1]
        return last

    def choose(self, sampler: Sampler, guide: TokenGuide | None, logits: Floats) -> int:
        """A sequence's next token for its logits: the sampler's pick among the tokens
        its grammar allows, added to the sampler's history and fed to the grammar
        (raises when the grammar is broken)."""
        token = sampler.pick(logits, None if guide is None else guide.allowed(self.vocab_size))
        if guide is not None and token not in self.eos:
            guide.consume(token)
        sampler.append(token)
        return token

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self._buffers)

    def running(self) -> int:
        with self._cond:
            return len(self._running) + len(self._pending)

    def run(self, job: DecodeJob) -> None:
        """Decode `job` in the batch; returns when it has ended (blocking).

        No thread of its own: the calling threads take turns leading the batch.
        One leads (steps for everyone) until its own job ends, then hands over to
        another caller still waiting; when the batch is empty no thread is left.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the batch decoder is closed")
            self._pending.append(job)
            self._cond.notify_all()
            while not job.done.is_set() and (self._leading or self._paused):
                self._cond.wait()
            if job.done.is_set():
                return self._raise(job)
            self._leading = True
        try:
            self._lead(job)
        finally:
            with self._cond:
                self._leading = False
                if not self._running and not self._pending:  # idle: give the memory back
                    self._hold([])
                self._cond.notify_all()
        self._raise(job)

    @staticmethod
    def _raise(job: DecodeJob) -> None:
        if job.error is not None:
            raise job.error

    def pause(self) -> None:
        """Hold the next steps (requests queue up to join) until `resume()`; for tests."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def pending(self) -> int:
        """Requests waiting to join the batch."""
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        """Stop the batch's thread once running requests are cancelled."""
        with self._cond:
            self._closed = True
            for job in self._running + self._pending:
                job.cancelled.set()
            self._cond.notify_all()

    def _lead(self, own: DecodeJob) -> None:
        """Step the batch until `own` has ended."""
        while not own.done.is_set():
            with self._cond:
                while self._paused and not self._closed:
                    self._cond.wait()
                joining, self._pending = self._pending, []
            try:
                self._join(joining)
                self._end(self._check())
                if self._running:
                    self._step()
                    self._end(self._check())
            except BaseException as err:  # every running request hears of it
                _LOGGER.exception("Batched decode failed")
                with self._cond:
                    failed = self._running + self._pending
                    self._running, self._pending = [], []
                    self._hold([])
                for job in failed:
                    job.error = err
                    job.done.set()
                with self._cond:
                    self._cond.notify_all()

    def _check(self) -> list[int]:
        """Slots whose job is over before the next step (token limit, cancelled)."""
        over = []
        for slot, job in enumerate(self._running):
            if job.done.is_set():
                continue
            if job.generated >= job.max_new:
                job.finish_reason = "length"
                over.append(slot)
            elif job.cancelled.is_set():
                job.finish_reason = "cancelled"
                over.append(slot)
        return over

    def _end(self, slots: list[int]) -> None:
        """Free these slots: the last running slot moves into each freed one."""
        for slot in sorted(set(slots), reverse=True):
            job = self._running[slot]
            kept: list[Floats] = []
            if job.keep_from is not None and job.error is None and job.keep_from < job.length:
                span = slice(job.keep_from, job.length)
                kept = [buffer[slot : slot + 1, :, span].copy() for buffer in self._buffers]
            job.kv = kept
            last = len(self._running) - 1
            if slot != last:
                moved = self._running[last]
                for buffer in self._buffers:
                    buffer[slot, :, : moved.length] = buffer[last, :, : moved.length]
                self._running[slot] = moved
            self._running.pop()
            self._finish(job)

    def _finish(self, job: DecodeJob) -> None:
        with self._cond:
            job.done.set()
            self._cond.notify_all()  # its caller waits for it (or for the lead)

    def _ensure(self, slots: int, length: int) -> None:
        """Buffers for at least `slots` sequences of `length` tokens (running ones kept)."""
        have_slots = self._buffers[0].shape[0] if self._buffers else 0
        have_length = self._buffers[0].shape[2] if self._buffers else 0
        if slots <= have_slots and length <= have_length:
            return
        new_slots = max(slots, have_slots)
        new_length = max(have_length, -(-length // LENGTH_STEP) * LENGTH_STEP)
        shape = (new_slots, self.kv_heads, new_length, self.head_size)
        fresh = _zeros(len(self.past_names), shape)
        for old, new in zip(self._buffers, fresh, strict=False):
            for slot, job in enumerate(self._running):
                new[slot, :, : job.length] = old[slot, :, : job.length]
        self._hold(fresh)

    def _hold(self, buffers: list[Floats]) -> None:
        """The KV buffers are these now (the binding made anew); `on_bytes` hears of it."""
        before = self.nbytes
        self._buffers, self._binding, self._bound = buffers, None, 0
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        if self.on_bytes is not None and self.nbytes != before:
            self.on_bytes(before, self.nbytes)

    def _join(self, jobs: list[DecodeJob]) -> None:
        """Slots for these jobs (the buffers grown once for all of them)."""
        for job in jobs:
            if job.cancelled.is_set():
                job.finish_reason = "cancelled"
                job.kv = []
                self._finish(job)
        jobs = [job for job in jobs if not job.done.is_set()]
        if not jobs:
            return
        needed = max(j.length for j in self._running + jobs)
        self._ensure(len(self._running) + len(jobs), needed + 1)
        for job in jobs:
            slot = len(self._running)
            for buffer, kv in zip(self._buffers, job.kv, strict=True):
                buffer[slot, :, : job.length] = kv[0, :, : job.length]
            job.kv = []  # the slot holds it now
            self._running.append(job)

    def _step(self) -> None:
        running = self._running
        n = len(running)
        self._ensure(n, max(job.length for job in running) + 1)  # grown as answers grow
        if self._binding is None or self._bound != n:
            binding = self.session.io_binding()
            # Logits land in an array of ours (no copy, no wrapper for every output).
            self._logits = np.empty((n, 1, self.vocab_size), np.float32)
            shape_logits = [n, 1, self.vocab_size]
            binding.bind_output(
                self.logits, "cpu", 0, np.float32, shape_logits, self._logits.ctypes.data
            )
            shape = [n, self.kv_heads, self._buffers[0].shape[2], self.head_size]
            for past, present, buffer in zip(
                self.past_names, self.present_names, self._buffers, strict=True
            ):
                pointer = buffer.ctypes.data  # slots 0..n-1 are the buffer's first n: contiguous
                binding.bind_input(past, "cpu", 0, np.float32, shape, pointer)
                binding.bind_output(present, "cpu", 0, np.float32, shape, pointer)
            self._binding, self._bound = binding, n
        width = max(job.length for job in running) + 1
        mask = np.zeros((n, width), np.int64)
        for slot, job in enumerate(running):
            mask[slot, : job.length + 1] = 1
        ids = np.array([[job.token] for job in running], np.int64)
        self._binding.bind_cpu_input(self.input_ids, ids)
        self._binding.bind_cpu_input(self.attention_mask, mask)
        with self._turns:
            self.session.run_with_iobinding(self._binding)
        logits = self._logits
        self.steps += 1
        self.peak_batch = max(self.peak_batch, n)
        ended: list[int] = []
        for slot, job in enumerate(running):
            job.length += 1  # the fed token's KV is in the slot now
            try:
                token = self.choose(job.sampler, job.guide, logits[slot, -1])
            except Exception as err:  # its grammar broke: its own request fails
                job.error = err
                ended.append(slot)
                continue
            job.token = token
            job.generated += 1
            try:
                stopped = job.on_token(token)
            except Exception as err:  # its own request fails, not the batch
                job.error = err
                ended.append(slot)
                continue
            if stopped:  # a stop sequence
                job.finish_reason = "stop"
                ended.append(slot)
            elif token in self.eos:  # as genai's generator: done, "length" at the limit
                job.finish_reason = "length" if job.generated >= job.max_new else "stop"
                ended.append(slot)
        self._end(ended)
