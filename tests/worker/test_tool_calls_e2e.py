"""Tool calls in OpenAI's format, end to end through a worker serving a taught model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from worker_process import WorkerProcess, start_worker

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on a device or entity",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "area": {"type": "string"}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "HassTurnOff",
            "description": "Turns off a device or entity",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
        },
    },
]
SYSTEM = {"role": "system", "content": "You are a voice assistant for a home."}
ASK = {"role": "user", "content": "turn on the kitchen light"}


@pytest.fixture(scope="module")
def taught_worker(
    taught_chat_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    worker = start_worker([taught_chat_model], tmp_path_factory.mktemp("taught"))
    yield worker
    assert worker.stop() == 0, worker.log()


def _body(taught_chat_model: Path, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    name = json.loads((taught_chat_model / "hearth-model.json").read_text())["name"]
    return {"model": name, "messages": messages, "tools": TOOLS, "max_tokens": 64, **extra}


async def test_tool_call_non_streaming(
    http: aiohttp.ClientSession, taught_worker: WorkerProcess, taught_chat_model: Path
) -> None:
    async with http.post(
        taught_worker.url + "/v1/chat/completions",
        json=_body(taught_chat_model, [SYSTEM, ASK]),
        headers=taught_worker.headers,
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "HassTurnOn"
    assert json.loads(call["function"]["arguments"]) == {"name": "kitchen light"}


async def test_tool_call_streaming_then_tool_result(
    http: aiohttp.ClientSession, taught_worker: WorkerProcess, taught_chat_model: Path
) -> None:
    async with http.post(
        taught_worker.url + "/v1/chat/completions",
        json=_body(taught_chat_model, [SYSTEM, ASK], stream=True),
        headers=taught_worker.headers,
    ) as resp:
        events = [
            json.loads(line[6:])
            for line in (await resp.text()).split("\n\n")
            if line.startswith("data: {")
        ]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert "<tool_call>" not in text, "the raw tool call must not leak as content"
    calls = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["HassTurnOn"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

    # The tool's result goes back; the model answers in words.
    history = [
        SYSTEM,
        ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{k: v for k, v in calls[0].items() if k != "index"}],
        },
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": json.dumps({"success": True})},
    ]
    async with http.post(
        taught_worker.url + "/v1/chat/completions",
        json=_body(taught_chat_model, history),
        headers=taught_worker.headers,
    ) as resp:
        body = await resp.json()
    assert resp.status == 200, body
    assert body["choices"][0]["message"]["content"] == "The kitchen light is on."
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_plain_answer_streams_with_tools_offered(
    http: aiohttp.ClientSession, taught_worker: WorkerProcess, taught_chat_model: Path
) -> None:
    async with http.post(
        taught_worker.url + "/v1/chat/completions",
        json=_body(taught_chat_model, [SYSTEM, {"role": "user", "content": "hello"}]),
        headers=taught_worker.headers,
    ) as resp:
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "Hello from Hearth!"
    assert "tool_calls" not in body["choices"][0]["message"]
    # tool_choice "none" hides the tools from the model entirely.
    async with http.post(
        taught_worker.url + "/v1/chat/completions",
        json=_body(taught_chat_model, [SYSTEM, ASK], tool_choice="none"),
        headers=taught_worker.headers,
    ) as resp:
        body = await resp.json()
    assert "tool_calls" not in body["choices"][0]["message"]
