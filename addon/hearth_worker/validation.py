"""Parse and validate request bodies into plain dataclasses.

`parse_json_object` reads a body with the limits every body has (nesting, numbers,
Unicode); the `parse_*_request` functions validate it with the request models of
`api_types` (the ones openapi.yaml is generated from) and hand the server what it
works with. Every problem becomes an `ApiError` with a 4xx status, an OpenAI-style
error type and code, and the name of the offending parameter, so a malformed
request is answered clearly and never reaches an engine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from . import api_types as types
from .api_types import MAX_EMBEDDING_INPUTS, MAX_TOOL_BYTES  # noqa: F401 - tests read them

# Containers (objects and arrays) nested in any request body, the body itself included.
MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


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


def model_not_found(name: str, kind: str, served: Iterable[str]) -> ApiError:
    """The 404 for a request whose ``model`` names no ``kind`` model served here."""
    return ApiError(
        404,
        f"Model {name!r} is not a {kind} model served here (served: {sorted(served)})",
        code="model_not_found",
        type_="not_found_error",
        param="model",
    )


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


# Parts of a pydantic error location that name no parameter: a union's member.
_BUILTIN_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


# Not PEP 695 syntax: the worker supports Python 3.11 (pyproject's requires-python).
Request = TypeVar("Request", bound=BaseModel)


def validate_body(model: type[Request], data: dict[str, Any]) -> Request:  # noqa: UP047
    """`data` as a `model`, or an ApiError naming the parameter that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _api_error(err) from None


def _api_error(err: ValidationError) -> ApiError:
    """One ApiError for pydantic's errors: the one with a code of its own (a limit), else
    the most specific (deepest); the messages of a union's members for one parameter
    joined."""
    found = [(_clean(e["loc"]), e) for e in err.errors(include_url=False, include_input=False)]
    coded = [(loc, e) for loc, e in found if e["type"] in types.ERROR_STATUS]
    if coded:
        found = coded[:1]
    depth = max(len(loc) for loc, _ in found)
    loc = next(loc for loc, _ in found if len(loc) == depth)
    chosen = [e for where, e in found if where == loc]
    message = "; ".join(dict.fromkeys(str(e["msg"]) for e in chosen))
    code = str(chosen[0]["type"])
    context = chosen[0].get("ctx") or {}
    if "param" in context:  # an item named by a check of the whole list
        param: str | None = str(context["param"])
    else:
        param = _param(loc) if loc else None
    if code in types.ERROR_STATUS:
        return ApiError(types.ERROR_STATUS[code], message, code=code, param=param)
    if code != types.INVALID and param:
        message = f"'{param}': {message}"
    return ApiError(400, message, param=param)


def _clean(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """pydantic's error location without union member tags: the parameter's path."""
    return tuple(
        part
        for part in loc
        if isinstance(part, int)
        or not (part in _BUILTIN_TAGS or "[" in part or "-" in part or part[:1].isupper())
    )


def _content_text(content: str | list[types.TextPart] | None) -> str:
    if isinstance(content, list):
        return "".join(part.text for part in content)
    return content or ""


def _message(raw: types.ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "system" if raw.role == "developer" else raw.role,
        "content": _content_text(raw.content),
    }
    if raw.name is not None:
        message["name"] = raw.name
    if raw.tool_call_id is not None:
        message["tool_call_id"] = raw.tool_call_id
    if raw.tool_calls is not None:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": (
                        call.function.arguments
                        if isinstance(call.function.arguments, str)
                        else json.dumps(call.function.arguments)
                    ),
                },
            }
            for call in raw.tool_calls
        ]
    return message


def _response_format(
    value: types.ResponseFormatText | types.ResponseFormatJsonSchema | None,
) -> dict[str, Any] | None:
    """`response_format`: text (None), any JSON object, or JSON fitting a schema."""
    if value is None or value.type == "text":
        return None
    if isinstance(value, types.ResponseFormatText):
        return {"type": "json_object"}
    spec = value.json_schema
    return {"type": "json_schema", "name": spec.name, "schema": spec.schema_}


def parse_chat_request(data: dict[str, Any]) -> ChatRequest:
    req = validate_body(types.ChatCompletionRequest, data)
    tools: list[dict[str, Any]] = [
        {"type": "function", "function": t.function.entry()} for t in req.tools or []
    ]
    choice = req.tool_choice
    name = None
    tool_choice = "auto"
    if isinstance(choice, types.ToolChoiceFunction):
        name = choice.function.name
        tool_choice = "required"
        if name not in [tool["function"]["name"] for tool in tools]:
            raise ApiError(
                400,
                f"'tool_choice' names {name[:40]!r}, which is not in 'tools'",
                code="tool_not_offered",
                param="tool_choice",
            )
    elif choice is not None:
        tool_choice = choice
    stop = req.stop
    return ChatRequest(
        model=req.model,
        messages=[_message(m) for m in req.messages],
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        max_tokens=req.max_completion_tokens
        if req.max_completion_tokens is not None
        else req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=req.seed,
        tools=tools,
        tool_choice=tool_choice,
        tool_choice_name=name,
        response_format=_response_format(req.response_format),
        top_k=req.top_k,
        repetition_penalty=req.repetition_penalty,
    )


def parse_embedding_request(data: dict[str, Any]) -> EmbeddingRequest:
    req = validate_body(types.EmbeddingRequest, data)
    return EmbeddingRequest(
        model=req.model,
        inputs=[req.input] if isinstance(req.input, str) else list(req.input),
        encoding_format=req.encoding_format or "float",
    )


# -- models (POST /v1/models/pull) ------------------------------------------------


@dataclass(frozen=True)
class PullRequest:
    source: str
    name: str | None = None


def parse_pull_request(data: dict[str, Any]) -> PullRequest:
    req = validate_body(types.PullRequest, data)
    return PullRequest(source=req.source, name=req.name)
