"""Constrained decoding: tool calls that always parse, answers that fit a schema.

onnxruntime-genai decodes under a grammar (llguidance): at each step only the
tokens that keep the text inside the grammar can be chosen. With tools offered
(and ``tool_choice`` not ``"none"``) the grammar allows either a plain answer or
tool calls in the model's own format (``ToolFormat``: Hermes ``<tool_call>``
tags, Mistral's ``[TOOL_CALLS]`` list, Llama 3's bare JSON), whose arguments are
held to each tool's JSON schema. ``tool_choice: "required"`` leaves out the plain
answer; a named tool leaves out the other tools. ``response_format`` (a JSON
schema, or any JSON object) replaces the plain answer with JSON.

Not every model can be guided: a build without llguidance, a tokenizer it
cannot read, a chat template whose call syntax is not one of the formats here.
Those are served as before, with the tolerant parser of ``tool_calls``, and
``/v1/info`` says so (``ModelGuidance.public``). A schema llguidance cannot
compile (``not``, for one) falls back the same way, for that request only.

The environment variable ``HEARTH_WORKER_GUIDANCE=off`` turns guidance off for
every model (a way out should it misbehave on some model).

A guided request of a batched model (batch_decode.py) gets from ``BatchGrammars``
an llguidance matcher of its own for the grammar genai's guidance would use (the
``llguidance`` package, the library genai's guidance is built on), set up as genai
sets up its own: the model's tokenizer.json, its vocabulary size, its first
end-of-sequence token. The matcher masks the choice of every token from the first
on; once the grammar is complete only that end-of-sequence token is left, as genai
forces it. Without the package, or for a grammar it cannot take, the request is
served on genai's guided generator.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime_genai as og

from .chat_template import TOOLS_IN_SYSTEM_FORMAT, ChatTemplate
from .tool_calls import ParsedToolCall, parse_tool_calls

_LOGGER = logging.getLogger(__name__)

GUIDANCE_ENV: Final = "HEARTH_WORKER_GUIDANCE"
GUIDANCE_TYPE: Final = "lark_grammar"
# Calls one answer may hold (several lights at once); the grammar's bound.
MAX_CALLS: Final = 8
# Grammars whose compilation was tried, per model.
CHECKED_GRAMMARS: Final = 64
# Grammars compiled for the batch (one llguidance matcher kept per grammar), per model.
BATCH_GRAMMARS: Final = 16
# JSON as the models' templates write it: no free whitespace (a small model
# given the choice fills its answer with spaces and newlines).
_JSON_LAYOUT: Final = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_EMPTY_PARAMETERS: Final = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls."""

    name: str
    opener: str  # before the calls ("" for none)
    closer: str  # after each call (tags) or the list
    separator: str  # between tagged calls
    as_list: bool  # all calls in one JSON array
    single: bool  # one call at most
    arguments_key: str
    starts: str  # characters the decoded calls begin with
    opener_token: int | None = None  # the opener as a special token, by id

    def complete_part(self, text: str) -> str:
        """The part of an answer cut by the token limit that holds whole calls only."""
        if self.closer and not self.as_list:
            end = text.rfind(self.closer.strip())
            return text[: end + len(self.closer.strip())] if end >= 0 else ""
        return ""


HERMES: Final = ToolFormat(
    "hermes", "<tool_call>\n", "\n</tool_call>", "\n", False, False, "arguments", "<"
)
MISTRAL: Final = ToolFormat("mistral", "[TOOL_CALLS]", "", "", True, False, "arguments", "[")
LLAMA3: Final = ToolFormat("llama3", "", "", "", False, True, "parameters", "{")
FORMATS: Final = {f.name: f for f in (HERMES, MISTRAL, LLAMA3)}


def _special_in(data: dict[str, Any]) -> dict[str, int]:
    """Added tokens marked special in a tokenizer.json's data, by text."""
    return {
        str(token["content"]): int(token["id"])
        for token in data.get("added_tokens") or []
        if token.get("special")
    }


def _special_tokens(tokenizer_json: Path) -> dict[str, int]:
    """Added tokens marked special in a tokenizer.json, by text ({}: unreadable)."""
    try:
        return _special_in(json.loads(tokenizer_json.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def detect_format(template: ChatTemplate, tokenizer_json: Path) -> ToolFormat | None:
    """The tool-call format a model's chat template teaches, if it is one of FORMATS."""
    if not template.supports_tools:  # the tools go in the system message, Hermes-style
        return FORMATS[TOOLS_IN_SYSTEM_FORMAT]
    source = template.source
    special = _special_tokens(tokenizer_json)
    if "<function=" in source:  # Qwen3-Coder: arguments as XML, not JSON
        return None
    if "<tool_call>" in source:
        if "<tool_call>" in special or "</tool_call>" in special:
            return None  # tags the decoded text would not show
        return HERMES
    if "[TOOL_CALLS]" in source:
        token = special.get("[TOOL_CALLS]")
        return MISTRAL if token is None else _with_token(MISTRAL, token)
    if '"parameters": dictionary of argument name' in source:
        return LLAMA3
    return None


def _with_token(fmt: ToolFormat, token: int) -> ToolFormat:
    return ToolFormat(
        fmt.name,
        fmt.opener,
        fmt.closer,
        fmt.separator,
        fmt.as_list,
        fmt.single,
        fmt.arguments_key,
        fmt.starts,
        token,
    )


# --------------------------------------------------------------------------- #
# Grammars


def _lark_string(text: str) -> str:
    return json.dumps(text)


def _json_rule(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT}, ensure_ascii=False)


def call_schema(tool: dict[str, Any], arguments_key: str = "arguments") -> dict[str, Any]:
    """The JSON schema of one call of ``tool`` (OpenAI's tool definition).

    Arguments are an object. Where the tool's schema lists its properties and says
    nothing of others, the call holds only those: a small model otherwise invents
    keys, and Home Assistant's intent tools refuse keys they do not know. Still
    valid against the tool's own schema, which allows more.
    """
    function = tool["function"]
    parameters = function.get("parameters") or _EMPTY_PARAMETERS
    if "type" not in parameters:
        parameters = {**parameters, "type": "object"}
    if isinstance(parameters.get("properties"), dict) and "additionalProperties" not in parameters:
        parameters = {**parameters, "additionalProperties": False}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def _calls_rules(tools: list[dict[str, Any]], fmt: ToolFormat) -> list[str]:
    schemas = [call_schema(tool, fmt.arguments_key) for tool in tools]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if fmt.as_list:
        array = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_CALLS}
        if fmt.opener_token is not None:
            opener = f"<[{fmt.opener_token}]> "
        else:
            opener = f"{_lark_string(fmt.opener)} " if fmt.opener else ""
        return [f"calls: {opener}{_json_rule(array)}"]
    if fmt.single:
        return [f"calls: {_json_rule(one)}"]
    repeat = f"({_lark_string(fmt.separator)} call){{0,{MAX_CALLS - 1}}}"
    return [
        f"calls: call {repeat}",
        f"call: {_lark_string(fmt.opener)} {_json_rule(one)} {_lark_string(fmt.closer)}",
    ]


def _text_rule(fmt: ToolFormat | None) -> str:
    """Plain text: not starting with whitespace or the way calls start, no tags in it."""
    starts = "".join(sorted(set((fmt.starts if fmt else "") + "<{")))
    rule = f"TEXT: /[^\\s{_regex_class(starts)}](.|\\n)*/"
    if fmt is not None and fmt.opener.strip() and fmt.opener_token is None:
        rule += f" & ~/(.|\\n)*{_regex_escape(fmt.opener.strip())}(.|\\n)*/"
    return rule


def _regex_class(chars: str) -> str:
    return "".join("\\" + c if c in "\\]^-[" else c for c in chars)


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\/" else c for c in text)


@dataclass(frozen=True)
class Guide:
    """The grammar of one request, and how to read what it produced."""

    grammar: str
    text: bool  # a plain answer is allowed
    answer_json: bool  # the answer is JSON (response_format)
    calls: bool  # tool calls are allowed
    tool_format: ToolFormat | None
    tool_names: tuple[str, ...]

    @property
    def guidance(self) -> tuple[str, str]:
        """(type, data) for GeneratorParams.set_guidance."""
        return GUIDANCE_TYPE, self.grammar

    def reader(self) -> GuidedAnswer:
        return GuidedAnswer(self)


def build_guide(
    *,
    tools: list[dict[str, Any]],
    tool_choice: str,
    tool_name: str | None,
    response_format: dict[str, Any] | None,
    tool_format: ToolFormat | None,
) -> Guide | None:
    """The grammar for a request, or None when nothing is to be constrained.

    ``tools`` are the offered tools (already empty for ``tool_choice: "none"``);
    ``response_format`` is ``{"type": "json_object"}``, ``{"type": "json_schema",
    "schema": {...}}`` or None/``{"type": "text"}``.
    """
    answer_schema: dict[str, Any] | None = None
    if response_format and response_format.get("type") == "json_object":
        answer_schema = {"type": "object"}
    elif response_format and response_format.get("type") == "json_schema":
        schema = response_format.get("schema")
        answer_schema = schema if isinstance(schema, dict) else {}
    if tool_name is not None:
        tools = [tool for tool in tools if tool["function"]["name"] == tool_name]
    use_tools = bool(tools) and tool_format is not None
    forced = use_tools and tool_choice == "required"
    if not use_tools and answer_schema is None:
        return None
    rows: list[str] = []
    alternatives: list[str] = []
    if not forced:
        if answer_schema is not None:
            alternatives.append("answer")
            rows.append(f"answer: {_json_rule(answer_schema)}")
        else:
            alternatives.append("TEXT")
            rows.append(_text_rule(tool_format))
    if use_tools:
        assert tool_format is not None
        alternatives.append("calls")
        rows += _calls_rules(tools, tool_format)
    grammar = "\n".join([f"start: {' | '.join(alternatives)}", *rows]) + "\n"
    return Guide(
        grammar=grammar,
        text=not forced and answer_schema is None,
        answer_json=not forced and answer_schema is not None,
        calls=use_tools,
        tool_format=tool_format if use_tools else None,
        tool_names=tuple(tool["function"]["name"] for tool in tools) if use_tools else (),
    )


# --------------------------------------------------------------------------- #
# Reading a guided answer


class GuidedAnswer:
    """Splits a guided answer into text and calls, streamed or whole.

    The grammar leaves two kinds of answer: plain text (or JSON), which is shown
    as it comes, or tool calls, held back until the end. The first character
    tells which. The calls are parsed with ``tool_calls.parse_tool_calls``; the
    grammar made them exact JSON, so they are what the model wrote. An answer
    cut by the token limit keeps only its whole calls.
    """

    def __init__(self, guide: Guide) -> None:
        self._guide = guide
        self._starts = guide.tool_format.starts if guide.tool_format and guide.calls else ""
        self._mode = "" if self._starts else "text"  # "" undecided, "text" or "calls"
        self._pending = ""
        self._held_space = ""
        self._shown_any = False
        self.tool_calls: list[ParsedToolCall] = []

    def feed(self, delta: str) -> str:
        """Add generated text; return the text that can be shown now (maybe "")."""
        if self._mode == "text":
            return self._show(delta)
        self._pending += delta
        if self._mode == "":
            begun = self._pending.lstrip()
            if not begun:
                return ""
            if begun[0] in self._starts:
                self._mode = "calls"
                return ""
            self._mode = "text"
            text, self._pending = self._pending, ""
            return self._show(text)
        return ""

    def finish(self, *, cut: bool) -> tuple[str, list[ParsedToolCall]]:
        """End of the answer (``cut``: by the token limit): text still to show, and calls."""
        if self._mode != "calls":
            text, self._pending = self._pending, ""
            return self._show(text), []
        text, self._pending = self._pending, ""
        fmt = self._guide.tool_format
        assert fmt is not None
        whole = fmt.complete_part(text) if cut else text
        content, calls = parse_tool_calls(whole, self._guide.tool_names)
        if calls and not content:
            self.tool_calls = calls
            return "", calls
        if cut or not self._guide.answer_json:
            return "", []  # a call broken off by the token limit is no call
        return self._show(text), []  # JSON that is the answer, not a call

    def _show(self, text: str) -> str:
        if not self._shown_any:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self._held_space += text
            return ""
        out = self._held_space + body
        self._held_space = text[len(body) :]
        self._shown_any = True
        return out


# --------------------------------------------------------------------------- #
# What a model can do


def _generator_with(model: og.Model, grammar_type: str, grammar: str) -> None:
    """Build (and drop) a generator under the grammar: raises what the model would."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=8)
    params.set_guidance(grammar_type, grammar)
    generator = og.Generator(model, params)
    del generator


def probe(model: og.Model) -> str | None:
    """Why guidance cannot be used with this model, or None when it can."""
    if os.environ.get(GUIDANCE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return f"turned off ({GUIDANCE_ENV})"
    try:
        _generator_with(model, "regex", "[a-z]+")
    except Exception as err:  # a build without llguidance, a tokenizer it cannot read
        return f"{type(err).__name__}: {err}"
    return None


class ModelGuidance:
    """Guidance for one loaded model: whether it works, its call format, grammars tried."""

    def __init__(self, model: og.Model, template: ChatTemplate, model_dir: Path) -> None:
        self._model = model
        self.unsupported = probe(model)
        self.tool_format = detect_format(template, model_dir / "tokenizer.json")
        self._checked: OrderedDict[str, str | None] = OrderedDict()
        self._lock = threading.Lock()
        if self.unsupported:
            _LOGGER.warning(
                "Model %s: no constrained decoding (%s); tool calls parsed as written",
                model_dir.name,
                self.unsupported,
            )

    @property
    def supported(self) -> bool:
        return self.unsupported is None

    def public(self) -> dict[str, Any]:
        """What /v1/info tells: whether answers are guided, and the call format."""
        return {
            "guidance": self.supported,
            "tool_call_format": self.tool_format.name if self.tool_format else None,
        }

    def plan(
        self,
        *,
        tools: list[dict[str, Any]],
        tool_choice: str,
        tool_name: str | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> Guide | None:
        """The guide for a request, or None (nothing to constrain, or it cannot be).

        Blocking on a grammar not seen before (it is compiled once to check it):
        run it in an executor.
        """
        if not self.supported:
            return None
        guide = build_guide(
            tools=tools,
            tool_choice=tool_choice,
            tool_name=tool_name,
            response_format=response_format,
            tool_format=self.tool_format,
        )
        if guide is None:
            return None
        error = self._check(guide.grammar)
        if error is not None:
            _LOGGER.warning("Answer not guided: the grammar does not compile (%s)", error)
            return None
        return guide

    def _check(self, grammar: str) -> str | None:
        with self._lock:
            if grammar in self._checked:
                self._checked.move_to_end(grammar)
                return self._checked[grammar]
        try:
            _generator_with(self._model, GUIDANCE_TYPE, grammar)
            error = None
        except Exception as err:
            error = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        with self._lock:
            self._checked[grammar] = error
            while len(self._checked) > CHECKED_GRAMMARS:
                self._checked.popitem(last=False)
        return error


# --------------------------------------------------------------------------- #
# Guided requests in the decode batch


class GrammarMatcher:
    """One request's grammar in the batch: the tokens it allows next (batch_decode.TokenGuide)."""

    def __init__(self, matcher: Any, eos: int) -> None:
        self._matcher = matcher  # llguidance.LLMatcher
        self._eos = eos

    def allowed(self, vocab: int) -> npt.NDArray[np.bool_]:
        """The tokens the grammar allows next; only the end of sequence once it is
        complete (as genai's guidance forces it)."""
        matcher = self._matcher
        if matcher.is_error():
            raise RuntimeError(f"grammar matcher: {matcher.get_error()}")
        out = np.zeros(vocab, np.bool_)
        if matcher.is_stopped():
            out[self._eos] = True
            return out
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
        n = min(vocab, int(bits.shape[0]))
        out[:n] = bits[:n].astype(np.bool_)
        return out

    def consume(self, token: int) -> None:
        """`token` was chosen."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar matcher: {self._matcher.get_error()}")


class _Vocabulary:
    """A tokenizer.json's tokens for llguidance (its TokenizerWrapper's protocol).

    As genai's guidance reads them: an added token not marked special (a
    ``<tool_call>`` tag in a model's vocabulary) is text. llguidance 1.9.1, reading
    the tokenizer.json itself, takes every added token for a special one, which
    would forbid those tags.
    """

    def __init__(self, text: str, vocab_size: int, eos: int) -> None:
        import llguidance  # noqa: PLC0415  (optional: guided requests stay alone without it)
        import tokenizers  # noqa: PLC0415

        read = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos)
        self.tokens = [read.decode_bytes([token]) for token in range(vocab_size)]
        self.special_token_ids = sorted(_special_in(json.loads(text)).values())
        self.eos_token_id = eos
        self.bos_token_id = None
        self._tokenizer = tokenizers.Tokenizer.from_str(text)

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # llguidance asks: bytes or str
            raise TypeError("text only")
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)


def _llg_tokenizer(text: str, vocab_size: int, eos: int) -> Any:
    import llguidance  # noqa: PLC0415
    from llguidance._tokenizer import TokenizerWrapper  # noqa: PLC0415

    vocabulary = TokenizerWrapper(_Vocabulary(text, vocab_size, eos))
    return llguidance.LLTokenizer(vocabulary, n_vocab=vocab_size, eos_token=eos)


class BatchGrammars:
    """llguidance matchers for one model's guided requests decoding in the batch.

    The tokenizer is built once, in the background (`prepare()`: the worker starts it
    after warming the model up; 0.85 s for a 49k vocabulary), or by the first guided
    request, which waits for it; each grammar once (a matcher kept per grammar
    text, copied for each request).
    """

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos: int) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = eos
        self._lock = threading.Lock()  # the compiled grammars
        self._start_lock = threading.Lock()
        self._started = False
        self._ready = threading.Event()  # the tokenizer is built, or failed
        self._tokenizer: Any = None
        self._failed: str | None = None  # why there is no tokenizer
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def prepare(self) -> None:
        """Start building the tokenizer in the background (once; returns at once)."""
        with self._start_lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._build, name="llguidance-tokenizer", daemon=True).start()

    def _build(self) -> None:
        try:
            text = self._tokenizer_json.read_text(encoding="utf-8")
            self._tokenizer = _llg_tokenizer(text, self._vocab_size, self._eos)
        except Exception as err:
            self._failed = f"{type(err).__name__}: {err}"
            _LOGGER.debug("Guided requests not batched: %s", self._failed)
        finally:
            self._ready.set()

    def _llg_tokenizer(self) -> Any:
        """The llguidance tokenizer (waits for it); raises when there is none."""
        self.prepare()
        self._ready.wait()
        if self._tokenizer is None:
            raise RuntimeError(f"no llguidance tokenizer ({self._failed})")
        return self._tokenizer

    def refused(self, guidance: tuple[str, str]) -> bool:
        """Whether a request under this grammar is known not to batch (no tokenizer, or
        the grammar failed to build); never blocks. Starts the tokenizer's build."""
        self.prepare()
        if self._ready.is_set() and self._tokenizer is None:
            return True
        with self._lock:
            return guidance in self._compiled and self._compiled[guidance] is None

    def _compile(self, guidance: tuple[str, str]) -> Any:
        """A fresh llguidance matcher for the grammar (raises when it cannot be built)."""
        import llguidance  # noqa: PLC0415

        kind, data = guidance
        if kind == GUIDANCE_TYPE:
            grammar = llguidance.LLMatcher.grammar_from_lark(data)
        elif kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(data)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(data)
        else:
            raise ValueError(f"guidance type {kind!r}")
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def _template(self, guidance: tuple[str, str]) -> Any:
        """The grammar's matcher at its start (compiled once, kept); None: it cannot be."""
        with self._lock:
            if guidance in self._compiled:
                self._compiled.move_to_end(guidance)
                return self._compiled[guidance]
        try:  # outside the lock (it may wait for the tokenizer); twice at worst
            matcher = self._compile(guidance)
        except Exception as err:
            _LOGGER.debug("Guided request not batched: %s", err)
            matcher = None
        with self._lock:
            self._compiled[guidance] = matcher
            while len(self._compiled) > BATCH_GRAMMARS:
                self._compiled.popitem(last=False)
            return matcher

    def matcher(self, guidance: tuple[str, str]) -> GrammarMatcher | None:
        """A matcher for one request, at the grammar's start (None: not batched)."""
        template = self._template(guidance)
        return None if template is None else GrammarMatcher(template.deep_copy(), self._eos)
