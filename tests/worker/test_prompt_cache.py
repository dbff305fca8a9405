"""The prompt cache: later turns and other conversations reuse a cached prefix's KV cache.

On the tiny model, in this process (the engine), and once through a real worker
process (usage and /v1/capacity). Nothing here depends on timing or on
floating-point details: the assertions are on token counts (what the cache
supplied, what the model was fed), on what the cache holds, and on structure.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_api import CHAT, model_id
from worker_process import WorkerProcess

from addon.hearth_worker.batch_decode import LENGTH_STEP
from addon.hearth_worker.chat_engine import ChatModel, GenerationResult, Sampling
from addon.hearth_worker.manifest import load_manifest
from addon.hearth_worker.prompt_cache import (
    MIN_REUSE_TOKENS,
    PromptCache,
    common_prefix,
    prefix_hash,
)

HOUSEHOLD = "You are the voice assistant of a home. Devices change only through tools. " + " ".join(
    f"light.room_{i} in area {i % 5} is {'on' if i % 2 else 'off'}." for i in range(40)
)
GREEDY = Sampling(max_new_tokens=8, temperature=0)


def conversation(*users: str, answers: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": HOUSEHOLD}]
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


@pytest.fixture(scope="module")
def manifest(tiny_chat_model: Path) -> Any:
    return load_manifest(tiny_chat_model)


def run(
    model: ChatModel, prompt: list[int], sampling: Sampling = GREEDY
) -> tuple[GenerationResult, str]:
    pieces: list[str] = []
    result = model.generate(prompt, sampling, pieces.append, threading.Event())
    return result, "".join(pieces)


def test_second_turn_reuses_the_prefix(manifest: Any) -> None:
    cache = PromptCache()
    model = ChatModel(manifest, threads=1, cache=cache)
    first = model.prepare(conversation("turn on the kitchen light"), None)
    result, answer = run(model, first)
    assert result.cached_tokens == 0
    assert model.prefilled_tokens == len(first)

    second = model.prepare(
        conversation("turn on the kitchen light", "and the fan", answers=(answer,)), None
    )
    assert second[: len(first)] == first  # the template appends: the old prompt is a prefix
    fed_before = model.prefilled_tokens
    result, _ = run(model, second)
    # Everything the first turn held that the second prompt shares was reused ...
    assert result.cached_tokens >= len(first)
    assert result.cached_tokens <= len(second) - 1  # one token is always fed (its logits)
    # ... and only the rest was prefilled.
    assert model.prefilled_tokens - fed_before == len(second) - result.cached_tokens
    assert result.prompt_tokens == len(second)
    assert cache.snapshot()["hits"] == 1
    assert cache.snapshot()["cached_tokens"] == result.cached_tokens


def test_reused_generator_answers_like_a_fresh_one_under_a_grammar(manifest: Any) -> None:
    """A grammar restarts when a cached generator is rewound: the answer still follows it."""
    schema = {
        "type": "object",
        "properties": {"name": {"enum": ["HassTurnOn", "HassTurnOff"]}},
        "required": ["name"],
        "additionalProperties": False,
    }
    guided = Sampling(
        max_new_tokens=40, temperature=0, guidance=("json_schema", json.dumps(schema))
    )
    cache = PromptCache()
    model = ChatModel(manifest, threads=1, cache=cache)
    first, answer = run(model, model.prepare(conversation("turn on the light"), None), guided)
    assert first.cached_tokens == 0
    second = model.prepare(
        conversation("turn on the light", "turn it off", answers=(answer,)), None
    )
    result, text = run(model, second, guided)
    assert result.cached_tokens > 0
    if result.finish_reason == "stop":  # a grammar's answer cut by the limit is not whole
        assert json.loads(text)["name"] in ("HassTurnOn", "HassTurnOff")
    else:
        assert text.lstrip().startswith("{")


def test_conversations_sharing_a_system_prompt_share_the_cache(manifest: Any) -> None:
    cache = PromptCache()
    model = ChatModel(manifest, threads=1, cache=cache)
    alice = model.prepare(conversation("turn on the kitchen light"), None)
    bob = model.prepare(conversation("what is the temperature in the attic?"), None)
    shared = common_prefix(alice, bob)
    assert shared >= MIN_REUSE_TOKENS  # the household prompt
    run(model, alice)
    fed_before = model.prefilled_tokens
    result, _ = run(model, bob)
    assert result.cached_tokens == shared
    assert model.prefilled_tokens - fed_before == len(bob) - shared


def test_other_search_options_do_not_share_a_generator(manifest: Any) -> None:
    cache = PromptCache()
    model = ChatModel(manifest, threads=1, cache=cache)
    prompt = model.prepare(conversation("turn on the kitchen light"), None)
    run(model, prompt)
    result, _ = run(model, prompt, Sampling(max_new_tokens=8, temperature=0.7, top_p=0.9))
    assert result.cached_tokens == 0  # made for greedy decoding: not this request's
    seeded = Sampling(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=3)
    result, _ = run(model, prompt, seeded)
    assert result.cached_tokens == 0  # a seeded sample starts its own random stream
    assert cache.snapshot()["in_use_bytes"] == 0  # counted while it ran, not kept
    result, _ = run(model, prompt)
    assert result.cached_tokens == len(prompt) - 1  # the same prompt: all but the last


def household_prompts(model: ChatModel, *words: str) -> list[list[int]]:
    """One prompt per word, sharing no prefix worth reusing."""
    prompts = [
        model.prepare(
            [
                {"role": "system", "content": f"{word} " + HOUSEHOLD},
                {"role": "user", "content": "hi"},
            ],
            None,
        )
        for word in words
    ]
    assert all(common_prefix(a, b) < MIN_REUSE_TOKENS for a in prompts for b in prompts if a != b)
    return prompts


def test_budget_evicts_the_least_recently_used(manifest: Any) -> None:
    """Generators (a model that cannot batch), each sized for later turns."""
    probe = ChatModel(manifest, threads=1, batching=False)
    prompts = household_prompts(probe, "Alpha", "Bravo", "Charlie")
    longest = max(len(p) for p in prompts)
    entry_bytes = probe._cached_length(longest + 8) * probe.kv_bytes_per_token
    cache = PromptCache(budget_bytes=2 * entry_bytes)  # room for two
    model = ChatModel(manifest, threads=1, cache=cache, batching=False)
    for prompt in prompts:
        assert run(model, prompt)[0].cached_tokens == 0
    snapshot = cache.snapshot()
    assert snapshot["entries"] == 2
    assert snapshot["evictions"] == 1
    assert snapshot["used_bytes"] <= snapshot["budget_bytes"]
    assert snapshot["used_bytes"] <= snapshot["peak_bytes"] <= snapshot["budget_bytes"]
    assert run(model, prompts[2])[0].cached_tokens > 0  # the newest stays
    assert run(model, prompts[1])[0].cached_tokens > 0
    assert run(model, prompts[0])[0].cached_tokens == 0  # the oldest went
    # ... and coming back made the least recently used one (Charlie) go.
    assert run(model, prompts[2])[0].cached_tokens == 0


def test_budget_holds_a_batched_models_entries_and_running_buffers(manifest: Any) -> None:
    """A batched model's entries (keys and values with room for later turns), a
    running request's own buffer and the batch's buffer share the budget: the least
    recently used entries make room for them."""
    probe = ChatModel(manifest, threads=1)
    prompts = household_prompts(probe, "Alpha", "Bravo", "Charlie", "Delta")
    longest = max(len(p) for p in prompts)
    entry_bytes = probe._cached_length(longest) * probe.kv_bytes_per_token
    # One slot of the batch, grown in steps of LENGTH_STEP tokens as the answer grows.
    batch_bytes = -(-(longest + 8) // LENGTH_STEP) * LENGTH_STEP * probe.kv_bytes_per_token
    # Room for three entries, or two and a running request's own buffer, and a batch.
    cache = PromptCache(budget_bytes=3 * entry_bytes + batch_bytes)
    model = ChatModel(manifest, threads=1, cache=cache)
    for prompt in prompts:
        assert run(model, prompt)[0].cached_tokens == 0
        snapshot = cache.snapshot()
        assert snapshot["in_use_bytes"] == 0  # the request's buffer is the entry now
        assert snapshot["used_bytes"] <= snapshot["peak_bytes"] <= snapshot["budget_bytes"]
    assert [e.tokens[: len(p)] for e, p in zip(cache.entries(), prompts[1:], strict=True)] == (
        prompts[1:]
    )  # Alpha, the least recently used, went for Delta's buffer
    snapshot = cache.snapshot()
    assert (snapshot["entries"], snapshot["evictions"]) == (3, 1)
    assert all(e.nbytes == e.max_length * probe.kv_bytes_per_token for e in cache.entries())
    assert snapshot["peak_bytes"] >= 3 * entry_bytes + batch_bytes - entry_bytes
    assert run(model, prompts[3])[0].cached_tokens > 0  # the newest stays
    assert run(model, prompts[0])[0].cached_tokens == 0  # the oldest went


def test_removed_model_drops_its_cache(manifest: Any) -> None:
    cache = PromptCache()
    kept = ChatModel(manifest, threads=1, cache=cache)
    removed = ChatModel(manifest, threads=1, cache=cache)  # same name, another instance
    prompt = kept.prepare(conversation("turn on the kitchen light"), None)
    run(kept, prompt)
    run(removed, prompt)  # not the other instance's entry: its own
    assert len(cache.entries()) == 2
    assert kept.warm_prefixes() and removed.warm_prefixes()
    del removed
    gc.collect()
    assert len(cache.entries()) == 1
    assert cache.entries()[0].model_id == kept.cache_owner
    kept.close()
    assert cache.entries() == []


class CancelAfter(threading.Event):
    """Reads as set from its `calls`-th check on: cancels in the middle of a prefill."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        return self.calls <= 0 or super().is_set()


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "generators"])
async def test_cancel_during_prefill_stops_it_and_frees_the_generator(
    manifest: Any, batching: bool
) -> None:
    cache = PromptCache()
    model = ChatModel(manifest, threads=1, cache=cache, batching=batching)
    prompt = model.prepare(conversation(*(f"turn on light {i}" for i in range(60))), None)
    assert len(prompt) > 1000  # many prefill slices
    cancelled = CancelAfter(2)  # after the first slice
    items = [item async for item in model.stream(prompt, GREEDY, cancelled)]
    result = items[-1]
    assert isinstance(result, GenerationResult)
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens == 0
    assert 0 < model.prefilled_tokens < len(prompt)
    assert model.active == 0  # the generation thread has ended
    assert cache.snapshot()["in_use_bytes"] == 0  # its generator is back (or gone)
    # What it did prefill is reused by the next request for the same prompt.
    fed = model.prefilled_tokens
    result, _ = run(model, prompt)
    # A generator's last token is never reused (it may not be in its KV cache yet);
    # a batched model's entry holds the keys and values of every token it lists.
    assert result.cached_tokens == (fed if batching else fed - 1)
    assert model.prefilled_tokens - fed == len(prompt) - result.cached_tokens


def test_prefix_hashes_are_of_token_ids() -> None:
    ids = list(range(100))
    assert prefix_hash(ids, 64) == prefix_hash([*ids[:64], 7, 7], 64)
    assert prefix_hash(ids, 64) != prefix_hash(ids, 65)
    assert len(prefix_hash(ids, 64)) == 32


async def test_worker_reports_cached_tokens_and_warm_prefixes(
    http: aiohttp.ClientSession, tiny_chat_model: Path, cache_worker: WorkerProcess
) -> None:
    worker = cache_worker
    model = model_id(tiny_chat_model)
    usages = []
    for user in ("turn on the kitchen light", "what is the temperature in the attic?"):
        body = {"model": model, "messages": conversation(user), "max_tokens": 4}
        async with http.post(worker.url + CHAT, json=body, headers=worker.headers) as resp:
            assert resp.status == 200, await resp.text()
            usages.append((await resp.json())["usage"])
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= MIN_REUSE_TOKENS
    # Streamed, with usage: reported there too.
    body = {
        "model": model,
        "messages": conversation("turn on the kitchen light"),
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(worker.url + CHAT, json=body, headers=worker.headers) as resp:
        events = [
            json.loads(line[6:])
            for line in (await resp.text()).splitlines()
            if line.startswith("data: {")
        ]
    streamed = [e["usage"] for e in events if e.get("usage")]
    assert streamed[-1]["prompt_tokens_details"]["cached_tokens"] > 0
    async with http.get(worker.url + "/v1/capacity", headers=worker.headers) as resp:
        capacity = await resp.json()
    cache = capacity["prompt_cache"]
    assert cache["budget_bytes"] == 64 * 1024 * 1024
    assert 0 < cache["used_bytes"] <= cache["budget_bytes"]
    assert cache["peak_bytes"] >= cache["used_bytes"]
    warm = cache["warm_prefixes"][model]
    assert {"tokens": 32, "sha256": warm[0]["sha256"]} in warm
    text = json.dumps(capacity)
    assert "kitchen" not in text and "light.room" not in text  # hashes, never text
    await asyncio.sleep(0)


class _CannotRewind:
    """A generator of a model type onnxruntime-genai cannot rewind."""

    def rewind_to(self, length: int) -> None:
        raise RuntimeError("RewindTo is currently not supported for this model")


def test_generator_that_cannot_rewind_is_replaced(manifest: Any) -> None:
    cache = PromptCache()
    model = ChatModel(manifest, threads=1, cache=cache, batching=False)
    prompt = model.prepare(conversation("turn on the kitchen light"), None)
    run(model, prompt)
    [entry] = cache.entries()
    entry.generator = _CannotRewind()
    result, _ = run(model, prompt)
    assert result.cached_tokens == 0
    assert result.completion_tokens > 0
    assert cache.snapshot()["in_use_bytes"] == 0
    assert [e.generator for e in cache.entries()] != [entry.generator]
