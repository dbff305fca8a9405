"""Continuous batching (batch_decode.py): requests decode together, exactly, guided
ones under their grammar too.

On the taught test model (scripts/demo_model), whose taught answers lead the
runner-up by at least 2 logits at every token (tests/export/test_taught_model.py:
thousands of times the rounding differences between batch sizes and CPUs), so
the tokens compared here do not depend on this CPU's float details. Joins are
made certain with the batch's pause (requests queue up, then step together) or
a request's own callback holding the batch until another has queued: nothing
depends on timing.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import model_fixtures
import numpy as np
import pytest

from addon.hearth_worker.batch_decode import BatchDecoder, Sampler, TurnLock
from addon.hearth_worker.chat_engine import ChatModel, GenerationResult, Sampling
from addon.hearth_worker.guidance import Guide
from addon.hearth_worker.manifest import load_manifest
from addon.hearth_worker.prompt_cache import PromptCache, common_prefix

sys.path.insert(0, str(model_fixtures.REPO / "scripts" / "export"))
from teach_data import AFTER_TOOL, HELLO, TOOL_CALL, held_out, home_assistant_held_out
from teach_data import Sampler as Conversations

GREEDY = Sampling(max_new_tokens=48, temperature=0)
WAIT_S = 120  # generous: only a hang reaches it


@pytest.fixture(scope="module")
def cases(taught_chat_model: Path) -> list[tuple[str, str]]:
    """(prompt text, taught answer): Home Assistant's prompt with 12 tools (~1,000
    tokens), the three answers, and a few shorter random conversations."""
    template = (taught_chat_model / "chat_template.jinja").read_text()
    household = home_assistant_held_out(Conversations(template, random.Random(2024)))[:3]
    return household + held_out(Conversations(template, random.Random(2024)))[:3]


@pytest.fixture(scope="module")
def alone(taught_chat_model: Path) -> ChatModel:
    """Today's path: every request decoded by its own generator."""
    return ChatModel(load_manifest(taught_chat_model), threads=1, batching=False)


@pytest.fixture
def batched(taught_chat_model: Path) -> ChatModel:
    """As the worker runs it: every request prefills and decodes in the batch, even alone."""
    model = ChatModel(load_manifest(taught_chat_model), threads=1, cache=PromptCache())
    assert model.batching
    return model


def generate(
    model: ChatModel,
    prompt: list[int],
    sampling: Sampling = GREEDY,
    cancelled: threading.Event | None = None,
    on_text: Callable[[str], None] | None = None,
) -> tuple[GenerationResult, str]:
    pieces: list[str] = []

    def take(text: str) -> None:
        pieces.append(text)
        if on_text is not None:
            on_text(text)

    result = model.generate(prompt, sampling, take, cancelled or threading.Event())
    return result, "".join(pieces)


def in_threads(
    model: ChatModel, jobs: list[tuple[list[int], Sampling]]
) -> list[tuple[GenerationResult, str]]:
    """Run the requests at once: they join the paused batch in this order (slot i for
    request i), then step together."""
    out = together(model, [lambda job=job: generate(model, *job) for job in jobs])
    for item in out:
        if isinstance(item, Exception):
            raise item
    return out


def together(model: ChatModel, requests: list[Callable[[], Any]]) -> list[Any]:
    """Call each in a thread of its own; they join the paused batch in this order,
    then step together. What each returned, or the exception it raised."""
    batch = model.batch_decoder()
    assert batch is not None
    out: list[Any] = [None] * len(requests)

    def run(i: int) -> None:
        try:
            out[i] = requests[i]()
        except Exception as err:  # handed to the test
            out[i] = err

    batch.pause()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    try:
        for queued, thread in enumerate(threads, 1):
            thread.start()
            wait_for(lambda: batch.pending() == queued)  # noqa: B023
    finally:
        batch.resume()
        for thread in threads:
            if thread.ident is not None:  # started
                thread.join(WAIT_S)
    return out


def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(WAIT_S * 20):
        if condition():
            return
        threading.Event().wait(0.05)
    raise AssertionError("timed out")


def test_answers_decoded_together_equal_answers_decoded_alone(
    cases: list[tuple[str, str]], alone: ChatModel, batched: ChatModel
) -> None:
    prompts = [batched.encode(text) for text, _ in cases[:4]]
    assert len({len(p) for p in prompts}) > 1  # each its own length in the batch
    # The first (slot 0) stops early at its token limit and leaves while the others go
    # on: the last slot's sequence moves into its place.
    samplings = [Sampling(max_new_tokens=3, temperature=0), GREEDY, GREEDY, GREEDY]
    together = in_threads(batched, list(zip(prompts, samplings, strict=True)))
    batch = batched.batch_decoder()
    assert batch is not None and batch.peak_batch == 4
    assert batched.batch_peak_bytes == batch.peak_bytes > 0  # /v1/capacity's figure
    for (text, answer), prompt, sampling, (result, got) in zip(
        cases, prompts, samplings, together, strict=False
    ):
        expected_result, expected = generate(alone, prompt, sampling)
        assert got == expected, text[-200:]
        assert result.completion_tokens == expected_result.completion_tokens
        assert result.finish_reason == expected_result.finish_reason
        assert result.prompt_tokens == len(prompt)
        if sampling.max_new_tokens == 3:
            assert result.finish_reason == "length" and result.completion_tokens == 3
        else:
            assert got == answer and result.finish_reason == "stop"
    assert batch.running() == 0


def test_a_request_joins_a_running_batch(
    cases: list[tuple[str, str]], alone: ChatModel, batched: ChatModel
) -> None:
    """B queues while A decodes (A's callback holds the batch until B is queued): B
    joins between A's steps, both answers are the ones decoded alone."""
    batch = batched.batch_decoder()
    assert batch is not None
    first = batched.encode(cases[0][0])
    second = batched.encode(cases[2][0])
    results: dict[str, tuple[GenerationResult, str]] = {}
    seen = 0
    other: list[threading.Thread] = []

    def run_b() -> None:
        results["b"] = generate(batched, second)

    def on_text(_: str) -> None:
        nonlocal seen
        seen += 1
        if seen == 3:  # A is decoding in the batch now: start B, wait until it queued
            thread = threading.Thread(target=run_b)
            other.append(thread)
            thread.start()
            wait_for(lambda: batch.pending() == 1)

    results["a"] = generate(batched, first, on_text=on_text)
    other[0].join(WAIT_S)
    assert batch.peak_batch == 2
    assert results["a"][1] == generate(alone, first)[1] == cases[0][1]
    assert results["b"][1] == generate(alone, second)[1] == cases[2][1]


def test_cancel_frees_the_slot(cases: list[tuple[str, str]], batched: ChatModel) -> None:
    prompt = batched.encode(cases[0][0])
    cancelled = threading.Event()
    result, text = generate(batched, prompt, cancelled=cancelled, on_text=lambda _: cancelled.set())
    assert result.finish_reason == "cancelled"
    assert TOOL_CALL.startswith(text) and text != TOOL_CALL
    batch = batched.batch_decoder()
    assert batch is not None and batch.running() == 0  # the slot is free
    # and the batch goes on serving
    assert generate(batched, prompt)[1] == TOOL_CALL


def test_a_failing_request_leaves_the_others_be(
    cases: list[tuple[str, str]], batched: ChatModel
) -> None:
    """A request whose text cannot be handed over (its client's loop gone) fails
    alone: the others in the batch go on."""
    batch = batched.batch_decoder()
    assert batch is not None
    prompts = [batched.encode(cases[0][0]), batched.encode(cases[2][0])]
    handed: list[str] = []

    def broken(text: str) -> None:  # the first piece (the generator's) goes out
        handed.append(text)
        if len(handed) > 1:
            raise RuntimeError("Event loop is closed")

    out = together(
        batched,
        [
            lambda: generate(batched, prompts[0], on_text=broken),
            lambda: generate(batched, prompts[1]),
        ],
    )
    assert isinstance(out[0], RuntimeError)
    assert out[1][1] == HELLO
    assert batch.running() == 0


def test_stop_strings_and_the_token_limit(
    cases: list[tuple[str, str]], alone: ChatModel, batched: ChatModel
) -> None:
    prompt = batched.encode(cases[0][0])
    stop = Sampling(max_new_tokens=48, temperature=0, stop=["kitchen"])
    result, text = generate(batched, prompt, stop)
    assert text == TOOL_CALL[: TOOL_CALL.index("kitchen")]
    assert result.finish_reason == "stop"
    assert (result.completion_tokens, text) == (
        generate(alone, prompt, stop)[0].completion_tokens,
        generate(alone, prompt, stop)[1],
    )
    short = Sampling(max_new_tokens=5, temperature=0)
    result, text = generate(batched, prompt, short)
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    assert text == generate(alone, prompt, short)[1]
    assert TOOL_CALL.startswith(text)
    batch = batched.batch_decoder()
    assert batch is not None and batch.steps > 0


def test_usage_and_the_prompt_cache_are_reported_as_before(
    cases: list[tuple[str, str]], batched: ChatModel
) -> None:
    prompt = batched.encode(cases[2][0])  # "hello" with the household prompt
    first, text = generate(batched, prompt)
    assert text == HELLO and first.cached_tokens == 0
    assert first.completion_tokens > 1 and first.decode_s >= 0 and first.prefill_s > 0
    again, text = generate(batched, prompt)
    assert text == HELLO
    assert again.cached_tokens == len(prompt) - 1  # the cached generator served the prefix
    assert batched.prefilled_tokens == len(prompt) + 1


def tools_naming(target: dict[str, Any]) -> list[dict[str, Any]]:
    """HassTurnOn and HassTurnOff, their one argument ("name") of the `target` schema."""
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "parameters": {
                    "type": "object",
                    "properties": {"name": target},
                    "required": ["name"],
                },
            },
        }
        for name in ("HassTurnOn", "HassTurnOff")
    ]


TOOLS = tools_naming({"type": "string"})


def guided(
    model: ChatModel, tool_choice: str = "auto", tools: list[dict[str, Any]] = TOOLS
) -> tuple[Sampling, Guide]:
    """Greedy under the tool grammar the worker builds for these tools."""
    guide = model.guidance.plan(tools=tools, tool_choice=tool_choice)
    assert guide is not None
    return dataclasses.replace(GREEDY, guidance=guide.guidance), guide


def test_guided_requests_decode_together_as_on_their_generator(
    cases: list[tuple[str, str]], alone: ChatModel, batched: ChatModel
) -> None:
    """Tools under their grammar (every voice command): decoded together in the batch
    (llguidance matchers there), the answers genai's guided generator gives alone."""
    sampling, guide = guided(batched)
    prompts = [batched.encode(cases[i][0]) for i in (0, 2, 1)]
    out = in_threads(batched, [(prompt, sampling) for prompt in prompts])
    batch = batched.batch_decoder()
    assert batch is not None and batch.peak_batch == 3
    for prompt, i, (result, text) in zip(prompts, (0, 2, 1), out, strict=True):
        assert text == generate(alone, prompt, guided(alone)[0])[1] == cases[i][1]
        assert result.finish_reason == "stop"
    reader = guide.reader()
    reader.feed(out[0][1])
    content, calls = reader.finish(cut=False)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [
        ("HassTurnOn", {"name": "kitchen light"})
    ]


def test_guided_and_unguided_requests_share_a_batch(
    cases: list[tuple[str, str]], batched: ChatModel
) -> None:
    sampling, _ = guided(batched)
    jobs = [
        (batched.encode(cases[0][0]), sampling),
        (batched.encode(cases[0][0]), GREEDY),
        (batched.encode(cases[2][0]), GREEDY),
        (batched.encode(cases[2][0]), sampling),
    ]
    out = in_threads(batched, jobs)
    batch = batched.batch_decoder()
    assert batch is not None and batch.peak_batch == 4
    assert [text for _, text in out] == [TOOL_CALL, TOOL_CALL, HELLO, HELLO]


def test_the_grammar_holds_in_the_batch(cases: list[tuple[str, str]], batched: ChatModel) -> None:
    """tool_choice "required" on "hello" (taught to answer in words): the batch's mask
    makes it a valid call, ended where the grammar ends; a JSON schema holds too. The
    tools name their targets (an enum), so the grammar, not the model, ends the call's
    string: forced to call on "hello", the model was never taught where to stop one."""
    targets = ["kitchen light", "living room lights"]
    sampling, guide = guided(batched, "required", tools_naming({"enum": targets}))
    schema = {
        "type": "object",
        "properties": {"name": {"enum": ["HassTurnOn", "HassTurnOff"]}},
        "required": ["name"],
    }
    as_json = dataclasses.replace(
        GREEDY, max_new_tokens=40, guidance=("json_schema", json.dumps(schema))
    )
    hello = batched.encode(cases[2][0])
    out = in_threads(batched, [(hello, sampling), (hello, GREEDY), (hello, as_json)])
    batch = batched.batch_decoder()
    assert batch is not None and batch.peak_batch == 3 and batch.steps > 3
    (result, text), (_, plain), (_, answer) = out
    assert plain == HELLO  # unguided, the taught words
    assert result.finish_reason == "stop" and result.completion_tokens > 3, text
    reader = guide.reader()
    reader.feed(text)
    content, calls = reader.finish(cut=False)
    assert content == "" and calls
    for call in calls:
        assert call.name in {"HassTurnOn", "HassTurnOff"}
        assert isinstance(call.arguments, dict) and call.arguments["name"] in targets
    assert answer.lstrip().startswith("{") and "Hello" not in answer


def test_a_grammar_llguidance_cannot_take_keeps_its_generator(
    cases: list[tuple[str, str]], batched: ChatModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a matcher (the grammar fails to build, or llguidance is missing) a
    guided request decodes on its own generator, as before."""
    sampling, _ = guided(batched)
    prompt = batched.encode(cases[0][0])
    batch = batched.batch_decoder()
    assert batch is not None

    def broken(_: tuple[str, str]) -> None:
        raise ValueError("injected: llguidance refuses this grammar")

    monkeypatch.setattr(batched.grammars, "_compile", broken)
    for _ in range(2):  # found out when its matcher is made, then known from the start
        result, text = generate(batched, prompt, sampling)
        assert text == TOOL_CALL and result.finish_reason == "stop"
        assert batch.steps == 0
    assert batched.grammars.refused(sampling.guidance or ("", ""))
    assert generate(batched, prompt)[1] == TOOL_CALL and batch.steps > 0  # unguided: batched

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails
    missing = ChatModel(load_manifest(Path(batched.manifest.path)), threads=1)
    assert generate(missing, prompt, sampling)[1] == TOOL_CALL
    missing_batch = missing.batch_decoder()
    assert missing_batch is not None and missing_batch.steps == 0


def test_a_request_without_a_matcher_keeps_its_generator(
    cases: list[tuple[str, str]], batched: ChatModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampling, _ = guided(batched)
    asked: list[tuple[str, str]] = []

    def refused(guidance: tuple[str, str]) -> None:
        asked.append(guidance)

    monkeypatch.setattr(batched.grammars, "matcher", refused)
    result, text = generate(batched, batched.encode(cases[0][0]), sampling)
    assert text == TOOL_CALL and result.finish_reason == "stop"
    assert asked == [sampling.guidance]  # asked for once, at the start
    batch = batched.batch_decoder()
    assert batch is not None and batch.steps == 0


def test_an_after_tool_answer(cases: list[tuple[str, str]], batched: ChatModel) -> None:
    assert generate(batched, batched.encode(cases[1][0]))[1] == AFTER_TOOL


def test_seeded_samples_repeat(tiny_chat_model: Path) -> None:
    """On the untaught tiny model (flat distributions): the seed decides every draw."""
    model = ChatModel(load_manifest(tiny_chat_model), threads=1)
    prompt = model.prepare([{"role": "user", "content": "tell me a story"}], None)
    seeded = Sampling(max_new_tokens=24, temperature=1.5, top_p=0.95, top_k=400, seed=7)
    first = generate(model, prompt, seeded)
    again = generate(model, prompt, seeded)
    assert first[1] == again[1] and first[0].completion_tokens == again[0].completion_tokens
    assert first[0].completion_tokens > 1
    other = {generate(model, prompt, dataclasses.replace(seeded, seed=s))[1] for s in range(4)}
    assert len(other) > 1  # sampled, not greedy
    batch = model.batch_decoder()
    assert batch is not None and batch.steps > 0


def test_a_request_alone_decodes_in_the_batch(
    cases: list[tuple[str, str]], alone: ChatModel, batched: ChatModel
) -> None:
    prompt = batched.encode(cases[0][0])
    result, text = generate(batched, prompt)
    assert text == TOOL_CALL == generate(alone, prompt)[1] and result.finish_reason == "stop"
    batch = batched.batch_decoder()
    assert batch is not None and batch.steps > 0 and batch.peak_batch == 1


def test_conversations_start_from_one_cached_prefix_at_once(
    cases: list[tuple[str, str]], alone: ChatModel, batched: ChatModel
) -> None:
    """The household prompt's keys and values are cached once and read by every
    conversation that starts with it, at the same time too (nothing is taken out)."""
    household = [batched.encode(cases[i][0]) for i in (0, 1, 2)]
    first, _ = generate(batched, household[0])
    assert first.cached_tokens == 0
    fed = batched.prefilled_tokens
    out = in_threads(batched, [(prompt, GREEDY) for prompt in household[1:]])
    batch = batched.batch_decoder()
    assert batch is not None and batch.peak_batch == 2
    for prompt, (result, text) in zip(household[1:], out, strict=True):
        shared = common_prefix(household[0], prompt)
        assert shared > len(prompt) // 2  # the household prompt
        assert shared <= result.cached_tokens < len(prompt)
        assert text == generate(alone, prompt)[1]
    assert batched.prefilled_tokens - fed == sum(
        len(prompt) - result.cached_tokens
        for prompt, (result, _) in zip(household[1:], out, strict=True)
    )


def test_the_next_turn_starts_after_the_answer(
    cases: list[tuple[str, str]], alone: ChatModel, batched: ChatModel
) -> None:
    """The cache keeps the answer's keys and values too (copied out of the batch's
    slot when it ends): the next turn prefills only what follows the answer."""
    text, answer = cases[2]  # "hello"
    prompt = batched.encode(text)
    result, got = generate(batched, prompt)
    assert got == answer == HELLO
    cache = batched.cache
    assert cache is not None
    [entry] = cache.entries()
    assert entry.tokens[: len(prompt)] == prompt
    assert len(entry.tokens) == len(prompt) + result.completion_tokens - 1  # not the last
    # Room for later turns, as a generator has (held, whatever it holds).
    assert entry.nbytes == entry.max_length * batched.kv_bytes_per_token
    assert entry.kv is not None and entry.kv[0].shape[2] == entry.max_length > len(entry.tokens)
    following = batched.encode(
        text + got + "<|im_end|>\n<|im_start|>user\nthank you<|im_end|>\n<|im_start|>assistant\n"
    )
    array = entry.kv[0]
    reused = common_prefix(entry.tokens, following)
    assert reused > len(prompt) + 1  # into the answer
    again, got_again = generate(batched, following)
    assert again.cached_tokens == reused
    assert got_again == generate(alone, following)[1]
    # Its own conversation's next turn took the entry out and wrote after its tokens
    # (nothing copied), and put it back longer.
    [after] = cache.entries()
    assert after is entry and after.kv is not None and after.kv[0] is array
    assert after.tokens[: len(following)] == following


def test_the_batch_buffer_counts_in_the_cache_budget(
    cases: list[tuple[str, str]], batched: ChatModel
) -> None:
    """The batch's KV buffer is held in the prompt cache's budget while it exists (it
    is freed when the batch is empty)."""
    cache, batch = batched.cache, batched.batch_decoder()
    assert cache is not None and batch is not None
    seen: list[tuple[int, int]] = []

    def on_text(_: str) -> None:
        if batch.steps > 0 and not seen:  # a token of the batch's: its buffer is held
            seen.append((cache.snapshot()["in_use_bytes"], batch.nbytes))

    assert generate(batched, batched.encode(cases[2][0]), on_text=on_text)[1] == HELLO
    [(in_use, held)] = seen
    assert held > 0 and in_use == held  # the prompt's own buffer is in the pool by then
    assert batch.nbytes == 0 and cache.snapshot()["in_use_bytes"] == 0
    [entry] = cache.entries()
    assert cache.snapshot()["peak_bytes"] >= held + entry.nbytes


def test_sampler_penalties_follow_onnxruntime_genai() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0, 1.0], np.float32)
    sampler = Sampler({"repetition_penalty": 2.0, "do_sample": False}, [0, 1, 1])
    scores = sampler.scores(logits)
    assert scores.tolist() == [1.0, -2.0, 0.5, 3.0, 1.0]  # positive / 2, negative * 2
    # No-repeat n-grams: after "3 4" came 0 once; "3 4" again bans 0 (and 4 after "4 3").
    ngram = Sampler({"no_repeat_ngram_size": 3, "do_sample": False}, [3, 4, 0, 4, 3, 4])
    scores = ngram.scores(np.zeros(5, np.float32))
    assert scores[0] < -1e30 and (scores[1:] == 0).all()
    assert ngram.pick(np.array([9.0, 1, 1, 1, 1], np.float32)) == 1
    # Out-of-vocabulary ids in the history (a tokenizer larger than the model) are skipped.
    assert Sampler({"repetition_penalty": 1.5}, [7, 9]).scores(logits).tolist() == logits.tolist()


def test_sampler_draws_within_top_k_and_top_p() -> None:
    logits = np.array([0.0, 5.0, 4.9, -3.0, 4.8, 1.0], np.float32)
    top_k = Sampler({"do_sample": True, "temperature": 1.0, "top_k": 2, "random_seed": 1}, [])
    assert {top_k.pick(logits) for _ in range(200)} == {1, 2}
    top_p = Sampler({"do_sample": True, "temperature": 1.0, "top_p": 0.3, "random_seed": 1}, [])
    assert {top_p.pick(logits) for _ in range(50)} == {1}  # the nucleus is the top token
    hot = Sampler({"do_sample": True, "temperature": 1.0, "top_k": 0, "random_seed": 3}, [])
    assert {hot.pick(logits) for _ in range(400)} >= {1, 2, 4}
    greedy = Sampler({"do_sample": True, "temperature": 1.0, "top_k": 1}, [])
    assert greedy.greedy and greedy.pick(logits) == 1


def test_sampler_picks_only_what_the_grammar_allows() -> None:
    logits = np.array([0.0, 5.0, 4.9, -3.0, 4.8, -2.5], np.float32)
    allowed = np.array([False, False, False, True, False, True])
    assert Sampler({}, []).pick(logits, allowed) == 5
    greedy = Sampler({"repetition_penalty": 1.5}, [5])
    assert greedy.pick(logits) == 1 and greedy.pick(logits, allowed) == 3  # 5 penalized
    hot = Sampler({"do_sample": True, "temperature": 1.0, "random_seed": 3}, [])
    assert {hot.pick(logits, allowed) for _ in range(200)} == {3, 5}


def test_exports_the_batch_cannot_run_keep_their_generators(tmp_path: Path) -> None:
    config = {
        "model": {"decoder": {"filename": "model.onnx", "num_hidden_layers": 1, "head_size": 8}},
        "search": {"past_present_share_buffer": False},
    }
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    assert not BatchDecoder.supports(tmp_path)
    config["search"] = {"past_present_share_buffer": True}
    config["model"]["decoder"]["inputs"] = {"input_ids": "x", "position_ids": "p"}  # type: ignore[index]
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    assert not BatchDecoder.supports(tmp_path)
    assert not BatchDecoder.supports(tmp_path / "missing")


def test_turns_are_taken_in_the_order_asked() -> None:
    lock = TurnLock()
    order: list[int] = []

    def take(i: int) -> None:
        with lock:
            order.append(i)

    lock.acquire()
    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for i, thread in enumerate(threads, 1):
        thread.start()
        wait_for(lambda: lock.waiting() == i)  # noqa: B023
    lock.release()
    for thread in threads:
        thread.join(WAIT_S)
    assert order == [0, 1, 2, 3]
    assert lock.acquire(timeout=0)  # free again


def test_a_waiter_that_gives_up_leaves_the_line() -> None:
    lock = TurnLock()
    lock.acquire()
    assert not lock.acquire(timeout=0.01)
    assert lock.waiting() == 0
    got = threading.Event()
    thread = threading.Thread(target=lambda: lock.acquire() and got.set())
    thread.start()
    wait_for(lambda: lock.waiting() == 1)
    lock.release()  # to the one still waiting, not the one that gave up
    thread.join(WAIT_S)
    assert got.is_set() and lock.waiting() == 0
    lock.release()
    assert lock.acquire(timeout=0)


def test_the_prefill_and_the_batch_run_in_the_models_turns(
    cases: list[tuple[str, str]], batched: ChatModel
) -> None:
    """A request's prefill (its first token) and its batch steps each wait while
    another of the model's runs holds the turn."""
    prompt = batched.encode(cases[2][0])
    pieces: list[str] = []
    first, held = threading.Event(), threading.Event()

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 1:  # the prefill's token: hold before the batch steps
            first.set()
            held.wait(WAIT_S)

    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(generate(batched, prompt, on_text=on_text)))
    with batched.turns:
        thread.start()
        wait_for(lambda: batched.turns.waiting() == 1)  # the prefill waits
        assert not pieces
    assert first.wait(WAIT_S)
    with batched.turns:
        held.set()
        wait_for(lambda: batched.turns.waiting() == 1)  # the batch's step waits
        assert len(pieces) == 1
    thread.join(WAIT_S)
    assert out[0][1] == HELLO
    batch = batched.batch_decoder()
    assert batch is not None and batch.steps > 0
