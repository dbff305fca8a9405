"""Tolerant parsing of tool calls out of generated text.

Small models call tools in many shapes, and often a little wrong. This module
finds the calls and leaves the rest of the answer as text to show:

* Hermes tags, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one or
  several, anywhere in the answer (also ``<|tool_call|>...<|/tool_call|>``); a
  closing tag missing at the end of the text is forgiven.
* Fenced blocks, ````` ```json {...} ``` `````, anywhere in the answer.
* A bare JSON object or list of them at the start of the answer (Mistral's
  ``[TOOL_CALLS]`` marker before it is dropped), or an object at the start of a line.
* Function-call syntax, ``HassTurnOn(name="kitchen light")`` or a Python list of
  such calls, at the start of a line, but only for names in ``tool_names``.
* Inside tags and fences also: ``name\\n{arguments}`` and Qwen3-Coder's
  ``<function=name><parameter=key>value</parameter></function>``.

Each call may be ``{"name", "arguments"|"parameters"}``, OpenAI's ``{"function":
{"name", "arguments"}}`` or ``{"tool_calls": [...]}``; arguments may be a JSON
string; single quotes, Python literals (``True``, ``None``), unquoted keys and
trailing commas are accepted. When ``tool_names`` is given, a call naming any
other tool stays in the text. Nothing here raises on any input.

:class:`ToolCallStreamFilter` applies the same rules to a stream of text deltas:
it shows text as soon as it cannot be part of a call, and what it shows in
total is exactly the content :func:`parse_tool_calls` returns for the same text.
"""

import ast
import json
import re
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["ParsedToolCall", "ToolCallStreamFilter", "parse_tool_calls"]


@dataclass(frozen=True)
class ParsedToolCall:
    """One tool call found in generated text."""

    name: str
    arguments: dict[str, Any]


_OPEN_TAGS: Final = ("<tool_call>", "<|tool_call|>")
_CLOSE_TAGS: Final = ("</tool_call>", "<|/tool_call|>")
_ALL_TAGS: Final = _OPEN_TAGS + _CLOSE_TAGS
_MISTRAL_MARKER: Final = "[TOOL_CALLS]"
_FENCE: Final = "```"

# Keys a call's name and arguments are found under, in order of preference.
_NAME_KEYS: Final = ("name", "function", "tool_name", "function_name", "tool")
_ARGUMENT_KEYS: Final = ("arguments", "parameters", "args", "tool_input", "input")
# Keys that are never arguments when arguments are given flat beside the name.
_NOT_ARGUMENTS: Final = frozenset({"type", "id", "index", "call_id"})

_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_LANG_RE: Final = re.compile(r"[\w+.#-]*")
_RUN_END_RE: Final = re.compile(r"[<`\n]")
_STRAY_RE: Final = re.compile(r"^[\s}\])]+")
_NAME_THEN_ARGS_RE: Final = re.compile(r"([A-Za-z_][\w.-]*)\s*:?\s*(\{.*\})", re.DOTALL)
_XML_FUNCTION_RE: Final = re.compile(
    r"<function=([^>\n]+)>(.*?)(?:</function>|(?=<function=)|\Z)", re.DOTALL
)
_XML_PARAMETER_RE: Final = re.compile(
    r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL
)

_WORD_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_RE: Final = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

_BRACKETS: Final = {"{": "}", "[": "]", "(": ")"}
_CLOSERS: Final = frozenset("}])")
# A single quote opens a string only where a value or key can start, so that an
# apostrophe in prose ("isn't") does not.
_QUOTE_AFTER: Final = frozenset("{[(,:=")
# After a call, separators and stray closing brackets are dropped.
_AFTER_CALL_JUNK: Final = frozenset(",;}])")


class _Fail:
    """Marks a value that could not be decoded (``None`` is a valid value)."""


_FAIL: Final = _Fail()


# --------------------------------------------------------------------------- #
# Tool names


class _Names:
    def __init__(self, tool_names: Collection[str] | None) -> None:
        if tool_names is None:
            self.known: frozenset[str] | None = None
        elif isinstance(tool_names, str):
            self.known = frozenset({tool_names})
        else:
            self.known = frozenset(name for name in tool_names if isinstance(name, str) and name)
        self._by_lower: dict[str, str] = {}
        self._candidates: tuple[str, ...] = ()
        if self.known:
            for name in sorted(self.known):
                self._by_lower.setdefault(name.lower(), name)
            self._candidates = tuple(
                prefix + name.lower() for name in self.known for prefix in ("", "functions.")
            )

    def resolve(self, name: str) -> str | None:
        """The tool a name given inside JSON or a call means, or None if none."""
        name = name.strip()
        if not name:
            return None
        if self.known is None:
            return name.removeprefix("functions.") or None
        if name in self.known:
            return name
        tail = name.rsplit(".", 1)[-1]  # "functions.HassTurnOn", "default_api.HassTurnOn"
        if tail in self.known:
            return tail
        return self._by_lower.get(tail.lower())

    def resolve_at_line_start(self, ident: str) -> str | None:
        """Stricter: every prefix of a name this accepts is one may_become() holds back."""
        if not self.known:
            return None
        lowered = ident.lower().removeprefix("functions.")
        return self._by_lower.get(lowered)

    def may_become(self, ident: str) -> bool:
        """Whether more characters could make ``ident`` a name resolve_at_line_start takes."""
        if not self.known:
            return False
        lowered = ident.lower()
        return any(candidate.startswith(lowered) for candidate in self._candidates)


# --------------------------------------------------------------------------- #
# Lenient decoding of JSON-like text


_Balance = tuple[str, int, str]


class _Balancer:
    """Finds where the bracket opened at ``start`` closes, minding strings.

    It can be run again on the same text grown longer, and goes on from where
    it stopped, so a stream held back on an open bracket is scanned once.
    """

    def __init__(self, start: int) -> None:
        self._index = start
        self._stack: list[str] = []
        self._quote = ""
        self._escaped = False
        self._previous = ""
        self._result: _Balance | None = None

    def run(self, text: str) -> _Balance:
        """``("complete", end, "")``; ``("invalid", end, "")`` for a mismatched
        closing bracket at ``end - 1``; or ``("incomplete", len(text), suffix)``
        with the characters that would close everything still open."""
        if self._result is not None:
            return self._result
        stack = self._stack
        for index in range(self._index, len(text)):
            char = text[index]
            if self._quote:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == self._quote:
                    self._quote = ""
                    self._previous = char
                continue
            if char == '"' or (char == "'" and self._previous in _QUOTE_AFTER):
                self._quote = char
            elif char in _BRACKETS:
                stack.append(_BRACKETS[char])
            elif char in _CLOSERS:
                if not stack or stack[-1] != char:
                    self._result = ("invalid", index + 1, "")
                    return self._result
                stack.pop()
                if not stack:
                    self._result = ("complete", index + 1, "")
                    return self._result
            if not char.isspace():
                self._previous = char
        self._index = len(text)
        return "incomplete", len(text), self._quote + "".join(reversed(stack))


def _balanced(text: str, start: int) -> _Balance:
    return _Balancer(start).run(text)


def _json_value(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists), or _FAIL."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        return _FAIL


_ESCAPES: Final = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    "/": "/",
    "\\": "\\",
    '"': '"',
    "'": "'",
}
_BARE_WORDS: Final = {
    "true": "true",
    "True": "true",
    "false": "false",
    "False": "false",
    "null": "null",
    "None": "null",
    "none": "null",
}


def _read_string(text: str, start: int) -> tuple[str, int] | None:
    """The string quoted at ``text[start]`` (either quote) and the index after it."""
    quote = text[start]
    out: list[str] = []
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == quote:
            return "".join(out), index + 1
        if char == "\\" and index + 1 < len(text):
            nxt = text[index + 1]
            if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[index + 2 : index + 6]):
                out.append(chr(int(text[index + 2 : index + 6], 16)))
                index += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            index += 2
            continue
        out.append(char)
        index += 1
    return None


def _cleanup(text: str) -> str | None:
    """JSON-like text rewritten as JSON: quotes, bare words, trailing commas."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char in "\"'":
            read = _read_string(text, index)
            if read is None:
                return None
            out.append(json.dumps(read[0], ensure_ascii=False))
            index = read[1]
        elif (number := _NUMBER_RE.match(text, index)) is not None:
            out.append(number.group().lstrip("+"))
            index = number.end()
        elif char.isalpha() or char == "_":
            match = _WORD_RE.match(text, index)
            if match is None:
                return None
            word = match.group()
            index = match.end()
            if word in _BARE_WORDS:
                out.append(_BARE_WORDS[word])
            elif re.match(r"\s*:", text[index:]):
                out.append(json.dumps(word))  # an unquoted key
            else:
                return None
        elif char in "}]":
            while out and out[-1].isspace():
                out.pop()
            if out and out[-1] == ",":
                out.pop()
            out.append(char)
            index += 1
        else:
            out.append(char)
            index += 1
    return "".join(out)


_JSON_WORDS: Final = {"true": True, "false": False, "null": None}


class _JsonWords(ast.NodeTransformer):
    """Lets ``ast.literal_eval`` take JSON's true/false/null too."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_WORDS:
            return ast.copy_location(ast.Constant(_JSON_WORDS[node.id]), node)
        return node


def _parse_python(text: str, mode: str) -> ast.AST | None:
    """``ast.parse`` that stays quiet (no SyntaxWarning) and never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(text.strip(), mode=mode)
    except Exception:
        return None


def _literal(node: ast.expr) -> Any:
    try:
        return _json_value(ast.literal_eval(_JsonWords().visit(node)))
    except Exception:
        return _FAIL


def _json_loads(text: str | None) -> Any:
    if text is None:
        return _FAIL
    try:
        return json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return _FAIL


def _loads(text: str) -> Any:
    """JSON, else JSON after a cleanup pass, else a Python literal; _FAIL if none."""
    value = _json_loads(text)
    if value is _FAIL:
        value = _json_loads(_cleanup(text))
    if value is _FAIL:
        tree = _parse_python(text, "eval")
        if not isinstance(tree, ast.Expression):
            return _FAIL
        value = _literal(tree.body)
    return value


# --------------------------------------------------------------------------- #
# Recognising calls in decoded values


def _arguments(raw: Any) -> dict[str, Any] | None:
    for _ in range(3):  # arguments may be JSON in a string, sometimes twice over
        if raw is None:
            return {}
        if isinstance(raw, dict):
            value = _json_value(raw)
            return value if isinstance(value, dict) else None
        if not isinstance(raw, str):
            return None
        if not raw.strip():
            return {}
        raw = _loads(raw.strip())
        if raw is _FAIL:
            return None
    return None


def _call_from_dict(obj: Any, names: _Names) -> ParsedToolCall | None:
    if not isinstance(obj, dict):
        return None
    source = obj
    if isinstance(obj.get("function"), dict):
        source = obj["function"]
    name_key = next(
        (key for key in _NAME_KEYS if isinstance(source.get(key), str) and source[key].strip()),
        None,
    )
    if name_key is None:
        return None
    name = names.resolve(source[name_key])
    if name is None:
        return None
    holder = next((h for h in (source, obj) if any(k in h for k in _ARGUMENT_KEYS)), None)
    if holder is not None:
        arg_key = next(key for key in _ARGUMENT_KEYS if key in holder)
        arguments = _arguments(holder[arg_key])
    elif names.known is None and source is obj:
        return None  # {"name": "Bob"} alone is no call when any name would do
    else:
        # Arguments given flat beside the name.
        flat = {k: v for k, v in source.items() if k != name_key and k not in _NOT_ARGUMENTS}
        arguments = _arguments(flat)
    if arguments is None:
        return None
    return ParsedToolCall(name, arguments)


def _calls_from_value(value: Any, names: _Names) -> list[ParsedToolCall] | None:
    if isinstance(value, dict):
        wrapped = value.get("tool_calls")
        if (
            isinstance(wrapped, list)
            and not value.get("content")
            and set(value) <= {"tool_calls", "role", "content", "type"}
        ):
            return _calls_from_value(wrapped, names)
        call = _call_from_dict(value, names)
        return [call] if call is not None else None
    if isinstance(value, list) and value:
        calls = [_call_from_dict(item, names) for item in value]
        if any(call is None for call in calls):
            return None
        return [call for call in calls if call is not None]
    return None


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _call_from_ast(node: ast.expr, names: _Names) -> ParsedToolCall | None:
    if not isinstance(node, ast.Call):
        return None
    dotted = _dotted(node.func)
    name = names.resolve(dotted) if dotted is not None else None
    if name is None:
        return None
    arguments: dict[str, Any] = {}
    if node.args:
        # Only one positional argument is understood: a dict of all arguments.
        if len(node.args) != 1 or node.keywords:
            return None
        value = _literal(node.args[0])
        if not isinstance(value, dict):
            return None
        return ParsedToolCall(name, value)
    for keyword in node.keywords:
        value = _literal(keyword.value)
        if value is _FAIL:
            return None
        if keyword.arg is None:  # **{...}
            if not isinstance(value, dict):
                return None
            arguments.update(value)
        else:
            arguments[keyword.arg] = value
    return ParsedToolCall(name, arguments)


def _pythonic_calls(text: str, names: _Names) -> list[ParsedToolCall] | None:
    """``f(a=1)``, several on lines or after ``;``, or ``[f(a=1), g(b=2)]``."""
    if not names.known:
        return None
    tree = _parse_python(text, "exec")
    if not isinstance(tree, ast.Module):
        return None
    calls: list[ParsedToolCall] = []
    for statement in tree.body:
        if not isinstance(statement, ast.Expr):
            return None
        value = statement.value
        items = value.elts if isinstance(value, ast.List | ast.Tuple) else [value]
        if not items:
            return None
        for item in items:
            call = _call_from_ast(item, names)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def _xml_value(raw: str) -> Any:
    raw = raw.removeprefix("\n").removesuffix("\n")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw


def _xml_calls(text: str, names: _Names) -> list[ParsedToolCall] | None:
    """Qwen3-Coder: ``<function=name><parameter=key>value</parameter></function>``."""
    if not text.startswith("<function="):
        return None
    calls: list[ParsedToolCall] = []
    last = 0
    for match in _XML_FUNCTION_RE.finditer(text):
        if text[last : match.start()].strip():
            return None
        last = match.end()
        name = names.resolve(match.group(1))
        if name is None:
            return None
        arguments: dict[str, Any] = {}
        body_last = 0
        body = match.group(2)
        for parameter in _XML_PARAMETER_RE.finditer(body):
            if body[body_last : parameter.start()].strip():
                return None
            body_last = parameter.end()
            arguments[parameter.group(1).strip()] = _xml_value(parameter.group(2))
        if body[body_last:].strip():
            return None
        calls.append(ParsedToolCall(name, arguments))
    if text[last:].strip():
        return None
    return calls or None


def _json_calls(text: str, names: _Names) -> tuple[list[ParsedToolCall], str] | None:
    """Calls in JSON values at the start of ``text``, and the text left after them."""
    calls: list[ParsedToolCall] = []
    index = 0
    while True:
        while index < len(text) and (text[index].isspace() or text[index] in ",;"):
            index += 1
        if index >= len(text) or text[index] not in "{[":
            break
        status, end, suffix = _balanced(text, index)
        if status == "invalid":
            break
        found = _calls_from_value(_loads(text[index:end] + suffix), names)
        if found is None:
            break
        calls.extend(found)
        index = end
    if not calls:
        return None
    return calls, _STRAY_RE.sub("", text[index:])


def _unwrap(payload: str) -> str:
    text = payload.strip()
    if text.startswith(_FENCE):
        body = text[len(_FENCE) :]
        first, newline, rest = body.partition("\n")
        if newline and _LANG_RE.fullmatch(first.strip()):
            body = rest
        body = body.rstrip().removesuffix(_FENCE)
        text = body.strip()
    for tag in _OPEN_TAGS:
        text = text.removeprefix(tag)
    for tag in _CLOSE_TAGS:
        text = text.removesuffix(tag)
    return text.strip()


def _parse_payload(payload: str, names: _Names) -> tuple[list[ParsedToolCall], str] | None:
    """The calls in the body of a tag or fence, and any text left in it."""
    text = _unwrap(payload)
    if not text:
        return None
    found = _json_calls(text, names)
    if found is not None:
        return found
    for parse in (_pythonic_calls, _xml_calls):
        calls = parse(text, names)
        if calls:
            return calls, ""
    match = _NAME_THEN_ARGS_RE.fullmatch(text)
    if match:
        name = names.resolve(match.group(1))
        arguments = _arguments(match.group(2))
        if name is not None and arguments is not None:
            return [ParsedToolCall(name, arguments)], ""
    return None


def _parse_span(span: str, names: _Names) -> list[ParsedToolCall] | None:
    """The calls in one bracketed JSON value (or Python list of calls)."""
    calls = _calls_from_value(_loads(span), names)
    if calls is None and span.startswith("["):
        calls = _pythonic_calls(span, names)
    return calls


# --------------------------------------------------------------------------- #
# The scanner shared by parse_tool_calls and the stream filter

_Event = str | ParsedToolCall
_Step = tuple[int, list[_Event]]


class _AsText:
    """A step's answer: what is here is plain text after all."""


_AS_TEXT: Final = _AsText()


class _Scanner:
    """Splits text into shown text and calls, left to right, one decision at a time.

    With ``final=False`` it stops where the text so far cannot decide (a tag not
    yet closed, a prefix of a tag at the end, ...); every decision it does make
    is the one it would make given the whole text, so scanning a stream piece by
    piece yields the same events as scanning it at once.
    """

    def __init__(self, names: _Names) -> None:
        self.names = names
        self.at_start = True  # nothing but whitespace (and calls) so far
        self.line_start = True  # only whitespace since the last newline or call
        self.after_call = False  # only whitespace since the last call
        # Bracket scans under way at a position of the text not yet decided.
        self._balancers: dict[int, _Balancer] = {}

    def scan(self, text: str, final: bool) -> tuple[list[_Event], int]:
        events: list[_Event] = []
        pos = 0
        while pos < len(text):
            step = self._step(text, pos, final)
            if step is None:
                break
            pos, found = step
            for event in found:
                self._note(event)
            events.extend(found)
        if pos:
            self._balancers.clear()  # the next text starts at pos: positions move
        return events, pos

    def _balanced(self, text: str, start: int) -> _Balance:
        balancer = self._balancers.get(start)
        if balancer is None:
            balancer = self._balancers[start] = _Balancer(start)
        return balancer.run(text)

    def _note(self, event: _Event) -> None:
        if isinstance(event, ParsedToolCall):
            self.after_call = True
            self.line_start = True
            return
        blank = not event.strip()
        if not blank:
            self.at_start = False
            self.after_call = False
        _, newline, tail = event.rpartition("\n")
        self.line_start = not tail.strip() if newline else self.line_start and blank

    def _step(self, text: str, pos: int, final: bool) -> _Step | None:
        char = text[pos]
        rest = len(text) - pos
        if char == "<":
            for tag in _OPEN_TAGS:
                if text.startswith(tag, pos):
                    return self._tag(text, pos, tag, final)
            for tag in _CLOSE_TAGS:
                if text.startswith(tag, pos):
                    return pos + len(tag), []  # a stray closing tag is dropped
            if not final and any(
                len(tag) > rest and tag.startswith(text[pos:]) for tag in _ALL_TAGS
            ):
                return None
        elif char == "`":
            if text.startswith(_FENCE, pos):
                return self._fence(text, pos, final)
            if not final and rest < len(_FENCE) and _FENCE.startswith(text[pos:]):
                return None
        elif self.after_call and char in _AFTER_CALL_JUNK:
            return pos + 1, []
        elif char == "[" and (self.at_start or self.after_call):
            if text.startswith(_MISTRAL_MARKER, pos):
                return pos + len(_MISTRAL_MARKER), []
            return self._span(text, pos, final)
        elif char == "{" and self.line_start:
            return self._span(text, pos, final)
        elif self.line_start and self.names.known and (char.isalpha() or char == "_"):
            step = self._function_call(text, pos, final)
            if not isinstance(step, _AsText):
                return step
        if char.isspace():
            end = pos + 1
            while end < len(text) and text[end].isspace():
                end += 1
            return end, [text[pos:end]]
        match = _RUN_END_RE.search(text, pos + 1)
        end = (
            len(text) if match is None else match.end() if match.group() == "\n" else match.start()
        )
        return end, [text[pos:end]]

    def _calls_or_text(
        self, calls: list[ParsedToolCall] | None, raw: str, end: int, leftover: str = ""
    ) -> _Step:
        if not calls:
            return end, [raw]
        events: list[_Event] = list(calls)
        if leftover.strip():
            events.append(leftover)
        return end, events

    def _tag(self, text: str, pos: int, tag: str, final: bool) -> _Step | None:
        start = pos + len(tag)
        closes = [(at, len(t)) for t in _CLOSE_TAGS if (at := text.find(t, start)) >= 0]
        opens = [at for t in _OPEN_TAGS if (at := text.find(t, start)) >= 0]
        close_at, close_len = min(closes) if closes else (-1, 0)
        open_at = min(opens) if opens else -1
        if close_at >= 0 and (open_at < 0 or close_at < open_at):
            body, end = text[start:close_at], close_at + close_len
        elif open_at >= 0:  # the closing tag is missing before the next call
            body, end = text[start:open_at], open_at
        elif final:  # ... or at the end of the text
            body, end = text[start:], len(text)
        else:
            return None
        if not body.strip():
            return end, []
        found = _parse_payload(body, self.names)
        if found is None:
            return end, [text[pos:end]]
        return self._calls_or_text(found[0], text[pos:end], end, found[1])

    def _fence(self, text: str, pos: int, final: bool) -> _Step | None:
        start = pos + len(_FENCE)
        close_at = text.find(_FENCE, start)
        if close_at < 0 and not final:
            return None
        end = len(text) if close_at < 0 else close_at + len(_FENCE)
        body = text[start:] if close_at < 0 else text[start:close_at]
        first, newline, after = body.partition("\n")
        if newline and _LANG_RE.fullmatch(first.strip()):
            body = after
        found = _parse_payload(body, self.names)
        if found is None or found[1].strip():
            return end, [text[pos:end]]
        return self._calls_or_text(found[0], text[pos:end], end)

    def _span(self, text: str, pos: int, final: bool) -> _Step | None:
        status, end, suffix = self._balanced(text, pos)
        if status == "invalid":
            return end, [text[pos:end]]
        if status == "incomplete" and not final:
            return None
        return self._calls_or_text(
            _parse_span(text[pos:end] + suffix, self.names), text[pos:end], end
        )

    def _function_call(self, text: str, pos: int, final: bool) -> _Step | _AsText | None:
        match = _IDENT_RE.match(text, pos)
        if match is None:
            return _AS_TEXT
        ident = match.group()
        end = match.end()
        if end == len(text):
            return None if not final and self.names.may_become(ident) else _AS_TEXT
        if self.names.resolve_at_line_start(ident) is None:
            return _AS_TEXT
        paren = end
        while paren < len(text) and text[paren] in " \t":
            paren += 1
        if paren == len(text):
            return _AS_TEXT if final else None
        if text[paren] != "(":
            return _AS_TEXT
        status, close, suffix = self._balanced(text, paren)
        if status == "invalid":
            return close, [text[pos:close]]
        if status == "incomplete" and not final:
            return None
        calls = _pythonic_calls(text[pos:close] + suffix, self.names)
        return self._calls_or_text(calls, text[pos:close], close)


# --------------------------------------------------------------------------- #
# Public interface


def parse_tool_calls(
    text: str, tool_names: Collection[str] | None = None
) -> tuple[str, list[ParsedToolCall]]:
    """Split generated ``text`` into the content to show (stripped) and the tool calls.

    ``tool_names``: the tools offered. When given, calls naming any other tool
    stay in the content, and function-call syntax (``HassTurnOn(name="x")``) is
    recognised. Never raises.
    """
    value: object = text  # callers are not all typed: anything else is no text
    if not isinstance(value, str):
        return "", []
    try:
        events, _ = _Scanner(_Names(tool_names)).scan(value, final=True)
    except Exception:
        return value.strip(), []
    content = "".join(event for event in events if isinstance(event, str)).strip()
    return content, [event for event in events if isinstance(event, ParsedToolCall)]


class ToolCallStreamFilter:
    """For streaming: feed text deltas, get back the text that is safe to show now.

    Text is held back only while it may still turn out to be part of a call:
    from a tag (``<tool_call>``) or fence (three backticks) until it closes; from
    a ``{`` at the start of a line, or a ``[`` at the start of the answer, until
    the bracket closes; a line starting with (a prefix of) an offered tool's name
    until it is clear whether ``(`` follows; a ``<`` or backtick at the end of
    the buffer that may begin a tag or fence. Whitespace at the end is shown once
    more text follows it (the content is stripped). Everything shown, with what
    :meth:`finish` returns, equals the content of
    :func:`parse_tool_calls` for the whole text, and the calls are the same.
    """

    def __init__(self, tool_names: Collection[str] | None) -> None:
        self._scanner = _Scanner(_Names(tool_names))
        self._pending = ""  # text not decided yet
        self._held_space = ""  # decided whitespace, shown once text follows it
        self._shown_any = False
        self._calls: list[ParsedToolCall] = []
        self._broken = False
        self._finished = False

    def feed(self, delta: str) -> str:
        """Add generated text; return the text that can be shown now (maybe "")."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._pending += delta
        return self._advance(final=False)

    def finish(self, *, cut: bool = False) -> tuple[str, list[ParsedToolCall]]:
        """End of generation: the text still to show, and all calls found.

        ``cut`` (the answer was cut by the token limit) changes nothing here: the
        tolerant parser keeps what it can read (``guidance.GuidedAnswer`` takes it too).
        """
        if self._finished:
            return "", list(self._calls)
        shown = self._advance(final=True)
        self._finished = True
        return shown, list(self._calls)

    @property
    def tool_calls(self) -> list[ParsedToolCall]:
        """The calls found so far."""
        return list(self._calls)

    def _advance(self, final: bool) -> str:
        events: list[_Event]
        if self._broken:
            events, used = [self._pending], len(self._pending)
        else:
            try:
                events, used = self._scanner.scan(self._pending, final)
            except Exception:  # never expected; give up on finding calls
                self._broken = True
                events, used = [self._pending], len(self._pending)
        self._pending = self._pending[used:]
        return self._show(events)

    def _show(self, events: list[_Event]) -> str:
        out: list[str] = []
        for event in events:
            if isinstance(event, ParsedToolCall):
                self._calls.append(event)
                continue
            text = event if self._shown_any else event.lstrip()
            body = text.rstrip()
            if body:
                out.append(self._held_space + body)
                self._held_space = text[len(body) :]
                self._shown_any = True
            else:
                self._held_space += text
        return "".join(out)
