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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime_genai as og

from .admission import run_to_end
from .chat_template import ChatTemplate
from .manifest import Manifest

_LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
# Characters a token covers at most when the tokenizer's vocabulary cannot be read.
FALLBACK_MAX_TOKEN_CHARS = 256
# Prompt tokens are fed in slices of about this long (see _prefill).
PREFILL_SLICE_S = 0.05
PREFILL_FIRST_SLICE = 64
PREFILL_MIN_SLICE = 16
# Margin on the vocabulary's longest entry: a normalizer may shorten text (NFKC).
TOKEN_CHARS_MARGIN = 2
# After the first piece of a streamed answer, hand text to the server at most this often.
STREAM_FLUSH_S = 0.025


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
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationResult:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = "stop"  # "stop" | "length" | "cancelled"


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


def _prefill(generator: og.Generator, prompt_ids: list[int], cancelled: threading.Event) -> bool:
    """Feed the prompt to the generator in slices; False when cancelled meanwhile.

    onnxruntime-genai holds the GIL while it processes appended tokens: one
    append of a long prompt would freeze the event loop (every other request,
    even /v1/health) for the whole prefill, and could not be cancelled. Slices
    of about PREFILL_SLICE_S each (sized from the last one's rate) hand the GIL
    over between them, and cancellation is checked there.
    """
    size = PREFILL_FIRST_SLICE
    position = 0
    while position < len(prompt_ids):
        if cancelled.is_set():
            return False
        begun = time.perf_counter()
        generator.append_tokens(prompt_ids[position : position + size])
        position += size
        took = max(time.perf_counter() - begun, 1e-4)
        size = max(PREFILL_MIN_SLICE, min(2 * size, int(size * PREFILL_SLICE_S / took)))
        time.sleep(0)  # let the event loop run
    return True


def _genai_config(manifest: Manifest, threads: int) -> og.Config:
    config = og.Config(str(manifest.path))
    config.clear_providers()
    overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    config.overlay(json.dumps(overlay))
    return config


class ChatModel:
    """One chat model loaded with onnxruntime-genai."""

    def __init__(self, manifest: Manifest, *, threads: int | None = None) -> None:
        self.manifest = manifest
        self.id = manifest.name
        self.context_length = manifest.context_length
        self.threads = threads or os.cpu_count() or 1
        self._model = og.Model(_genai_config(manifest, self.threads))
        self._tokenizer = og.Tokenizer(self._model)
        self.template = ChatTemplate.from_model_dir(manifest.path)
        self.token_chars = max_token_chars(manifest.path / "tokenizer.json") * TOKEN_CHARS_MARGIN
        self._active_lock = threading.Lock()
        self.active = 0  # generation threads running now

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

    def _params(self, max_length: int, sampling: Sampling) -> og.GeneratorParams:
        """The one place GeneratorParams are built (search options, guidance)."""
        params = og.GeneratorParams(self._model)
        options: dict[str, Any] = {"max_length": max_length}
        if sampling.temperature:  # None or 0 means greedy
            options |= {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p or 1.0,
                "top_k": 0,
            }
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed
        else:
            options["do_sample"] = False
        params.set_search_options(**options)
        return params

    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        on_text: Callable[[str], None],
        cancelled: threading.Event,
    ) -> GenerationResult:
        """Generate in the calling thread, handing decoded text to `on_text`."""
        max_new = self.budget(len(prompt_ids), sampling.max_new_tokens)
        params = self._params(len(prompt_ids) + max_new, sampling)
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        generator = og.Generator(self._model, params)
        stream = self._tokenizer.create_stream()
        stops = StopMatcher(sampling.stop)
        started = time.perf_counter()
        first_token_at = None
        if not _prefill(generator, prompt_ids, cancelled):
            result.finish_reason = "cancelled"
        else:
            while not generator.is_done():
                if cancelled.is_set():
                    result.finish_reason = "cancelled"
                    break
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                result.completion_tokens += 1
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                text = stops.push(stream.decode(token))
                if text:
                    on_text(text)
                if stops.stopped:
                    break
            else:
                if result.completion_tokens >= max_new:
                    result.finish_reason = "length"
        tail = stops.flush()
        if tail:
            on_text(tail)
        ended = time.perf_counter()
        result.prefill_s = (first_token_at or ended) - started
        result.decode_s = ended - (first_token_at or ended)
        return result

    async def stream(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        cancelled: threading.Event,
    ) -> AsyncGenerator[str | GenerationResult]:
        """Yield text pieces as they are generated, then the `GenerationResult`.

        Generation runs in its own thread; if the consumer stops iterating,
        `cancelled` is set and the thread ends after the current token.

        The first piece goes out at once; after it, pieces are handed over at
        most every STREAM_FLUSH_S. Waking the event loop, writing an SSE event
        and encrypting it for every token costs the decoding threads CPU time on
        a small machine; a few tokens a flush do not show in a reply being
        read or spoken.
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
                    prompt_ids, sampling, hand_over, cancelled
                )
            except BaseException as err:  # handed to the event loop and raised there
                result = err
            with self._active_lock:
                self.active -= 1
                running = self.active
            if isinstance(result, GenerationResult):
                _LOGGER.debug(
                    "Generation ended (%s) after %d tokens, prefill %.3f s: %d running",
                    result.finish_reason,
                    result.completion_tokens,
                    result.prefill_s,
                    running,
                )
            hand_over(end=result)

        thread = threading.Thread(target=run, name=f"generate-{self.id}", daemon=True)
        thread.start()
        try:
            flushed_at: float | None = None
            while True:
                await ready.wait()
                if flushed_at is not None:
                    wait = flushed_at + STREAM_FLUSH_S - loop.time()
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
