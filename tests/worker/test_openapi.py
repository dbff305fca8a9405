"""One definition of the API: openapi.yaml is generated from the types the worker validates with.

The committed spec (what GET /v1/openapi.yaml serves; test_api.py checks that) must
be what `hearth_worker.openapi` makes from `hearth_worker.api_types`; after changing
either, regenerate it with `scripts/openapi`. Then the spec and the validation
agree: bodies the spec calls valid are accepted and the others refused, with a 4xx
naming the parameter (test_fuzz.py checks the same against a real worker, with
generated bodies). No worker process here: these run in well under a second.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from hearth_worker import openapi, speech
from hearth_worker.validation import (
    MAX_EMBEDDING_INPUTS,
    MAX_TOOL_BYTES,
    ApiError,
    parse_chat_request,
    parse_embedding_request,
    parse_pull_request,
)
from test_api import check_schema

HELLO = [{"role": "user", "content": "hello"}]
PARSERS = {
    "ChatCompletionRequest": parse_chat_request,
    "EmbeddingRequest": parse_embedding_request,
    "PullRequest": parse_pull_request,
    "SpeechRequest": speech.parse_speech_request,
}


def test_the_committed_spec_is_the_generated_one() -> None:
    assert openapi.committed() == openapi.render(), (
        "addon/hearth_worker/openapi.yaml is not what hearth_worker/api_types.py declares: "
        "run scripts/openapi and commit the result"
    )


def _tool(name: str, **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


# (schema, body, valid): each body's verdict, by the spec and by the worker alike.
AGREEMENT = [
    # The fuzzer's finding: an empty `model` (the spec had allowed it; the worker
    # refuses it, as OpenAI does: no model to route to). Now one declaration says so.
    ("ChatCompletionRequest", {"model": "", "messages": HELLO}, False),
    ("EmbeddingRequest", {"model": "", "input": "x"}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO}, True),
    ("ChatCompletionRequest", {"model": "m", "messages": []}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "stream": None}, True),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "stream": "yes"}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "n": 1}, True),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "n": 2}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "top_p": 0}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "top_p": 1}, True),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "temperature": 2.5}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "max_tokens": 0}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "seed": 2**63}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "seed": -(2**63)}, True),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "stop": ""}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "stop": ["a"] * 5}, False),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "stop": ["a", "b"]}, True),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "tool_choice": "maybe"}, False),
    (
        "ChatCompletionRequest",
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        False,
    ),
    (
        "ChatCompletionRequest",
        {"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        False,
    ),
    (
        "ChatCompletionRequest",
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ],
            "tools": [_tool("f", parameters={"type": "object"})],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
        },
        True,
    ),
    ("ChatCompletionRequest", {"model": "m", "messages": HELLO, "tools": [{}]}, False),
    (
        "ChatCompletionRequest",
        {"model": "m", "messages": HELLO, "response_format": {"type": "xml"}},
        False,
    ),
    ("EmbeddingRequest", {"model": "e", "input": []}, False),
    ("EmbeddingRequest", {"model": "e", "input": ["a", "b"], "encoding_format": None}, True),
    ("EmbeddingRequest", {"model": "e", "input": "x", "dimensions": 8}, False),
    ("EmbeddingRequest", {"model": "e", "input": "x", "encoding_format": "hex"}, False),
    ("PullRequest", {"source": "owner/name:sub/folder", "name": "My model"}, True),
    ("PullRequest", {"source": "owner/name:../up"}, False),
    ("PullRequest", {"source": "owner/name", "name": " padded"}, False),
    ("PullRequest", {"source": "owner/name", "name": "a/b"}, False),
    # Speech: one declaration for the spec and speech.py (OpenAI's shape, Hearth's rate).
    ("SpeechRequest", {"model": "v", "input": "Hello."}, True),
    (
        "SpeechRequest",
        {
            "model": "v",
            "input": "Hi.",
            "voice": "joe",
            "response_format": "pcm",
            "speed": 2,
            "sample_rate": 16000,
            "stream_format": "audio",
        },
        True,
    ),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "response_format": None}, True),
    ("SpeechRequest", {"model": "", "input": "Hi."}, False),
    ("SpeechRequest", {"model": "v", "input": ""}, False),
    ("SpeechRequest", {"model": "v", "input": " \n\x1c"}, False),
    ("SpeechRequest", {"model": "v", "input": "x" * 4097}, False),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "voice": 3}, False),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "response_format": "mp3"}, False),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "speed": 0.2}, False),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "speed": True}, False),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "sample_rate": 7999}, False),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "sample_rate": 48001}, False),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "sample_rate": "16000"}, False),
    ("SpeechRequest", {"model": "v", "input": "Hi.", "stream_format": "sse"}, False),
]


@pytest.mark.parametrize(("schema", "body", "valid"), AGREEMENT)
def test_the_spec_and_the_worker_agree(schema: str, body: dict[str, Any], valid: bool) -> None:
    try:
        check_schema(body, schema)
    except jsonschema.ValidationError:
        by_spec = False
    else:
        by_spec = True
    try:
        PARSERS[schema](body)
    except ApiError as err:
        assert 400 <= err.status < 500
        by_worker = False
    else:
        by_worker = True
    assert (by_spec, by_worker) == (valid, valid)


def _big_tool(name: str, properties: int) -> dict[str, Any]:
    props = {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(properties)}
    return _tool(name, parameters={"type": "object", "properties": props})


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"messages": HELLO}, 400, "invalid_request", "model"),
        ({"model": "", "messages": HELLO}, 400, "invalid_request", "model"),
        (
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            400,
            "invalid_request",
            "messages[0].content",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "invalid_request",
            "messages[0].content[0]",
        ),
        (
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
            400,
            "invalid_request",
            "messages[0].tool_calls[0].function",
        ),
        (
            {"model": "m", "messages": HELLO, "tools": [_tool("t", parameters=[])]},
            400,
            "invalid_request",
            "tools[0].function.parameters",
        ),
        (
            {"model": "m", "messages": HELLO, "tools": [_tool("a"), _big_tool("b", 400)]},
            400,
            "tool_too_large",
            "tools[1].function",
        ),
        (
            {
                "model": "m",
                "messages": HELLO,
                "tools": [_big_tool(f"t{i}", 200) for i in range(20)],
            },
            400,
            "tools_too_large",
            "tools",
        ),
        (
            {
                "model": "m",
                "messages": HELLO,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"description": "x" * MAX_TOOL_BYTES}},
                },
            },
            400,
            "schema_too_large",
            "response_format.json_schema.schema",
        ),
        (
            {
                "model": "m",
                "messages": HELLO,
                "tools": [_tool("a")],
                "tool_choice": {"type": "function", "function": {"name": "b"}},
            },
            400,
            "tool_not_offered",
            "tool_choice",
        ),
    ],
)
def test_chat_refusals_name_the_parameter(
    body: dict[str, Any], status: int, code: str, param: str
) -> None:
    with pytest.raises(ApiError) as caught:
        parse_chat_request(body)
    err = caught.value
    assert (err.status, err.code, err.param) == (status, code, param), err.message
    check_schema(err.body(), "Error")


def test_too_many_embedding_inputs_is_a_413() -> None:
    with pytest.raises(ApiError) as caught:
        parse_embedding_request({"model": "e", "input": ["x"] * (MAX_EMBEDDING_INPUTS + 1)})
    assert (caught.value.status, caught.value.code, caught.value.param) == (
        413,
        "too_many_inputs",
        "input",
    )
    parse_embedding_request({"model": "e", "input": ["x"] * MAX_EMBEDDING_INPUTS})


def test_a_request_becomes_what_the_engines_take() -> None:
    req = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
                },
            ],
            "tools": [_tool("f", description="")],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "stop": "END",
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "stream_options": {"include_usage": True},
            "seed": 2**40 + 3,
        }
    )
    assert req.messages == [
        {"role": "system", "content": "ab"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
    ]
    assert req.tools == [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    assert (req.tool_choice, req.tool_choice_name, req.stop, req.max_tokens) == (
        "required",
        "f",
        ["END"],
        7,
    )
    assert (req.stream, req.include_usage, req.engine_seed) == (False, True, 3)
    assert req.response_format is None
