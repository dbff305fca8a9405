"""Sampling defaults come from the model folder; a request's own values win.

A model's generation_config.json (or the search section of its genai_config.json)
says how it likes to be sampled; where it says nothing of repetition, Hearth's
repetition penalty applies, so that greedy answers of small models end instead of
looping. A request that asks for temperature 0 stays greedy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import model_fixtures
import pytest
from hearth_worker.manifest import (
    DEFAULT_REPETITION_PENALTY,
    GenerationDefaults,
    read_generation_defaults,
)
from test_api import check_schema, model_id
from worker_process import WorkerProcess, start_worker

# What onnxruntime-genai's builder writes when the model's generation_config says nothing.
BUILDER_SEARCH = {
    "do_sample": False,
    "max_length": 4096,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}


def _folder(tmp_path: Path, generation: dict[str, Any] | None, search: dict[str, Any]) -> Path:
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {}, "search": search}))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_a_model_that_says_nothing_is_greedy_with_repetition_control(tmp_path: Path) -> None:
    """SmolLM2's generation_config names only its tokens; the builder's search defaults
    are not the model's word either."""
    smollm2 = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    for generation in (smollm2, None):
        defaults = read_generation_defaults(_folder(tmp_path, generation, BUILDER_SEARCH))
        assert defaults.temperature == 0.0
        assert defaults.repetition_penalty == DEFAULT_REPETITION_PENALTY > 1.0
        assert defaults.repetition_source == "hearth"
        (tmp_path / "generation_config.json").unlink(missing_ok=True)
    assert read_generation_defaults(tmp_path / "absent") == GenerationDefaults()


def test_generation_config_values_are_used(tmp_path: Path) -> None:
    generation = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
    defaults = read_generation_defaults(_folder(tmp_path, generation, BUILDER_SEARCH))
    assert (defaults.temperature, defaults.top_p) == (0.6, 0.95)
    assert defaults.top_k == 50, "transformers' default where generation_config has none"
    assert defaults.source == "generation_config.json"
    assert defaults.repetition_penalty == DEFAULT_REPETITION_PENALTY, "the model said nothing"
    # The model's word on repetition, even "none", wins over Hearth's.
    for said, penalty in (({"repetition_penalty": 1.3}, 1.3), ({"repetition_penalty": 1.0}, 1.0)):
        defaults = read_generation_defaults(_folder(tmp_path, said, BUILDER_SEARCH))
        assert defaults.repetition_penalty == penalty
        assert defaults.repetition_source == "generation_config.json"
        assert defaults.temperature == 0.0, "do_sample unset: greedy, as transformers"
    defaults = read_generation_defaults(_folder(tmp_path, {"no_repeat_ngram_size": 3}, {}))
    assert (defaults.no_repeat_ngram_size, defaults.repetition_penalty) == (3, 1.0)
    # Nonsense is ignored, not trusted.
    odd = {"do_sample": True, "temperature": "hot", "top_p": 7, "repetition_penalty": -1}
    defaults = read_generation_defaults(_folder(tmp_path, odd, BUILDER_SEARCH))
    assert (defaults.temperature, defaults.top_p, defaults.repetition_penalty) == (1.0, 1.0, 1.0)


def test_genai_config_search_values_other_than_the_builders_are_used(tmp_path: Path) -> None:
    search = BUILDER_SEARCH | {"do_sample": True, "temperature": 0.7, "repetition_penalty": 1.2}
    defaults = read_generation_defaults(_folder(tmp_path, None, search))
    assert (defaults.temperature, defaults.top_k, defaults.repetition_penalty) == (0.7, 50, 1.2)
    assert defaults.source == defaults.repetition_source == "genai_config.json"


def test_request_values_win_and_temperature_zero_is_greedy() -> None:
    sampled = GenerationDefaults(temperature=0.8, top_p=0.9, top_k=40, source="x")
    options = sampled.search_options(seed=7)
    assert options == {
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 40,
        "random_seed": 7,
        "repetition_penalty": DEFAULT_REPETITION_PENALTY,
        "no_repeat_ngram_size": 0,
    }
    options = sampled.search_options(temperature=0.0, seed=7, repetition_penalty=1.0)
    assert options == {"do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    options = sampled.search_options(temperature=1.2, top_p=0.5, top_k=0, no_repeat_ngram_size=4)
    assert (options["temperature"], options["top_p"], options["top_k"]) == (1.2, 0.5, 0)
    assert options["no_repeat_ngram_size"] == 4 and "random_seed" not in options
    assert GenerationDefaults().search_options()["do_sample"] is False
    # A top_k of the vocabulary or more cuts nothing (onnxruntime-genai would refuse it).
    small = GenerationDefaults(temperature=1.0, vocab_size=100)
    assert small.search_options(top_k=100)["top_k"] == 0
    assert small.search_options(top_k=99)["top_k"] == 99


# --------------------------------------------------------------------------- #
# Through a worker


@pytest.fixture(scope="module")
def sampling_model(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a generation_config.json that samples hot."""
    copy = tmp_path_factory.mktemp("sampling") / tiny_chat_model.name
    shutil.copytree(tiny_chat_model, copy)
    generation = {"do_sample": True, "temperature": 1.5, "top_p": 1.0, "top_k": 0}
    (copy / "generation_config.json").write_text(json.dumps(generation))
    return copy


@pytest.fixture(scope="module")
def sampling_worker(
    sampling_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    worker = start_worker([sampling_model], tmp_path_factory.mktemp("sampling-worker"))
    yield worker
    assert worker.stop() == 0, worker.log()


async def _answer(
    http: aiohttp.ClientSession, worker: WorkerProcess, model: Path, **extra: Any
) -> str:
    body = {"model": model_id(model), "messages": [{"role": "user", "content": "hello"}]}
    async with http.post(
        worker.url + "/v1/chat/completions",
        json=body | {"max_tokens": 24} | extra,
        headers=worker.headers,
    ) as resp:
        answer = await resp.json()
    assert resp.status == 200, answer
    return str(answer["choices"][0]["message"]["content"])


async def test_info_shows_the_defaults(
    http: aiohttp.ClientSession, sampling_worker: WorkerProcess, shared_worker: WorkerProcess
) -> None:
    async with http.get(sampling_worker.url + "/v1/info", headers=sampling_worker.headers) as resp:
        info = await resp.json()
    check_schema(info, "Info")
    defaults = info["models"][0]["sampling_defaults"]
    assert defaults["temperature"] == 1.5 and defaults["source"] == "generation_config.json"
    assert defaults["repetition_penalty"] == DEFAULT_REPETITION_PENALTY
    async with http.get(shared_worker.url + "/v1/info", headers=shared_worker.headers) as resp:
        info = await resp.json()
    (chat,) = [m for m in info["models"] if m["kind"] == "chat"]
    assert chat["sampling_defaults"]["temperature"] == 0.0
    assert "sampling_defaults" not in next(m for m in info["models"] if m["kind"] != "chat")


async def test_the_models_default_samples_and_temperature_zero_stays_greedy(
    http: aiohttp.ClientSession,
    sampling_worker: WorkerProcess,
    sampling_model: Path,
    shared_worker: WorkerProcess,
    tiny_chat_model: Path,
) -> None:
    """No temperature in the request: the model's 1.5 (seeded draws differ, and repeat);
    temperature 0: greedy, the same answer as the model without a generation_config."""
    first = await _answer(http, sampling_worker, sampling_model, seed=1)
    assert await _answer(http, sampling_worker, sampling_model, seed=1) == first
    draws = {await _answer(http, sampling_worker, sampling_model, seed=s) for s in range(2, 5)}
    assert len(draws | {first}) > 1, "the model's default temperature samples"
    greedy = await _answer(http, sampling_worker, sampling_model, temperature=0, seed=1)
    assert greedy == await _answer(http, shared_worker, tiny_chat_model, temperature=0)
    assert greedy == await _answer(http, shared_worker, tiny_chat_model)


async def test_repetition_penalty_default_and_request_value(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    """The default is Hearth's penalty; a request's own value is taken (and checked)."""
    default = await _answer(http, shared_worker, tiny_chat_model, temperature=0)
    explicit = await _answer(
        http,
        shared_worker,
        tiny_chat_model,
        temperature=0,
        repetition_penalty=DEFAULT_REPETITION_PENALTY,
    )
    assert default == explicit
    await _answer(http, shared_worker, tiny_chat_model, repetition_penalty=1.0, top_k=5)
    # Beyond the tiny model's vocabulary: no cut, not an error.
    await _answer(http, shared_worker, tiny_chat_model, temperature=1.0, top_k=10**6)
    async with http.post(
        shared_worker.url + "/v1/chat/completions",
        json={
            "model": model_id(tiny_chat_model),
            "messages": [{"role": "user", "content": "hi"}],
            "repetition_penalty": 0,
        },
        headers=shared_worker.headers,
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "repetition_penalty"


@pytest.mark.slow
async def test_the_real_model_no_longer_loops_on_a_simple_question(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """SmolLM2-135M, greedy (as Hearth asks, temperature 0): without repetition control
    "What is the capital of France?" ran to the token limit; with the default it ends."""
    model = model_fixtures.real_chat_model()
    worker = start_worker([model], tmp_path)
    body = {
        "model": model_id(model),
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 96,
    }
    try:
        async with http.post(
            worker.url + "/v1/chat/completions", json=body, headers=worker.headers
        ) as resp:
            answer = await resp.json()
        print(answer["choices"][0])
        assert answer["choices"][0]["finish_reason"] == "stop", answer
        assert "Paris" in answer["choices"][0]["message"]["content"]
    finally:
        assert worker.stop() == 0, worker.log()
