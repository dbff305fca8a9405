"""Constrained decoding: tool calls that always parse, answers that fit a schema.

The tiny test model is random: it writes nonsense, so these tests assert what the
grammar guarantees, never what the model says. Whatever it writes with tools
offered is either plain text or tool calls whose arguments validate against their
tool's schema; "required" and a named tool force a call; response_format gives
JSON valid against its schema; an answer cut by the token limit says so and
carries no broken call. Sampled with several seeds and prompts, so that the
model takes different paths through the grammar.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from hearth_worker.chat_template import ChatTemplate
from hearth_worker.guidance import (
    GUIDANCE_ENV,
    HERMES,
    LLAMA3,
    MISTRAL,
    build_guide,
    call_schema,
    detect_format,
)
from test_api import check_schema, model_id
from worker_process import WorkerProcess, start_worker


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "description": f"{name} a device", "parameters": parameters},
    }


# Bounded strings and numbers: a random model stops a string only when it happens
# to pick the closing quote, so the schemas bound them (as real tools often do).
NAME = {"type": "string", "maxLength": 16}
TOOLS = [
    _tool(
        "HassTurnOn",
        {
            "type": "object",
            "properties": {"name": NAME, "area": {"type": "string", "enum": ["kitchen", "hall"]}},
            "required": ["name"],
            "additionalProperties": False,
        },
    ),
    _tool(
        "HassLightSet",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                "on": {"type": "boolean"},
            },
            "required": ["name", "brightness"],
            "additionalProperties": False,
        },
    ),
    _tool(
        "HassCancelAllTimers", {"type": "object", "properties": {}, "additionalProperties": False}
    ),
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
PROMPTS = [
    "turn on the kitchen light",
    "set the hall light to half",
    "cancel all my timers",
    "what is the weather like?",
]
SEEDS = range(3)
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "room": {"type": "string", "enum": ["kitchen", "hall", "attic"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "lit": {"type": "boolean"},
    },
    "required": ["room", "count", "lit"],
    "additionalProperties": False,
}


# --------------------------------------------------------------------------- #
# Through a worker


@pytest.fixture(scope="module")
def worker(
    tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    started = start_worker([tiny_chat_model], tmp_path_factory.mktemp("guided"))
    yield started
    assert started.stop() == 0, started.log()


async def _complete(
    http: aiohttp.ClientSession, worker: WorkerProcess, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        worker.url + "/v1/chat/completions", json=body, headers=worker.headers
    ) as resp:
        return resp.status, await resp.json()


async def _stream(
    http: aiohttp.ClientSession, worker: WorkerProcess, body: dict[str, Any]
) -> tuple[str, list[dict[str, Any]], str]:
    """Streamed content, tool calls and finish_reason."""
    async with http.post(
        worker.url + "/v1/chat/completions", json={**body, "stream": True}, headers=worker.headers
    ) as resp:
        assert resp.status == 200
        text = await resp.text()
    chunks = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    for chunk in chunks:
        check_schema(chunk, "ChatCompletionChunk")
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    content = "".join(c["delta"].get("content") or "" for c in choices)
    calls = [call for c in choices for call in c["delta"].get("tool_calls", [])]
    return content, calls, choices[-1]["finish_reason"]


def _body(model: Path, prompt: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model_id(model),
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 64,
        **extra,
    }


def _assert_valid_calls(calls: list[dict[str, Any]], names: set[str] | None = None) -> None:
    for call in calls:
        name = call["function"]["name"]
        assert name in (names or SCHEMAS), call
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[name])


async def test_info_tells_guidance_and_the_call_format(
    http: aiohttp.ClientSession, worker: WorkerProcess
) -> None:
    async with http.get(worker.url + "/v1/info", headers=worker.headers) as resp:
        info = await resp.json()
    check_schema(info, "Info")
    (model,) = info["models"]
    assert model["guidance"] is True
    assert model["tool_call_format"] == "hermes"


async def test_with_tools_every_answer_is_text_or_valid_calls(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    kinds = set()
    for prompt in PROMPTS:
        for seed in SEEDS:
            status, body = await _complete(http, worker, _body(tiny_chat_model, prompt, seed))
            assert status == 200, body
            check_schema(body, "ChatCompletion")
            choice = body["choices"][0]
            message = choice["message"]
            calls = message.get("tool_calls") or []
            if calls:
                kinds.add("calls")
                assert choice["finish_reason"] == "tool_calls", choice
                assert message["content"] is None, "nothing of a call leaks into the text"
                _assert_valid_calls(calls)
            else:
                kinds.add("text")
                assert "<tool_call>" not in (message["content"] or ""), message
                assert choice["finish_reason"] in ("stop", "length")
    assert kinds, "no answers"


async def test_streamed_tool_calls_are_valid_too(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    for seed in SEEDS:
        body = _body(tiny_chat_model, PROMPTS[0], seed)
        content, calls, finish = await _stream(http, worker, body)
        status, whole = await _complete(http, worker, body)
        assert status == 200
        message = whole["choices"][0]["message"]
        assert content == (message["content"] or ""), "streamed text is the whole answer's"
        assert [c["function"] for c in calls] == [
            c["function"] for c in message.get("tool_calls") or []
        ]
        assert finish == whole["choices"][0]["finish_reason"]
        if calls:
            assert "<tool_call>" not in content
            _assert_valid_calls(calls)


async def test_tool_choice_required_forces_a_valid_call(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    for prompt in PROMPTS:
        for seed in SEEDS:
            body = _body(tiny_chat_model, prompt, seed, tool_choice="required", max_tokens=400)
            status, answer = await _complete(http, worker, body)
            assert status == 200, answer
            choice = answer["choices"][0]
            assert choice["finish_reason"] == "tool_calls", choice
            assert choice["message"]["tool_calls"], choice
            _assert_valid_calls(choice["message"]["tool_calls"])
    _, calls, finish = await _stream(
        http, worker, _body(tiny_chat_model, PROMPTS[3], 0, tool_choice="required", max_tokens=400)
    )
    assert finish == "tool_calls" and calls
    _assert_valid_calls(calls)


async def test_a_named_tool_is_the_one_called(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    for name in SCHEMAS:
        for seed in SEEDS:
            choice = {"type": "function", "function": {"name": name}}
            body = _body(tiny_chat_model, PROMPTS[0], seed, tool_choice=choice, max_tokens=400)
            status, answer = await _complete(http, worker, body)
            assert status == 200, answer
            calls = answer["choices"][0]["message"]["tool_calls"]
            assert calls and {c["function"]["name"] for c in calls} == {name}
            _assert_valid_calls(calls, {name})


async def test_calls_hold_only_the_arguments_a_tool_lists(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    """A schema that does not close its properties (as Home Assistant's intent tools):
    the model still writes only the listed ones, which the tool understands."""
    parameters = {"type": "object", "properties": {"area": {"type": "string", "enum": ["hall"]}}}
    tools = [_tool("HassTurnOn", parameters)]
    for seed in SEEDS:
        body = _body(tiny_chat_model, PROMPTS[0], seed, tools=tools, tool_choice="required")
        status, answer = await _complete(http, worker, body)
        assert status == 200, answer
        for call in answer["choices"][0]["message"]["tool_calls"]:
            assert set(json.loads(call["function"]["arguments"])) <= {"area"}, call


def test_call_schemas() -> None:
    parameters = {"type": "object", "properties": {"name": {"type": "string"}}}
    schema = call_schema(_tool("HassTurnOn", parameters))
    assert schema["properties"]["name"] == {"const": "HassTurnOn"}
    assert schema["properties"]["arguments"] == {**parameters, "additionalProperties": False}
    assert schema["required"] == ["name", "arguments"]
    open_ended = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert call_schema(_tool("X", open_ended), "parameters")["properties"]["parameters"] == (
        open_ended
    )
    assert call_schema(_tool("X", {}))["properties"]["arguments"]["type"] == "object"


async def test_a_named_tool_not_offered_is_refused(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    choice = {"type": "function", "function": {"name": "HassNotOffered"}}
    status, body = await _complete(
        http, worker, _body(tiny_chat_model, "hi", 0, tool_choice=choice)
    )
    assert status == 400
    assert (body["error"]["param"], body["error"]["code"]) == ("tool_choice", "tool_not_offered")


async def test_response_format_json_schema_gives_valid_json(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "lights", "schema": ANSWER_SCHEMA, "strict": True},
    }
    for prompt in PROMPTS:
        for seed in SEEDS:
            body = _body(tiny_chat_model, prompt, seed, response_format=response_format)
            del body["tools"]
            status, answer = await _complete(http, worker, body)
            assert status == 200, answer
            assert answer["choices"][0]["finish_reason"] == "stop"
            jsonschema.validate(
                json.loads(answer["choices"][0]["message"]["content"]), ANSWER_SCHEMA
            )
    content, _, finish = await _stream(http, worker, body)
    assert finish == "stop"
    jsonschema.validate(json.loads(content), ANSWER_SCHEMA)


async def test_response_format_json_object_gives_an_object(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    """Any object will do: the random model may nest deeply, so only whole answers count."""
    whole = 0
    for seed in range(6):
        body = _body(tiny_chat_model, "json please", seed, response_format={"type": "json_object"})
        body["tools"] = None
        status, answer = await _complete(http, worker, body)
        assert status == 200, answer
        if answer["choices"][0]["finish_reason"] == "stop":
            whole += 1
            assert isinstance(json.loads(answer["choices"][0]["message"]["content"]), dict)
        else:
            assert answer["choices"][0]["message"]["content"].startswith("{")
    assert whole, "no JSON object finished within the token limit"


async def test_response_format_with_tools_is_json_or_valid_calls(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": ANSWER_SCHEMA}}
    for prompt in PROMPTS[:2]:
        for seed in SEEDS:
            body = _body(tiny_chat_model, prompt, seed, response_format=response_format)
            status, answer = await _complete(http, worker, body)
            assert status == 200, answer
            message = answer["choices"][0]["message"]
            if message.get("tool_calls"):
                _assert_valid_calls(message["tool_calls"])
            else:
                jsonschema.validate(json.loads(message["content"]), ANSWER_SCHEMA)


async def test_a_call_cut_by_the_token_limit_is_length_and_no_call(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    """Cut inside the call: no broken call, finish_reason "length", streamed or not."""
    for seed in SEEDS:
        body = _body(tiny_chat_model, PROMPTS[0], seed, tool_choice="required", max_tokens=6)
        status, answer = await _complete(http, worker, body)
        assert status == 200, answer
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "length", choice
        assert not choice["message"].get("tool_calls"), choice
        assert answer["usage"]["completion_tokens"] == 6
        content, calls, finish = await _stream(http, worker, body)
        assert (content, calls, finish) == ("", [], "length")


async def test_plain_text_cut_by_the_token_limit_is_length(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    body = {"model": model_id(tiny_chat_model), "messages": [{"role": "user", "content": "hi"}]}
    body |= {"max_tokens": 5, "temperature": 0}
    status, answer = await _complete(http, worker, body)
    assert status == 200
    assert answer["choices"][0]["finish_reason"] == "length"
    _, _, finish = await _stream(http, worker, body)
    assert finish == "length"


async def test_a_schema_guidance_cannot_compile_falls_back(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    """llguidance has no 'not': that request is answered unguided, not refused."""
    tools = [_tool("Odd", {"type": "object", "properties": {"x": {"not": {"type": "string"}}}})]
    body = _body(tiny_chat_model, PROMPTS[0], 0, tools=tools, max_tokens=16)
    status, answer = await _complete(http, worker, body)
    assert status == 200, answer
    assert "Traceback" not in worker.log()


async def test_without_guidance_the_tolerant_parser_serves_and_info_says_so(
    http: aiohttp.ClientSession, taught_chat_model: Path, tmp_path: Path
) -> None:
    """Guidance off (as for a build or tokenizer without it): /v1/info says so, and a
    taught call is still found by the tolerant parser."""
    worker = start_worker([taught_chat_model], tmp_path, env={GUIDANCE_ENV: "off"})
    try:
        async with http.get(worker.url + "/v1/info", headers=worker.headers) as resp:
            info = await resp.json()
        check_schema(info, "Info")
        assert info["models"][0]["guidance"] is False
        body = {
            "model": model_id(taught_chat_model),
            "messages": [
                {"role": "system", "content": "You are a voice assistant for a home."},
                {"role": "user", "content": "turn on the kitchen light"},
            ],
            "tools": TOOLS[:1],
            "tool_choice": "required",
            "max_tokens": 64,
        }
        status, answer = await _complete(http, worker, body)
        assert status == 200, answer
        (call,) = answer["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "HassTurnOn"
    finally:
        assert worker.stop() == 0, worker.log()


async def test_the_taught_model_answers_the_same_under_guidance(
    http: aiohttp.ClientSession, taught_chat_model: Path, tmp_path: Path
) -> None:
    """Greedy answers that were right stay right: the grammar allows what the model
    wanted to write (a Hermes call; plain text)."""
    worker = start_worker([taught_chat_model], tmp_path)
    system = {"role": "system", "content": "You are a voice assistant for a home."}
    tools = [_tool("HassTurnOn", {"type": "object", "properties": {"name": {"type": "string"}}})]
    try:
        base = {"model": model_id(taught_chat_model), "tools": tools, "max_tokens": 64}
        for choice in ("auto", "required"):
            asked = [system, {"role": "user", "content": "turn on the kitchen light"}]
            status, answer = await _complete(
                http, worker, {**base, "messages": asked, "tool_choice": choice}
            )
            assert status == 200, answer
            (call,) = answer["choices"][0]["message"]["tool_calls"]
            assert json.loads(call["function"]["arguments"]) == {"name": "kitchen light"}
        hello = [system, {"role": "user", "content": "hello"}]
        status, answer = await _complete(http, worker, {**base, "messages": hello})
        assert answer["choices"][0]["message"]["content"] == "Hello from Hearth!"
    finally:
        assert worker.stop() == 0, worker.log()


# --------------------------------------------------------------------------- #
# Without a model: grammars, formats, the system prompt


def test_grammars_follow_tool_choice() -> None:
    auto = build_guide(
        tools=TOOLS, tool_choice="auto", tool_name=None, response_format=None, tool_format=HERMES
    )
    assert auto is not None and auto.text and auto.calls
    assert auto.grammar.startswith("start: TEXT | calls\n")
    required = build_guide(
        tools=TOOLS,
        tool_choice="required",
        tool_name=None,
        response_format=None,
        tool_format=HERMES,
    )
    assert required is not None and not required.text
    assert required.grammar.startswith("start: calls\n")
    named = build_guide(
        tools=TOOLS,
        tool_choice="required",
        tool_name="HassCancelAllTimers",
        response_format=None,
        tool_format=HERMES,
    )
    assert named is not None and named.tool_names == ("HassCancelAllTimers",)
    assert "HassTurnOn" not in named.grammar
    # Nothing to constrain; no known call format and no response format.
    assert (
        build_guide(
            tools=[], tool_choice="auto", tool_name=None, response_format=None, tool_format=HERMES
        )
        is None
    )
    assert (
        build_guide(
            tools=TOOLS, tool_choice="auto", tool_name=None, response_format=None, tool_format=None
        )
        is None
    )
    as_json = build_guide(
        tools=[],
        tool_choice="auto",
        tool_name=None,
        response_format={"type": "json_object"},
        tool_format=HERMES,
    )
    assert as_json is not None and as_json.answer_json and not as_json.calls


def _reader(**kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "tools": TOOLS,
        "tool_choice": "auto",
        "tool_name": None,
        "response_format": None,
        "tool_format": HERMES,
    }
    guide = build_guide(**(options | kwargs))
    assert guide is not None
    return guide.reader()


def _read(text: str, *, cut: bool = False, pieces: int = 3, **kwargs: Any) -> tuple[str, list[Any]]:
    """Fed in pieces, as a stream is."""
    reader = _reader(**kwargs)
    step = max(1, len(text) // pieces)
    shown = "".join(reader.feed(text[i : i + step]) for i in range(0, len(text), step))
    rest, calls = reader.finish(cut=cut)
    return shown + rest, calls


CALL = '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "lamp"}}\n</tool_call>'


def test_reading_guided_answers() -> None:
    assert _read("The lamp is on.  ") == ("The lamp is on.", [])
    text, calls = _read(CALL + "\n" + CALL.replace("lamp", "fan"))
    assert text == "" and [c.arguments["name"] for c in calls] == ["lamp", "fan"]
    # Cut by the token limit: whole calls are kept, the broken one is not.
    text, calls = _read(CALL + "\n" + CALL[:30], cut=True)
    assert text == "" and [c.arguments["name"] for c in calls] == ["lamp"]
    assert _read(CALL[:40], cut=True) == ("", [])
    # A JSON answer beside the calls (response_format with tools) is the answer.
    answer = '{"room": "hall", "count": 1, "lit": true}'
    response_format = {"type": "json_schema", "schema": ANSWER_SCHEMA}
    assert _read(answer, response_format=response_format) == (answer, [])
    # Llama 3: a bare object; Mistral: a list after the marker.
    bare = '{"name": "HassTurnOn", "parameters": {"name": "lamp"}}'
    assert _read(bare, tool_format=LLAMA3)[1][0].arguments == {"name": "lamp"}
    listed = '[TOOL_CALLS][{"name": "HassTurnOn", "arguments": {"name": "lamp"}}]'
    assert _read(listed, tool_format=MISTRAL)[1][0].name == "HassTurnOn"


QWEN_LIKE = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>"


def test_call_formats_from_chat_templates(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"added_tokens": []}))
    plain = ChatTemplate.from_string("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert detect_format(plain, tokenizer) is HERMES  # tools go into the system message
    assert detect_format(ChatTemplate.from_string(QWEN_LIKE), tokenizer) is HERMES
    mistral = ChatTemplate.from_string("{{ tools }}[TOOL_CALLS]")
    assert detect_format(mistral, tokenizer) is MISTRAL
    llama = ChatTemplate.from_string(
        '{{ tools }}Respond in the format {"name": function name, "parameters": dictionary of '
        "argument name and its value}."
    )
    assert detect_format(llama, tokenizer) is LLAMA3
    coder = ChatTemplate.from_string("{{ tools }}<tool_call>\n<function=name>")
    assert detect_format(coder, tokenizer) is None
    unknown = ChatTemplate.from_string("{{ tools }}call them somehow")
    assert detect_format(unknown, tokenizer) is None
    # The Mistral marker as a special token: the grammar names it by id.
    tokenizer.write_text(
        json.dumps({"added_tokens": [{"id": 5, "content": "[TOOL_CALLS]", "special": True}]})
    )
    special = detect_format(mistral, tokenizer)
    assert special is not None and special.opener_token == 5
    guide = build_guide(
        tools=TOOLS,
        tool_choice="required",
        tool_name=None,
        response_format=None,
        tool_format=special,
    )
    assert guide is not None and "calls: <[5]> %json" in guide.grammar


def test_a_template_without_tools_gets_them_in_the_system_message() -> None:
    """SmolLM2-135M's template ignores tools: the model would never see them."""
    template = ChatTemplate.from_string(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    )
    assert not template.supports_tools
    tools = TOOLS[:1]
    prompt = template.render([{"role": "user", "content": "hi"}], tools=tools)
    assert prompt.startswith("<system># Tools\n")
    assert json.dumps(tools[0], ensure_ascii=False) in prompt and "<tool_call>" in prompt
    assert prompt.endswith("<user>hi")
    with_system = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tools=tools
    )
    assert with_system.startswith("<system>Be brief.\n\n# Tools\n")
    assert "# Tools" not in template.render([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------- #
# scripts/bench/voice_tools.py (bench_voice's tool-call figures)


def _voice_tools() -> Any:
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[2] / "scripts" / "bench"
    sys.path.insert(0, str(bench))  # voice_tools imports voice_prompt beside it
    spec = importlib.util.spec_from_file_location("hearth_voice_tools", bench / "voice_tools.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_voice_tools_bench_counts_valid_calls(
    shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    import httpx
    import openai

    voice_tools = _voice_tools()
    commands = voice_tools.commands()
    offered = set(voice_tools._schemas())
    assert len(commands) == 50 and {c.tool for c in commands} == offered
    assert len({c.text for c in commands}) == 50

    def call(name: str, arguments: str) -> Any:
        function = type("F", (), {"name": name, "arguments": arguments})()
        return type("C", (), {"function": function})()

    schemas = voice_tools._schemas()
    assert voice_tools.valid_call(call("HassTurnOn", '{"name": "Kitchen Light 1"}'), schemas)
    assert not voice_tools.valid_call(call("HassTurnOn", '{"name": 1}'), schemas)
    assert not voice_tools.valid_call(call("HassTurnOn", '{"name": '), schemas)
    assert not voice_tools.valid_call(call("HassTurnOn", "[]"), schemas)
    assert not voice_tools.valid_call(call("HassFly", "{}"), schemas)
    assert not voice_tools.valid_call(call("HassStartTimer", '{"minutes": "5"}'), schemas)
    async with openai.AsyncOpenAI(
        base_url=shared_worker.url + "/v1",
        api_key=shared_worker.token or "none",
        http_client=httpx.AsyncClient(verify=False),
        max_retries=0,
    ) as client:
        figures = await voice_tools.measure_tool_calls(
            client, model_id(tiny_chat_model), limit=2, stride=25, verbose=False
        )
    assert figures["tool_call_commands"] == 2
    assert figures["tool_call_valid_rate"] in (1.0, None), figures
    assert 0 <= figures["tool_call_right_rate_required"] <= 1
