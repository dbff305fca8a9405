"""scripts/bench/bench_worker.py: its API requests reach the model, not the prompt cache.

A benchmark that sends one prompt again and again measures the worker's prompt cache
(a repeated prompt is not prefilled again), not the model's time to first token. The
bench makes every request's first user message unique; the assertions are on the
token counts the worker reports (usage.prompt_tokens_details.cached_tokens).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import aiohttp
import model_fixtures
from test_api import model_id
from worker_process import WorkerProcess

from addon.hearth_worker.chat_engine import ChatModel
from addon.hearth_worker.manifest import load_manifest
from addon.hearth_worker.prompt_cache import common_prefix

BENCH_PY = model_fixtures.REPO / "scripts" / "bench" / "bench_worker.py"


def bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("hearth_bench_worker", BENCH_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_prefix_bound(model_dir: Path) -> int:
    """The most a bench request can share with another: the tokens the chat template
    puts before the user's text (its system prompt), and the marker's "Request "."""
    chat = ChatModel(load_manifest(model_dir))
    x, y = ({"role": "user", "content": text} for text in ("X", "Y"))
    opening = common_prefix(
        chat.encode(chat.render([x], None)), chat.encode(chat.render([y], None))
    )
    return opening + len(chat.encode("Request "))


async def cached_tokens(worker: WorkerProcess, body: dict[str, Any]) -> tuple[int, int]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=worker.ssl)) as http,
        http.post(
            worker.url + "/v1/chat/completions",
            json={**body, "stream": False},
            headers=worker.headers,
        ) as response,
    ):
        assert response.status == 200, await response.text()
        usage = json.loads(await response.text())["usage"]
    return int(usage["prompt_tokens"]), int(usage["prompt_tokens_details"]["cached_tokens"])


async def test_bench_requests_are_prefilled(shared_worker: WorkerProcess) -> None:
    bench = bench_module()
    words = " ".join(bench.PROMPT_WORDS * 4)
    body = {
        "model": model_id(model_fixtures.tiny_chat_model()),
        "messages": [{"role": "user", "content": f"Benchmark check. {words}"}],
        "max_tokens": 2,
        "temperature": 0,
    }
    # The cache is on: the same prompt again is taken from it almost whole.
    await cached_tokens(shared_worker, body)
    prompt, cached = await cached_tokens(shared_worker, body)
    assert cached > prompt // 2, (prompt, cached)
    # The bench's requests: each one prefilled (at most the template's opening reused).
    first = bench.uncached(body)
    second = bench.uncached(body)
    assert first["messages"] != second["messages"]
    assert body["messages"][0]["content"].startswith("Benchmark check.")  # left as it was
    bound = bench_prefix_bound(model_fixtures.tiny_chat_model())  # 19 of 157 tokens here
    for request in (first, second):
        prompt, cached = await cached_tokens(shared_worker, request)
        assert cached <= bound, (prompt, cached, bound)
        assert prompt > 4 * bound
