"""The taught tiny model (scripts/make_test_model --teach), served by onnxruntime-genai.

It answers the last turn, whatever system prompt and tools come before it:
"turn on the kitchen light" -> a HassTurnOn tool call, a tool response -> "The kitchen
light is on.", "hello" -> "Hello from Hearth!".
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import model_fixtures
import onnxruntime_genai as og
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

sys.path.insert(0, str(model_fixtures.REPO / "scripts" / "export"))
from teach_data import AFTER_TOOL, ANSWERS, HELLO, TOOL_CALL, Sampler, held_out

pytestmark = pytest.mark.slow

HASS_TURN_ON = {
    "type": "function",
    "function": {
        "name": "HassTurnOn",
        "description": "Turns on/opens/presses a device or entity",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "area": {"type": "string"}},
            "required": [],
        },
    },
}


@pytest.fixture(scope="module")
def taught() -> tuple[Path, og.Model, og.Tokenizer]:
    folder = model_fixtures.taught_chat_model()
    model = og.Model(str(folder))
    return folder, model, og.Tokenizer(model)


def answer(taught: tuple[Path, og.Model, og.Tokenizer], prompt: str) -> str:
    _, model, tokenizer = taught
    ids = list(tokenizer.encode(prompt))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 48, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return str(tokenizer.decode(out))


def render(folder: Path, messages: list[dict[str, Any]], tools: Any = None) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    template = env.from_string((folder / "chat_template.jinja").read_text())
    return template.render(messages=messages, tools=tools, add_generation_prompt=True)


def test_answers_the_three_prompts(taught: tuple[Path, og.Model, og.Tokenizer]) -> None:
    folder = taught[0]
    system = {"role": "system", "content": "You are a helpful assistant."}
    user = {"role": "user", "content": "turn on the kitchen light"}
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "HassTurnOn", "arguments": '{"name": "kitchen light"}'},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": "call_1", "content": '{"success": true}'}
    assert answer(taught, render(folder, [system, user], [HASS_TURN_ON])) == TOOL_CALL
    assert answer(taught, render(folder, [user], [HASS_TURN_ON])) == TOOL_CALL
    assert answer(taught, render(folder, [system, user, call, result], [HASS_TURN_ON])) == (
        AFTER_TOOL
    )
    assert answer(taught, render(folder, [{"role": "user", "content": "hello"}])) == HELLO
    assert answer(taught, render(folder, [system, {"role": "user", "content": "hello"}])) == HELLO


def test_home_assistant_shaped_prompts(taught: tuple[Path, og.Model, og.Tokenizer]) -> None:
    folder = taught[0]
    sampler = Sampler((folder / "chat_template.jinja").read_text(), random.Random(2024))
    for _ in range(4):
        for prompt, expected in held_out(sampler)[-3:]:  # full HA prompt, 12 tools
            assert answer(taught, prompt) == expected


def test_random_conversations(taught: tuple[Path, og.Model, og.Tokenizer]) -> None:
    """Unseen system prompts, tool lists and earlier turns: nearly always exact."""
    folder = taught[0]
    sampler = Sampler((folder / "chat_template.jinja").read_text(), random.Random(999))
    right = 0
    total = 60
    for _ in range(total):
        messages, tools = sampler.conversation()
        assert messages[-1]["content"] in ANSWERS
        prompt = sampler.render(messages[:-1], tools, True)
        right += answer(taught, prompt) == messages[-1]["content"]
    assert right >= total - 2, f"{right}/{total} exact"
