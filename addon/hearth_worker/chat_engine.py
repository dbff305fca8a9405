"""Chat generation with onnxruntime-genai.

A `ChatModel` owns one loaded model. `generate()` is blocking and runs in a
worker thread; `stream()` wraps it for asyncio, handing text pieces to the
event loop as they are decoded. Cancellation is a `threading.Event` checked
between tokens, so a client that goes away stops its generation within one
token; `stream()` returns only once its thread has ended (the prefill cannot
be interrupted), so the admission slot around it covers the real work.

`prepare()` renders and tokenizes a prompt; it is slow for a long prompt and
runs in an executor. `check_fits()` refuses, before any rendering, a prompt
that certainly cannot fit the context: no token is longer than the
tokenizer's longest vocabulary entry, so the characters of the messages divided
by that length (with a margin for normalizers) is a lower bound of its tokens.

A model whose export batches (BatchDecoder.supports: the usual decoder-only
GroupQueryAttention export) runs every request in its own plain-onnxruntime
session (batch_decode.py): the keys and values of the longest cached prefix
(prompt_cache.py: arrays, shared by conversations) are copied into a buffer of
the request's own, the rest of the prompt is prefilled after them, the first
token is picked (the request's sampling, its grammar as an llguidance matcher),
and the request decodes in the shared batch, alone or with the model's other
running requests (each forward pass shared). Its prompt's keys and values go
into the cache once prefilled, its answer's when it ends. onnxruntime-genai
still loads the model (tokenizer, chat guidance), and a model that cannot batch,
or a grammar llguidance cannot take, is served on an onnxruntime-genai
generator kept in the same prompt cache (rewound to the shared prefix).

Why not onnxruntime-genai 0.18's `Engine` (continuous batching), measured on
SmolLM2-135M int4 on a 2-core machine: its static batching (the only kind these
exports allow: dynamic batching wants a paged-attention export and refuses ours,
"Paged cache input must have rank four ...") gave 4 concurrent streams about
3x one stream's decode, but an Engine request cannot start from another's KV
cache, so every new conversation prefills the household prompt anew (1,500
tokens: seconds, against tens of milliseconds from the prompt cache), and it
prefills a prompt in one uninterruptible `run()`. Nor genai's generators for the
batched path (as until the seventh session): moving a request's decode into the
batch copied its generator's whole `max_length` KV buffer out (`get_output`,
10-60 ms holding the GIL), and a cached generator served one conversation at a
time. docs/ARCHITECTURE.md, "Batched decoding"; scripts/bench/voice_batch.py
measures both paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime_genai as og

from .admission import run_to_end
from .batch_decode import BatchDecoder, DecodeJob, Floats, Sampler, TokenGuide, TurnLock
from .chat_template import ChatTemplate
from .guidance import BatchGrammars, ModelGuidance
from .manifest import Manifest
from .prompt_cache import CacheEntry, PromptCache, Taken

_LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
# Characters a token covers at most when the tokenizer's vocabulary cannot be read.
FALLBACK_MAX_TOKEN_CHARS = 256
# Prompt tokens are fed in slices of about this long (see _prefill).
PREFILL_SLICE_S = 0.05
PREFILL_FIRST_SLICE = 64
# Not fewer: a slice's run has a fixed cost (on a busy 2-core machine SmolLM2
# prefilled 800 tokens at ~50 tok/s in 16-token slices, ~85 in 64-token slices and
# ~90 in one append).
PREFILL_MIN_SLICE = 64
# Margin on the vocabulary's longest entry: a normalizer may shorten text (NFKC).
TOKEN_CHARS_MARGIN = 2
# After the first piece of a streamed answer, hand text to the server at most this often
# (times the model's requests running now: see ChatModel.stream).
STREAM_FLUSH_S = 0.025
# A generator kept for the prompt cache is sized for this many tokens beyond its
# first request (rounded up to CACHE_LENGTH_STEP): later turns of the
# conversation then fit in it (see _cached_length).
CACHE_HEADROOM = 512
CACHE_LENGTH_STEP = 256
_OWNERS = itertools.count(1)  # tells apart the ChatModel instances in a prompt cache


class PromptTooLong(ValueError):
    """The prompt leaves no room for an answer in the model's context."""

    def __init__(
        self, prompt_tokens: int, context_length: int, *, characters: int | None = None
    ) -> None:
        if characters is None:
            size = f"{prompt_tokens} tokens"
        else:  # estimated before rendering: a lower bound
            size = f"at least {prompt_tokens} tokens ({characters} characters)"
        super().__init__(f"The prompt has {size}; this model's context is {context_length} tokens")
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


def max_token_chars(tokenizer_json: Path) -> int:
    """The longest vocabulary entry (and added token) of a tokenizer.json, in characters."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        pieces = list(vocab) if isinstance(vocab, dict) else [str(item[0]) for item in vocab]
        pieces += [str(token["content"]) for token in data.get("added_tokens") or []]
        longest = max(len(piece) for piece in pieces)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        _LOGGER.debug("No vocabulary in %s (%r): assuming long tokens", tokenizer_json, err)
        return FALLBACK_MAX_TOKEN_CHARS
    return max(1, longest)


def message_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of the messages' text, all of which a chat template renders."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(
                len(part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return total


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. None: the model's default (`Manifest.generation`)."""

    max_new_tokens: int | None = None
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_k: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    # (type, data) for GeneratorParams.set_guidance (see guidance.py); None: free text.
    guidance: tuple[str, str] | None = None


@dataclass
class GenerationResult:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = "stop"  # "stop" | "length" | "cancelled"
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache, not prefilled
    prefilled_tokens: int = 0  # prompt tokens fed to the model (fewer when cancelled)


class StopMatcher:
    """Cuts generated text at the first stop sequence.

    `push()` returns the text that can be shown now: any tail that could still
    grow into a stop sequence is held back until it can be decided.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._text = ""
        self._shown = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        if not self._stops:
            return piece
        self._text += piece
        longest = max(len(s) for s in self._stops)
        start = max(0, self._shown - longest + 1)
        hits = [i for s in self._stops if (i := self._text.find(s, start)) >= 0]
        if hits:
            self.stopped = True
            return self._take(min(hits))
        hold = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(self._text)), 0, -1):
                if self._text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return self._take(len(self._text) - hold)

    def flush(self) -> str:
        return "" if self.stopped or not self._stops else self._take(len(self._text))

    def _take(self, end: int) -> str:
        out = self._text[self._shown : max(end, self._shown)]
        self._shown = max(end, self._shown)
        return out


def _prefill(
    feed: Callable[[int, list[int]], None],
    prompt_ids: list[int],
    start: int,
    cancelled: threading.Event,
) -> int:
    """Feed `prompt_ids[start:]` in slices (`feed(position, piece)`, one run each, in
    the model's turns); returns how many tokens were fed.

    Fewer than all when cancelled meanwhile.

    onnxruntime-genai holds the GIL while it processes appended tokens: one
    append of a long prompt would freeze the event loop (every other request,
    even /v1/health) for the whole prefill, and could not be cancelled. Slices
    of about PREFILL_SLICE_S each (sized from the last one's rate) hand the GIL
    over between them, and cancellation is checked there. Each slice runs in
    the model's turns, so the batch's steps go on between them.
    """
    size = PREFILL_FIRST_SLICE
    position = start
    while position < len(prompt_ids):
        if cancelled.is_set():
            break
        begun = time.perf_counter()
        piece = prompt_ids[position : position + size]
        feed(position, piece)
        position += len(piece)
        took = max(time.perf_counter() - begun, 1e-4)
        size = max(PREFILL_MIN_SLICE, min(2 * size, int(size * PREFILL_SLICE_S / took)))
        time.sleep(0)  # let the event loop run
    return position - start


def _genai_config(manifest: Manifest, threads: int, spinning: bool = True) -> og.Config:
    config = og.Config(str(manifest.path))
    config.clear_providers()
    session: dict[str, Any] = {"intra_op_num_threads": threads}
    if not spinning:  # any other key is an onnxruntime session config entry
        session["session.intra_op.allow_spinning"] = "0"
    overlay = {"model": {"decoder": {"session_options": session}}}
    config.overlay(json.dumps(overlay))
    return config


class _Sink:
    """Where a request's tokens go: counted, decoded to text, cut at stop sequences."""

    def __init__(
        self,
        tokenizer: og.Tokenizer,
        sampling: Sampling,
        on_text: Callable[[str], None],
        result: GenerationResult,
    ) -> None:
        self._stream = tokenizer.create_stream()
        self._stops = StopMatcher(sampling.stop)
        self._on_text = on_text
        self._result = result
        self.first_token_at: float | None = None

    def push(self, token: int) -> bool:
        """A new token; True when a stop sequence ended the answer."""
        self._result.completion_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        text = self._stops.push(self._stream.decode(token))
        if text:
            self._on_text(text)
        return self._stops.stopped

    def flush(self) -> None:
        tail = self._stops.flush()
        if tail:
            self._on_text(tail)


@dataclass
class _Request:
    """One generation's inputs and outputs, as the engine's steps pass them on."""

    prompt_ids: list[int]
    max_new: int
    sampling: Sampling
    sink: _Sink
    cancelled: threading.Event
    result: GenerationResult
    prefix_key: str | None


class ChatModel:
    """One chat model loaded with onnxruntime-genai."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        threads: int | None = None,
        cache: PromptCache | None = None,
        batching: bool = True,
        spinning: bool = True,
    ) -> None:
        self.manifest = manifest
        self.id = manifest.name
        self.context_length = manifest.context_length
        self.threads = threads or os.cpu_count() or 1
        # onnxruntime's idle threads spin-wait between runs (its default): on the quiet
        # 2-core machine one stream decoded 9-22% faster so, under load from other
        # processes about half as fast (scripts/bench/voice_batch.py, docs/ARCHITECTURE.md).
        self.spinning = spinning
        self._model = og.Model(_genai_config(manifest, self.threads, spinning))
        self._tokenizer = og.Tokenizer(self._model)
        self.template = ChatTemplate.from_model_dir(manifest.path)
        self.guidance = ModelGuidance(self._model, self.template, manifest.path)
        self.token_chars = max_token_chars(manifest.path / "tokenizer.json") * TOKEN_CHARS_MARGIN
        self._active_lock = threading.Lock()
        # The model's runs (prefill slices, steps, batch steps) take turns (TurnLock).
        self.turns = TurnLock()
        self.active = 0  # generation threads running now
        # The prompt cache (shared by a worker's models, within one budget); None: off.
        # Entries are this instance's (a new model of the same name shares none), and
        # go when it does: a removed model is not kept alive by its cached generators.
        self.cache = cache
        self.cache_owner = next(_OWNERS)
        if cache is not None:
            weakref.finalize(self, cache.drop, self.cache_owner)
        self.kv_bytes_per_token = self._measure_kv_bytes()
        self.prefilled_tokens = 0  # prompt tokens fed to the model, all requests together
        # Requests decode together in one shared session (batch_decode.py).
        self.batching = batching and BatchDecoder.supports(manifest.path)
        self._batch: BatchDecoder | None = None
        # Guided requests' grammars in the batch (llguidance), set up as genai's guidance.
        model_config = self.manifest_config().get("model", {})
        eos = model_config.get("eos_token_id")
        self.grammars = BatchGrammars(
            manifest.path / "tokenizer.json",
            int(model_config.get("vocab_size") or 0),
            int((eos if isinstance(eos, list) else [eos])[0] or 0),
        )

    def _measure_kv_bytes(self) -> int:
        """Bytes of keys and values one token takes (all layers), measured on a tiny run."""
        decoder = self.manifest_config().get("model", {}).get("decoder", {})
        layers = int(decoder.get("num_hidden_layers") or 0)
        name = str(decoder.get("outputs", {}).get("present_key_names", "present.%d.key"))
        length = 4
        try:
            params = og.GeneratorParams(self._model)
            params.set_search_options(max_length=length, do_sample=False)
            generator = og.Generator(self._model, params)
            generator.append_tokens([0])
            key = generator.get_output(name % 0)
            per_layer = int(key.nbytes) // max(1, int(key.shape[2]))
            return 2 * per_layer * max(1, layers)
        except Exception as err:  # an estimate from the config will do
            _LOGGER.debug("KV size not measured (%r); estimating from the config", err)
            heads = int(
                decoder.get("num_key_value_heads") or decoder.get("num_attention_heads") or 1
            )
            head_size = int(decoder.get("head_size") or 64)
            return 2 * max(1, layers) * heads * head_size * 4

    def manifest_config(self) -> dict[str, Any]:
        """The model's genai_config.json ({} when unreadable)."""
        try:
            data = json.loads((self.manifest.path / "genai_config.json").read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def close(self) -> None:
        """The model is going: drop what the prompt cache holds of it."""
        if self.cache is not None:
            self.cache.drop(self.cache_owner)
        if self._batch is not None:
            self._batch.close()

    @property
    def batch_peak_bytes(self) -> int:
        """The largest KV buffer the shared decode batch has held (0: never batched)."""
        return 0 if self._batch is None else int(self._batch.peak_bytes)

    def warm_prefixes(self) -> list[dict[str, Any]]:
        """The prompt prefixes cached for this model, as hashes of token ids."""
        return [] if self.cache is None else self.cache.warm_prefixes(self.cache_owner)

    def warm_keys(self) -> list[str]:
        """The household prefix keys (X-Hearth-Prefix) this model's cache entries hold."""
        return [] if self.cache is None else self.cache.warm_keys(self.cache_owner)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        return self.template.render(messages, tools=tools or None, add_generation_prompt=True)

    def check_fits(self, messages: list[dict[str, Any]]) -> None:
        """Refuse, without rendering, messages that certainly exceed the context."""
        characters = message_chars(messages)
        at_least = characters // self.token_chars
        if at_least >= self.context_length:
            raise PromptTooLong(at_least, self.context_length, characters=characters)

    def prepare(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        """The prompt's token ids (blocking: run it in an executor)."""
        return self.encode(self.render(messages, tools))

    def budget(self, prompt_tokens: int, requested: int | None) -> int:
        """How many new tokens a request may generate; raises if the prompt does not fit."""
        room = self.context_length - prompt_tokens
        if room < 1:
            raise PromptTooLong(prompt_tokens, self.context_length)
        return min(room, requested or DEFAULT_MAX_NEW_TOKENS)

    def _search_options(self, sampling: Sampling) -> dict[str, Any]:
        """The request's search options (the batch's sampler follows the same)."""
        return self.manifest.generation.search_options(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty,
            no_repeat_ngram_size=sampling.no_repeat_ngram_size,
            seed=sampling.seed,
        )

    def _params(self, max_length: int, sampling: Sampling) -> og.GeneratorParams:
        """The one place GeneratorParams are built (search options, guidance)."""
        params = og.GeneratorParams(self._model)
        options: dict[str, Any] = {"max_length": max_length}
        options |= self._search_options(sampling)
        params.set_search_options(**options)
        if sampling.guidance is not None:
            params.set_guidance(*sampling.guidance)
        return params

    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        on_text: Callable[[str], None],
        cancelled: threading.Event,
        prefix_key: str | None = None,
    ) -> GenerationResult:
        """Generate in the calling thread, handing decoded text to `on_text`.

        `prefix_key`: the client's key for the prompt's household prefix, kept
        with the cache entry and listed in /v1/capacity (`warm_keys`).
        """
        max_new = self.budget(len(prompt_ids), sampling.max_new_tokens)
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        started = time.perf_counter()
        sink = _Sink(self._tokenizer, sampling, on_text, result)
        batch = self.batch_decoder()
        guide: TokenGuide | None = None
        if batch is not None and sampling.guidance is not None:
            guide = (
                None
                if self.grammars.refused(sampling.guidance)
                else self.grammars.matcher(sampling.guidance)
            )
            if guide is None:  # a grammar llguidance cannot take: genai's guidance
                batch = None
        request = _Request(prompt_ids, max_new, sampling, sink, cancelled, result, prefix_key)
        if batch is not None:
            self._generate_batched(batch, guide, request)
        else:
            self._generate_on_generator(request)
        sink.flush()
        ended = time.perf_counter()
        first_token_at = sink.first_token_at
        result.prefill_s = (first_token_at or ended) - started
        result.decode_s = ended - (first_token_at or ended)
        return result

    def _generate_on_generator(self, request: _Request) -> None:
        """Prefill and decode on an onnxruntime-genai generator (from the prompt cache)."""
        prompt_ids, result = request.prompt_ids, request.result
        needed = len(prompt_ids) + request.max_new
        entry = self._generator(prompt_ids, needed, request.sampling)
        kept = False
        try:
            generator = entry.generator
            result.cached_tokens = len(entry.tokens)

            def feed(_: int, piece: list[int]) -> None:
                with self.turns:
                    generator.append_tokens(piece)

            fed = _prefill(feed, prompt_ids, result.cached_tokens, request.cancelled)
            if self._fed(fed, request):
                self._decode_alone(generator, request)
            if self.cache is not None and entry.key is not None:
                tokens = [int(t) for t in generator.get_sequence(0)]
                self.cache.put(entry, tokens, request.prefix_key, len(prompt_ids))
                kept = True
        finally:
            if not kept and self.cache is not None:
                self.cache.discard(entry)

    def _fed(self, fed: int, request: _Request) -> bool:
        """Count `fed` prefilled tokens; whether the whole prompt was fed (else cancelled)."""
        result = request.result
        result.prefilled_tokens = fed
        with self._active_lock:
            self.prefilled_tokens += fed
        if result.cached_tokens + fed < len(request.prompt_ids):
            result.finish_reason = "cancelled"
            return False
        return True

    def _generate_batched(
        self, batch: BatchDecoder, guide: TokenGuide | None, request: _Request
    ) -> None:
        """Prefill in the batch's session, then decode in the batch (even alone).

        The prompt is fed after the longest cached prefix (`_kv_start`: in the cached
        entry itself for its conversation's next turn, else in a buffer of the
        request's own with the prefix copied in); that buffer then goes into the
        prompt cache as it is (read by the requests to come), and its copy in a slot
        of the batch decodes. When the answer ends, its keys and values join the
        entry's, so the conversation's next turn starts after it.
        """
        prompt_ids, result, sampling = request.prompt_ids, request.result, request.sampling
        key = self._cache_key(sampling) if self.cache is not None else None
        entry = self._kv_start(batch, key, prompt_ids, result)
        kv = entry.kv
        assert kv is not None
        logits: list[Floats] = []

        def feed(position: int, piece: list[int]) -> None:
            logits[:] = [batch.prefill(kv, position, piece)]

        fed = 0
        entry.growing = True  # until its answer is in (or it has none)
        try:
            try:
                fed = _prefill(feed, prompt_ids, result.cached_tokens, request.cancelled)
            finally:
                self._keep(entry, prompt_ids[: result.cached_tokens + fed], request)
            if self._fed(fed, request):
                self._answer_batched(batch, guide, request, entry, logits[0])
        finally:
            entry.growing = False

    def _answer_batched(
        self,
        batch: BatchDecoder,
        guide: TokenGuide | None,
        request: _Request,
        entry: CacheEntry,
        logits: Floats,
    ) -> None:
        """The first token from the prompt's last logits, the rest in the batch; then the
        answer's keys and values into the cache entry (after the prompt's)."""
        prompt_ids, result, kv = request.prompt_ids, request.result, entry.kv
        assert kv is not None
        sampler = Sampler(self._search_options(request.sampling), prompt_ids)
        token = batch.choose(sampler, guide, logits)
        if request.sink.push(token):  # a stop sequence
            return
        if token in batch.eos or request.max_new <= 1:  # as on a generator
            ended = token in batch.eos and request.max_new > 1
            result.finish_reason = "stop" if ended else "length"
            return
        job = DecodeJob(
            kv=kv,
            length=len(prompt_ids),
            token=token,
            generated=1,
            max_new=request.max_new,
            sampler=sampler,
            on_token=request.sink.push,
            cancelled=request.cancelled,
            guide=guide,
            keep_from=None if entry.key is None else len(prompt_ids),
        )
        batch.run(job)
        result.finish_reason = job.finish_reason
        if not job.kv or self.cache is None:
            return
        # The answer's keys and values after the prompt's: in the entry's room (only
        # past what readers copy), or in a larger buffer.
        if job.length > kv[0].shape[2]:
            kv = batch.new_kv(self._cached_length(job.length), kv, len(prompt_ids))
        for mine, answer in zip(kv, job.kv, strict=True):
            mine[:, :, len(prompt_ids) : job.length] = answer
        nbytes = kv[0].shape[2] * self.kv_bytes_per_token
        tokens = sampler.history[: job.length]
        self.cache.grow(entry, kv, tokens, nbytes, request.prefix_key, len(prompt_ids))

    def _kv_start(
        self, batch: BatchDecoder, key: Any, prompt_ids: list[int], result: GenerationResult
    ) -> CacheEntry:
        """The entry a batched request prefills into, holding the longest cached prefix
        of its prompt (`result.cached_tokens`): the cached entry itself when the prompt
        extends all of it and fits (its conversation's next turn: nothing copied), else
        a new one with the prefix copied in."""
        taken = Taken(None)
        if self.cache is not None and key is not None:
            taken = self.cache.take(self.cache_owner, key, prompt_ids, 0)
            if taken.entry is not None and taken.entry.kv is None:  # a generator: not ours
                self.cache.put(taken.entry, taken.entry.tokens)
                taken = Taken(None)
        cached = taken.entry  # None, or an entry holding keys and values
        if cached is not None and cached.kv is not None:
            result.cached_tokens = taken.reuse
            if not taken.shared and cached.kv[0].shape[2] >= len(prompt_ids):
                return cached  # taken out: written in place after its tokens
        length = len(prompt_ids) if key is None else self._cached_length(len(prompt_ids))
        held = None if cached is None else cached.kv
        entry = self._new_entry(key, length, kv=batch.new_kv(length, held, taken.reuse))
        if cached is not None and not taken.shared and self.cache is not None:
            entry.prefix_keys = dict(cached.prefix_keys)  # taken out: replaced by ours
            self.cache.discard(cached)
        return entry

    def _new_entry(
        self, key: Any, max_length: int, generator: Any = None, kv: list[Floats] | None = None
    ) -> CacheEntry:
        """A prompt cache entry for a new generator, or a batched model's keys and values
        (room for `max_length` tokens), counted in use until it is kept or discarded."""
        entry = CacheEntry(
            model_id=self.cache_owner,
            key=key,
            generator=generator,
            max_length=max_length,
            nbytes=max_length * self.kv_bytes_per_token,
            kv=kv,
        )
        if self.cache is not None:
            self.cache.started(entry.nbytes)
        return entry

    def _keep(self, entry: CacheEntry, tokens: list[int], request: _Request) -> None:
        """Put a batched model's entry into the prompt cache, holding `tokens`."""
        if self.cache is None:
            return
        if entry.key is None:  # not cacheable (a seeded sample): only counted while it ran
            self.cache.discard(entry)
            return
        self.cache.put(entry, list(tokens), request.prefix_key, len(request.prompt_ids))

    def _cache_key(self, sampling: Sampling) -> Sampling | None:
        """What a cached generator must have been made for to serve `sampling`; None: no reuse.

        A generator's search options and grammar are fixed when it is made, so it
        serves only requests with the same ones (the stop strings and the token
        limit are the engine's, not the generator's). A grammar restarts when the
        generator is rewound (its matcher follows generated tokens only), so a
        household's tool grammar is reused turn after turn. A seeded sample must
        start its own random stream: it is never reused.
        """
        if sampling.seed is not None:
            return None
        return dataclasses.replace(sampling, max_new_tokens=None, stop=[])

    def _cached_length(self, needed: int) -> int:
        """max_length for a generator the cache may keep: room for later turns."""
        step = CACHE_LENGTH_STEP
        length = -(-(needed + CACHE_HEADROOM) // step) * step
        return max(needed, min(self.context_length, length))

    def _generator(self, prompt_ids: list[int], needed: int, sampling: Sampling) -> CacheEntry:
        """A generator holding the longest cached prefix of the prompt (or a new one).

        The entry's `tokens` are the prompt tokens it already holds.
        """
        key = self._cache_key(sampling) if self.cache is not None else None
        taken = Taken(None)
        if self.cache is not None and key is not None:
            taken = self.cache.take(self.cache_owner, key, prompt_ids, needed)
        if taken.entry is not None and self.cache is not None:
            entry = taken.entry
            try:
                entry.generator.rewind_to(taken.reuse)
            except Exception as err:  # a model type that cannot rewind: a new generator
                _LOGGER.debug("Cached generator not rewound (%r); starting anew", err)
                self.cache.discard(entry)
            else:
                entry.tokens = list(prompt_ids[: taken.reuse])
                return entry
        max_length = self._cached_length(needed) if key is not None else needed
        generator = og.Generator(self._model, self._params(max_length, sampling))
        return self._new_entry(key, max_length, generator=generator)

    def batch_decoder(self) -> BatchDecoder | None:
        """The model's shared decode batch (made on first use); None: not batched."""
        if not self.batching:
            return None
        with self._active_lock:
            if self._batch is None:
                try:
                    self._batch = BatchDecoder(
                        self.manifest.path,
                        threads=self.threads,
                        spinning=self.spinning,
                        turns=self.turns,
                    )
                    if self.cache is not None:  # the batch's buffer is in the budget too
                        self._batch.on_bytes = self.cache.held
                except Exception as err:  # an export this cannot run: generators only
                    _LOGGER.warning("Decoding not batched for %s: %s", self.id, err)
                    self.batching = False
                    return None
            return self._batch

    def _decode_alone(self, generator: og.Generator, request: _Request) -> None:
        """Decode on the request's own generator up to its `max_new` tokens."""
        result, max_new = request.result, request.max_new
        while not generator.is_done():
            if result.completion_tokens >= max_new:
                result.finish_reason = "length"
                break
            if request.cancelled.is_set():
                result.finish_reason = "cancelled"
                break
            with self.turns:
                generator.generate_next_token()
            if request.sink.push(int(generator.get_next_tokens()[0])):
                break
        else:
            if result.completion_tokens >= max_new:
                result.finish_reason = "length"

    async def stream(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        cancelled: threading.Event,
        prefix_key: str | None = None,
    ) -> AsyncGenerator[str | GenerationResult]:
        """Yield text pieces as they are generated, then the `GenerationResult`.

        Generation runs in its own thread; if the consumer stops iterating,
        `cancelled` is set and the thread ends after the current token.

        The first piece goes out at once; after it, pieces are handed over at
        most every STREAM_FLUSH_S times the model's requests running now (25 ms
        alone, 100 ms for each of four). Waking the event loop, writing an SSE
        event and encrypting it for every token costs the decoding threads CPU
        time on a small machine; a few tokens a flush do not show in a reply
        being read or spoken.
        """
        loop = asyncio.get_running_loop()
        lock = threading.Lock()
        pending: list[str] = []
        outcome: list[GenerationResult | BaseException] = []
        ready = asyncio.Event()
        finished = asyncio.Event()  # the last piece is not held back
        signalled = False  # a wake-up is on its way to the loop

        def hand_over(
            text: str | None = None, end: GenerationResult | BaseException | None = None
        ) -> None:
            nonlocal signalled
            with lock:
                if text:
                    pending.append(text)
                if end is not None:
                    outcome.append(end)
                wake = not signalled
                signalled = True
            if wake:
                loop.call_soon_threadsafe(ready.set)
            if end is not None:
                loop.call_soon_threadsafe(finished.set)

        def run() -> None:
            with self._active_lock:
                self.active += 1
                running = self.active
            _LOGGER.debug("Generation started: %d running", running)
            try:
                result: GenerationResult | BaseException = self.generate(
                    prompt_ids, sampling, hand_over, cancelled, prefix_key
                )
            except BaseException as err:  # handed to the event loop and raised there
                result = err
            with self._active_lock:
                self.active -= 1
                running = self.active
            if isinstance(result, GenerationResult):
                _LOGGER.debug(
                    "Generation ended (%s) after %d tokens, prefill %.3f s: %d running; "
                    "prompt %d tokens: %d from the cache, %d prefilled",
                    result.finish_reason,
                    result.completion_tokens,
                    result.prefill_s,
                    running,
                    result.prompt_tokens,
                    result.cached_tokens,
                    result.prefilled_tokens,
                )
            hand_over(end=result)

        thread = threading.Thread(target=run, name=f"generate-{self.id}", daemon=True)
        thread.start()
        try:
            flushed_at: float | None = None
            while True:
                await ready.wait()
                if flushed_at is not None:
                    # Each stream of the model flushes less often the more run:
                    # the server's writes stay about as many a second in all.
                    wait = flushed_at + STREAM_FLUSH_S * max(1, self.active) - loop.time()
                    if wait > 0 and not finished.is_set():
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(wait):
                                await finished.wait()
                ready.clear()
                with lock:
                    signalled = False
                    pieces, pending[:] = list(pending), []
                    end = outcome[0] if outcome else None
                if pieces:
                    flushed_at = loop.time()
                    yield "".join(pieces)
                if isinstance(end, BaseException):
                    raise end
                if isinstance(end, GenerationResult):
                    yield end
                    return
        finally:
            cancelled.set()
            if not finished.is_set():
                await run_to_end(finished.wait())
