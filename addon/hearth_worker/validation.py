"""Parse and validate request bodies into plain dataclasses.

Every problem becomes an `ApiError` with a 4xx status, an OpenAI-style error
type and code, and the name of the offending parameter, so a malformed request
is answered clearly and never reaches an engine.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 256
# Containers (objects and arrays) nested in any request body, the body itself included.
MAX_JSON_DEPTH = 64
# One tool's function definition, and all of a request's tools, as compact JSON.
MAX_TOOL_BYTES = 32 * 1024
MAX_TOOLS_BYTES = 256 * 1024
# The API accepts OpenAI's 64-bit seeds; the engine takes 31 bits (`engine_seed`).
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
# max_tokens / max_completion_tokens: at most a 32-bit count (a context is far smaller).
MAX_TOKENS_LIMIT = 2**31 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
TOOL_CHOICES = frozenset({"none", "auto", "required"})


class ApiError(Exception):
    """An error answered to the client as JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "invalid_request",
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"
    # A named tool choice ({"type": "function", "function": {"name": ...}}): tool_choice
    # is "required" and this the tool.
    tool_choice_name: str | None = None
    # {"type": "json_object"} or {"type": "json_schema", "name": ..., "schema": {...}};
    # None for plain text.
    response_format: dict[str, Any] | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def engine_seed(self) -> int | None:
        """`seed` folded into the 31 bits the engine takes (the same seed, the same draw)."""
        return None if self.seed is None else self.seed % 2**31


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: list[str]
    encoding_format: str = "float"


class _Refused(ValueError):
    """A JSON value refused while parsing (raised from json's hooks)."""


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:20]} is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON value")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body: a JSON object, with limits that keep parsing cheap and safe.

    Nesting beyond MAX_JSON_DEPTH, integers beyond Python's limit (4300 digits),
    floats out of range, NaN and Infinity, and strings with lone surrogates (not
    Unicode text: no tokenizer takes them) are all answered with a 400.
    """
    try:
        data = json.loads(raw, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError as err:
        raise _too_deep(()) from err
    except _Refused as err:
        raise ApiError(400, f"Request body is not accepted: {err}", code="invalid_json") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int()'s digit limit
        raise ApiError(400, f"Request body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise ApiError(400, "Request body must be a JSON object", code="invalid_json")
    # A walk over a big body costs more than parsing it: only when the bytes allow
    # too deep a nesting or a surrogate (an escape, or bytes json decodes with
    # "surrogatepass").
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH or b"\\u" in raw or b"\xed" in raw:
        _check_tree(data)
    return data


def _too_deep(path: tuple[str | int, ...]) -> ApiError:
    return ApiError(
        400,
        f"Request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of objects "
        "and arrays)",
        code="json_too_deep",
        param=_param(path[:1]) if path else None,
    )


def _param(path: tuple[str | int, ...]) -> str:
    """`messages[0].content` for ("messages", 0, "content")."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if len(part) <= 40 else part[:40] + "..."
            name = name.encode("utf-8", "backslashreplace").decode()  # lone surrogates
            text += f".{name}" if text else name
    return text


def _check_tree(data: dict[str, Any]) -> None:
    """Depth and Unicode checks over a parsed body, without recursion."""
    stack: list[tuple[dict[str, Any] | list[Any], tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise _too_deep(path)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and _SURROGATE.search(key):
                raise _not_unicode((*path, key))
            if isinstance(item, dict | list):
                stack.append((item, (*path, key)))
            elif isinstance(item, str) and _SURROGATE.search(item):
                raise _not_unicode((*path, key))


def _not_unicode(path: tuple[str | int, ...]) -> ApiError:
    return ApiError(
        400,
        "Request body has a string that is not valid Unicode text (a lone surrogate "
        "such as \\ud800)",
        code="invalid_unicode",
        param=_param(path),
    )


def _string(data: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise invalid(f"'{key}' is required", key)
        return None
    if not isinstance(value, str):
        raise invalid(f"'{key}' must be a string", key)
    if required and not value:
        raise invalid(f"'{key}' must not be empty", key)
    return value


def _number(data: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{key}' must be a number", key)
    if not lo <= value <= hi:
        raise invalid(f"'{key}' must be between {lo} and {hi}", key)
    return float(value)


def _integer(data: dict[str, Any], key: str, minimum: int, maximum: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{key}' must be an integer", key)
    if value < minimum:
        raise invalid(f"'{key}' must be at least {minimum}", key)
    if value > maximum:
        raise invalid(f"'{key}' must be at most {maximum}", key)
    return value


def _content_text(content: Any, param: str) -> str | None:
    """Validate a message's content: a string, null, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid("Only text content parts are supported", f"{param}[{j}]")
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid("A text content part needs a string 'text'", f"{param}[{j}].text")
            parts.append(text)
        return "".join(parts)
    raise invalid("'content' must be a string, null or a list of text parts", param)


def _tool_call(call: Any, param: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise invalid("A tool call must be an object", param)
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid("A tool call needs 'function' with a string 'name'", f"{param}.function")
    if call.get("type", "function") != "function":
        raise invalid("A tool call's 'type' must be 'function'", f"{param}.type")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments)
    if not isinstance(arguments, str):
        raise invalid("Tool call 'arguments' must be a JSON string", f"{param}.function.arguments")
    call_id = call.get("id", "")
    if not isinstance(call_id, str):
        raise invalid("Tool call 'id' must be a string", f"{param}.id")
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty array", "messages")
    messages: list[dict[str, Any]] = []
    for i, raw in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise invalid("Each message must be an object", param)
        role = raw.get("role")
        if role not in ROLES:
            raise invalid(f"'role' must be one of {sorted(ROLES)}", f"{param}.role")
        message: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": _content_text(raw.get("content"), f"{param}.content") or "",
        }
        for key in ("name", "tool_call_id"):
            if key in raw and raw[key] is not None:
                if not isinstance(raw[key], str):
                    raise invalid(f"'{key}' must be a string", f"{param}.{key}")
                message[key] = raw[key]
        calls = raw.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise invalid("'tool_calls' must be an array on an assistant message", param)
            message["tool_calls"] = [
                _tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls)
            ]
        messages.append(message)
    return messages


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("'tools' must be an array", "tools")
    tools = []
    total = 0
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise invalid("Each tool must be an object of type 'function'", param)
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid("A tool needs 'function' with a string 'name'", f"{param}.function")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise invalid("'parameters' must be a JSON schema object", f"{param}.function")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid("'description' must be a string", f"{param}.function.description")
        entry: dict[str, Any] = {"name": function["name"], "parameters": parameters}
        if description:
            entry["description"] = description
        size = len(json.dumps(entry, ensure_ascii=False).encode())
        if size > MAX_TOOL_BYTES:
            raise ApiError(
                400,
                f"Tool {function['name'][:40]!r} is too large: {size} bytes as JSON "
                f"(at most {MAX_TOOL_BYTES})",
                code="tool_too_large",
                param=f"{param}.function",
            )
        total += size
        if total > MAX_TOOLS_BYTES:
            raise ApiError(
                400,
                f"The tools are too large together: more than {MAX_TOOLS_BYTES} bytes as JSON",
                code="tools_too_large",
                param="tools",
            )
        tools.append({"type": "function", "function": entry})
    return tools


def _tool_choice(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise invalid(f"'tool_choice' must be one of {sorted(TOOL_CHOICES)}", "tool_choice")
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return "required"
    raise invalid("'tool_choice' must be a string or a function choice", "tool_choice")


def _tool_choice_name(value: Any, tools: list[dict[str, Any]]) -> str | None:
    """The tool a named tool choice names; it must be one of the tools offered."""
    if not isinstance(value, dict):
        return None
    function = value.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise invalid("A function choice needs 'function' with a string 'name'", "tool_choice")
    if name not in [tool["function"]["name"] for tool in tools]:
        raise ApiError(
            400,
            f"'tool_choice' names {name[:40]!r}, which is not in 'tools'",
            code="tool_not_offered",
            param="tool_choice",
        )
    return name


def _response_format(value: Any) -> dict[str, Any] | None:
    """`response_format`: text (None), any JSON object, or JSON fitting a schema."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise invalid(
            "'response_format' must be an object whose 'type' is 'text', 'json_object' or "
            "'json_schema'",
            "response_format",
        )
    assert isinstance(value, dict)
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise invalid(
            "'json_schema' must be an object with a JSON schema object in 'schema'",
            "response_format.json_schema",
        )
    name = spec.get("name", "response")
    if not isinstance(name, str):
        raise invalid("'name' must be a string", "response_format.json_schema.name")
    schema = spec.get("schema", {})
    size = len(json.dumps(schema, ensure_ascii=False).encode())
    if size > MAX_TOOL_BYTES:
        raise ApiError(
            400,
            f"The response schema is too large: {size} bytes as JSON (at most {MAX_TOOL_BYTES})",
            code="schema_too_large",
            param="response_format.json_schema.schema",
        )
    return {"type": "json_schema", "name": name, "schema": schema}


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in value)
    ):
        raise invalid(
            f"'stop' must be a non-empty string or up to {MAX_STOP_SEQUENCES} of them", "stop"
        )
    return list(value)


def parse_chat_request(data: dict[str, Any]) -> ChatRequest:
    model = _string(data, "model", required=True)
    assert model is not None
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise invalid("'include_usage' must be a boolean", "stream_options.include_usage")
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise invalid("Only n=1 is supported", "n")
    max_tokens = _integer(data, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens", 1, MAX_TOKENS_LIMIT)
    seed = _integer(data, "seed", SEED_MIN, SEED_MAX)
    top_p = _number(data, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise invalid("'top_p' must be greater than 0", "top_p")
    repetition_penalty = _number(data, "repetition_penalty", 0.0, 2.0)
    if repetition_penalty == 0.0:
        raise invalid("'repetition_penalty' must be greater than 0", "repetition_penalty")
    tools = _tools(data.get("tools"))
    return ChatRequest(
        model=model,
        messages=_messages(data.get("messages")),
        stream=stream,
        include_usage=bool(include_usage),
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 0.0, 2.0),
        top_p=top_p,
        stop=_stop(data.get("stop")),
        seed=seed,
        tools=tools,
        tool_choice=_tool_choice(data.get("tool_choice")),
        tool_choice_name=_tool_choice_name(data.get("tool_choice"), tools),
        response_format=_response_format(data.get("response_format")),
        top_k=_integer(data, "top_k", 0, MAX_TOKENS_LIMIT),
        repetition_penalty=repetition_penalty,
    )


def parse_embedding_request(data: dict[str, Any]) -> EmbeddingRequest:
    model = _string(data, "model", required=True)
    assert model is not None
    value = data.get("input")
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(s, str) for s in value):
        inputs = list(value)
    else:
        raise invalid("'input' must be a string or a non-empty array of strings", "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise ApiError(
            413,
            f"At most {MAX_EMBEDDING_INPUTS} inputs per request",
            code="too_many_inputs",
            param="input",
        )
    encoding = data.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise invalid("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None:
        raise invalid("'dimensions' is not supported by this worker", "dimensions")
    return EmbeddingRequest(model=model, inputs=inputs, encoding_format=encoding)


# -- models (POST /v1/models/pull) ------------------------------------------------

MAX_SOURCE_CHARS = 300
MAX_MODEL_NAME_CHARS = 100
# openapi.yaml's PullRequest says the same: owner/name, then optionally ":" and a
# folder path of plain segments (never "." or "..").
_SEGMENT = r"[A-Za-z0-9._+=@-]+"
SOURCE_PATTERN = re.compile(
    rf"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(?::{_SEGMENT}(?:/{_SEGMENT})*)?"
)
_DOT_SEGMENT = re.compile(r":(?:.*/)?\.{1,2}(?:/|$)")
# A model's id is part of the worker's URLs (/v1/models/ID) and what Home Assistant
# shows: no slash, no control character, no white space at either end.
_NAME_CHAR = r"[^/\\\x00-\x1f\x7f-\x9f]"
_NAME_EDGE = r"[^\s/\\\x00-\x1f\x7f-\x9f]"
MODEL_NAME_PATTERN = re.compile(rf"{_NAME_EDGE}(?:{_NAME_CHAR}*{_NAME_EDGE})?")


@dataclass(frozen=True)
class PullRequest:
    source: str
    name: str | None = None


def parse_pull_request(data: dict[str, Any]) -> PullRequest:
    source = _string(data, "source", required=True)
    assert source is not None
    if (
        len(source) > MAX_SOURCE_CHARS
        or not SOURCE_PATTERN.fullmatch(source)
        or _DOT_SEGMENT.search(source)
    ):
        raise invalid(
            "'source' must be a Hugging Face model id, owner/name or owner/name:sub/folder "
            f"(at most {MAX_SOURCE_CHARS} characters)",
            "source",
        )
    name = _string(data, "name")
    if name is not None and (
        len(name) > MAX_MODEL_NAME_CHARS or not MODEL_NAME_PATTERN.fullmatch(name)
    ):
        raise invalid(
            f"'name' must be 1 to {MAX_MODEL_NAME_CHARS} characters, without a slash or "
            "control characters, not starting or ending with white space",
            "name",
        )
    return PullRequest(source=source, name=name)
