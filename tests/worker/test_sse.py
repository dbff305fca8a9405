"""The chat stream's server-sent events: whole JSON documents, in the bytes clients expect."""

from __future__ import annotations

import json

import pytest
from hearth_worker.server import SSE_DONE, chunk_event, sse_event

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": 'm"1'}

TRICKY = [
    "",
    'say "hi"',
    "two\nlines\n\n",
    "data: [DONE]",
    '}]}, "finish_reason": "stop"',
    "Küche 🔥 \u2028 \\",
    "\x00\x1f",
]


def parse(event: bytes) -> object:
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    body = event[len(b"data: ") : -2]
    assert b"\n" not in body  # one line: a newline in the text cannot end the event early
    return json.loads(body)


@pytest.mark.parametrize("text", TRICKY)
def test_content_chunk_parses_back(text: str) -> None:
    event = chunk_event(HEAD, {"content": text})
    assert parse(event) == {
        **HEAD,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }


def test_chunk_bytes_are_unchanged() -> None:
    """The layout the worker has always sent (json.dumps' separators, this key order)."""
    assert chunk_event(HEAD, {"role": "assistant", "content": ""}) == (
        b'data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, '
        b'"model": "m\\"1", "choices": [{"index": 0, "delta": {"role": "assistant", '
        b'"content": ""}, "finish_reason": null}]}\n\n'
    )
    assert chunk_event(HEAD, {}, "stop") == (
        b'data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, '
        b'"model": "m\\"1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'
        b"\n\n"
    )
    assert chunk_event(HEAD, {"content": "Küche\n"}).endswith(
        b'"delta": {"content": "K\\u00fcche\\n"}, "finish_reason": null}]}\n\n'
    )


def test_tool_call_and_usage_events() -> None:
    arguments = json.dumps({"name": 'a "b"'})
    calls = [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "HassTurnOn", "arguments": arguments},
        }
    ]
    event = parse(chunk_event(HEAD, {"tool_calls": calls}))
    assert isinstance(event, dict)
    assert event["choices"][0]["delta"]["tool_calls"] == calls
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert parse(sse_event({**HEAD, "choices": [], "usage": usage})) == {
        **HEAD,
        "choices": [],
        "usage": usage,
    }
    assert SSE_DONE == b"data: [DONE]\n\n"
