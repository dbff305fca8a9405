"""Per-request cost of reading and validating a chat request, as Assist sends it.

The body: voice_prompt.py's household prompt (46 entities), its 12 intent tools,
a 3-turn conversation with a tool call and its result, streaming. Each row is the
best of REPEATS rounds (over all rows in turn) of NUMBER calls, in microseconds per request:

* ``parse_json_object``: json.loads with the limits every body has (nesting, NaN,
  lone surrogates): the same whatever validates after it;
* ``parse_chat_request``: validation with api_types' pydantic models, into the
  ChatRequest the server uses; ``model_validate`` the pydantic part of it;
* with ``--hand REV``: the hand-written validation.py of git revision REV (before
  api_types.py: 59a3037), the same body;
* where msgspec is importable (it is not a dependency): msgspec.convert into
  Structs of the same shape, and with the tool-size check (json.dumps per tool).

    .venv/bin/python scripts/bench/bench_validation.py [--hand 59a3037] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from hearth_worker import api_types, validation

sys.path.insert(0, str(Path(__file__).resolve().parent))
import voice_prompt

ROOT = Path(__file__).resolve().parents[2]
NUMBER = 500
REPEATS = 9


def body() -> dict[str, Any]:
    messages = voice_prompt.messages(0, 3)
    messages[1:1] = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "HassTurnOn",
                        "arguments": '{"name": "Kitchen light", "domain": ["light"]}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"success": true}'},
    ]
    return {
        "model": "household-chat",
        "messages": messages,
        "tools": voice_prompt.tools(),
        "tool_choice": "auto",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 256,
        "temperature": 0.3,
    }


def _hand_validation(rev: str) -> Any:
    """validation.py as it was at `rev` (read from this repository's git)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:addon/hearth_worker/validation.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    path = folder / "hand_validation.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("hand_validation", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["hand_validation"] = module
    spec.loader.exec_module(module)
    return module


try:
    import msgspec
except ImportError:  # not a dependency: its rows are left out
    msgspec = None

if msgspec is not None:

    class TextPart(msgspec.Struct):
        type: Literal["text"]
        text: str

    class Fn(msgspec.Struct):
        name: str
        arguments: str | dict[str, Any] = "{}"

    class Call(msgspec.Struct):
        function: Fn
        id: str = ""
        type: Literal["function"] = "function"

    class Message(msgspec.Struct):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart] | None = None
        name: str | None = None
        tool_call_id: str | None = None
        tool_calls: list[Call] | None = None

    class ToolFn(msgspec.Struct):
        name: str
        description: str | None = None
        parameters: dict[str, Any] = {}  # noqa: RUF012 - msgspec copies it

    class Tool(msgspec.Struct):
        function: ToolFn
        type: Literal["function"] = "function"

    class StreamOptions(msgspec.Struct):
        include_usage: bool | None = None

    Tokens = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]

    class Request(msgspec.Struct):
        model: Annotated[str, msgspec.Meta(min_length=1)]
        messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        max_tokens: Tokens | None = None
        max_completion_tokens: Tokens | None = None
        temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
        top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
        stop: str | list[str] | None = None
        seed: int | None = None
        tools: list[Tool] | None = None
        tool_choice: str | dict[str, Any] | None = None


def _msgspec_rows(data: dict[str, Any]) -> dict[str, Callable[[], object]]:
    if msgspec is None:
        return {}

    def with_sizes() -> object:
        request = msgspec.convert(data, Request)
        for tool in request.tools or []:
            entry = {"name": tool.function.name, "parameters": tool.function.parameters}
            if tool.function.description:
                entry["description"] = tool.function.description
            api_types.json_size(entry)
        return request

    return {
        f"msgspec {msgspec.__version__}: convert": lambda: msgspec.convert(data, Request),
        f"msgspec {msgspec.__version__}: convert + tool sizes": with_sizes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hand", metavar="REV", help="also time validation.py of git REV")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    raw = json.dumps(body()).encode()
    data = validation.parse_json_object(raw)
    model = api_types.ChatCompletionRequest
    rows: dict[str, Callable[[], object]] = {
        "parse_json_object": lambda: validation.parse_json_object(raw),
        f"parse_chat_request (pydantic {pydantic.VERSION})": lambda: validation.parse_chat_request(
            data
        ),
        "  of which model_validate": lambda: model.model_validate(data),
    }
    if args.hand:
        hand = _hand_validation(args.hand)
        ours = dataclasses.astuple(validation.parse_chat_request(data))
        assert dataclasses.astuple(hand.parse_chat_request(data)) == ours, "not the same result"
        rows[f"hand-written validation.py ({args.hand})"] = lambda: hand.parse_chat_request(data)
    rows.update(_msgspec_rows(data))
    # Rounds over all rows, the best of each kept: a busy machine slows them alike.
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(REPEATS):
        for name, call in rows.items():
            best[name] = min(best[name], timeit.timeit(call, number=NUMBER))
    result = {name: seconds / NUMBER * 1e6 for name, seconds in best.items()}
    if args.json:
        print(json.dumps({"body_bytes": len(raw), "us_per_request": result}, indent=2))
        return 0
    tools = len(data["tools"])
    print(f"body {len(raw)} bytes, {tools} tools, {len(data['messages'])} messages")
    for name, micros in result.items():
        print(f"{name:48s} {micros:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
