"""scripts/develop serves the real SmolLM2-135M-Instruct beside the demo model: the demo
model answers by default (the README's walkthrough), the real one once it is Hearth's
"Preferred chat model"."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import model_fixtures
import pytest
from worker_process import free_port

from scripts import develop

from .home_assistant import HomeAssistant

pytestmark = pytest.mark.slow


def test_develop_serves_the_demo_model_then_the_real_one() -> None:
    models = develop.default_models()
    assert models == [model_fixtures.taught_chat_model(), model_fixtures.real_chat_model()]
    names = [json.loads((m / "hearth-model.json").read_text())["name"] for m in models]
    assert names == ["taught-chat", develop.REAL_MODEL_NAME]
    assert develop.default_models(with_real=False) == [model_fixtures.taught_chat_model()]


@pytest.fixture
def real_stack(tmp_path: Path) -> Iterator[develop.Stack]:
    with develop.running(
        tmp_path / "develop",
        develop.default_models(),
        http_port=free_port(),
        worker_port=free_port(),
    ) as started:
        yield started


async def test_demo_model_by_default_real_model_when_preferred(real_stack: develop.Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ha = HomeAssistant(http, real_stack.ha_url)
        await ha.onboard()
        async with ha.websocket():
            flow = await ha.discovered_flow("hearth", real_stack.node_id)
            entry = await ha.pair(flow["flow_id"], real_stack.pairing_code)
        assert entry["state"] == "loaded"
        options = {"max_tokens": 24, "temperature": 0}

        async def ask(prompt: str) -> str:
            ran = await ha.rest(
                "POST",
                "/api/services/hearth/ask?return_response",
                {"prompt": prompt},
            )
            response = ran["service_response"]
            assert response["worker"] == develop.WORKER_NAME
            return str(response["answer"])

        await ha.set_options(entry["entry_id"], **options)
        assert await ask("hello") == "Hello from Hearth!"  # the demo model, by default

        await ha.set_options(entry["entry_id"], **options, chat_model=develop.REAL_MODEL_NAME)
        answer = await ask("What is the capital of France?")
        assert "Paris" in answer, answer
