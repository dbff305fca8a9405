"""Renders a model's Jinja chat template (messages + tools) the way transformers does.

The worker never imports transformers, so this module reproduces what
``PreTrainedTokenizerBase.apply_chat_template`` does with jinja2 alone: the same
sandboxed environment, the same globals and ``tojson`` filter, the same choice
between named templates, and the special tokens as template variables.

OpenAI-shaped messages are normalised first: content given as a list of text
parts becomes one string, ``None`` content becomes ``""``, and assistant
``tool_calls`` get their ``function.arguments`` JSON string decoded to a dict,
which is what Hugging Face templates expect.

A template that does not read ``tools`` (SmolLM2-135M's, for one) would drop
them: the model would never learn which tools there are. For such a template the
tools are described in the system message instead, Hermes-style, and the model
is asked to call them in ``<tool_call>`` tags (``TOOLS_IN_SYSTEM_FORMAT``).
"""

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Self

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

__all__ = ["TOOLS_IN_SYSTEM_FORMAT", "ChatTemplate", "ChatTemplateError", "tools_system_text"]


class ChatTemplateError(ValueError):
    """The chat template cannot be loaded, or cannot render this conversation.

    The server answers a request that fails this way with 400.
    """


# The named special tokens transformers passes to every chat template.
_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

_DEFAULT = "default"
_TOOL_USE = "tool_use"

# Used when a model ships no chat template: ChatML, with tools offered and
# called the Hermes way (the format Qwen2.5 and Hermes models are trained on).
BUILTIN_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages and messages[0].role == 'system' and messages[0].content %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
    {{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": ' + tool_call.name | tojson + ', "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- (tool_call.arguments if tool_call.arguments is defined else {}) | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


# For templates that do not read `tools`: the tools offered in the system
# message, asking for Hermes-style calls (the format of BUILTIN_TEMPLATE).
TOOLS_IN_SYSTEM_FORMAT = "hermes"
_TOOLS_IN_SYSTEM_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_IN_SYSTEM_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def tools_system_text(tools: list[Any]) -> str:
    """The tools described for a system message, Hermes-style."""
    listed = "".join("\n" + _tojson(tool) for tool in tools)
    return _TOOLS_IN_SYSTEM_HEAD + listed + _TOOLS_IN_SYSTEM_TAIL


def _with_tools_in_system(chat: list[dict[str, Any]], tools: list[Any]) -> list[dict[str, Any]]:
    text = tools_system_text(tools)
    if chat and chat[0].get("role") == "system":
        first = chat[0]
        content = f"{first['content']}\n\n{text}" if first["content"] else text
        return [{**first, "content": content}, *chat[1:]]
    return [{"role": "system", "content": text}, *chat]


# --------------------------------------------------------------------------- #
# The Jinja environment, as transformers builds it.


def _raise_exception(message: object) -> NoReturn:
    raise jinja2.exceptions.TemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` for templates, without handing them the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` that refuses underscore names, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})"
            )


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = _environment()


def _compile(name: str, source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"chat template {name!r} is not valid Jinja (line {err.lineno}): {err.message}"
        ) from err
    except Exception as err:
        raise ChatTemplateError(f"chat template {name!r} cannot be compiled: {err}") from err


# --------------------------------------------------------------------------- #
# Inputs: plain data only, messages in the shape Hugging Face templates expect.


def _plain(value: Any) -> Any:
    """A fresh copy made of JSON types only, so templates see nothing else."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


def _text_content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatTemplateError(f"{where}: a text part has no string 'text'")
                texts.append(text)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(
                    f"{where}: content parts of type {kind!r} are not supported"
                )
        return "\n".join(texts)
    raise ChatTemplateError(f"{where}: content must be a string or a list of text parts")


def _tool_call(call: Any) -> Any:
    """An OpenAI tool call with ``function.arguments`` decoded to a dict where it can be."""
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if isinstance(function, dict):
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                decoded = json.loads(arguments)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                function = {**function, "arguments": decoded}
        elif arguments is None and "name" in function:
            function = {**function, "arguments": {}}
        call = {**call, "function": function}
    return call


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _message(raw: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        raise ChatTemplateError(f"{where} must be an object")
    # Like transformers: a key whose value is None is treated as absent...
    message: dict[str, Any] = {
        key: value for key, value in _plain(raw).items() if value is not None
    }
    # ... except content, which templates concatenate, so it is always a string.
    message["content"] = _text_content(message.get("content"), where)
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        message["tool_calls"] = [_tool_call(call) for call in tool_calls]
    # Reasoning under its older names is also given as reasoning_content (and
    # thinking, which gpt-oss templates read), as transformers does.
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


# --------------------------------------------------------------------------- #
# Reading a model folder.


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ChatTemplateError(f"cannot read {path.name}: {err}") from err
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path.name} does not hold a JSON object")
    return data


def _templates_from_value(value: Any, source: str) -> dict[str, str]:
    """``chat_template`` as stored in JSON: a string, a list of {name, template}, or a map."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {_DEFAULT: value}
    if isinstance(value, list):
        templates: dict[str, str] = {}
        for entry in value:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ChatTemplateError(
                    f"{source}: each chat_template entry needs a string name and template"
                )
            templates[entry["name"]] = entry["template"]
        return templates
    if isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return dict(value)
    raise ChatTemplateError(f"{source}: chat_template must be a string or a list of templates")


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for name in _SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if text is not None:
            tokens[name] = text
    return tokens


# --------------------------------------------------------------------------- #


class ChatTemplate:
    """A model's chat template, ready to render OpenAI-shaped conversations."""

    def __init__(
        self,
        templates: Mapping[str, str],
        special_tokens: Mapping[str, str] | None = None,
        *,
        builtin: bool = False,
    ) -> None:
        if not templates:
            raise ChatTemplateError("no chat template given")
        self._sources = dict(templates)
        self._compiled = {name: _compile(name, source) for name, source in templates.items()}
        # A list without a "default" entry: the first one listed is used.
        self._default = _DEFAULT if _DEFAULT in self._compiled else next(iter(self._compiled))
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.builtin = builtin

    @classmethod
    def from_string(cls, template: str, **special_tokens: str) -> Self:
        return cls({_DEFAULT: template}, special_tokens)

    @classmethod
    def builtin_template(cls, **special_tokens: str) -> Self:
        """The ChatML template with Hermes-style tools, for models that ship none."""
        return cls({_DEFAULT: BUILTIN_TEMPLATE}, special_tokens, builtin=True)

    @classmethod
    def from_model_dir(cls, path: Path) -> Self:
        """The template of a model folder, as transformers would load it.

        ``chat_template.jinja`` (plus any ``additional_chat_templates/*.jinja``)
        if present, else ``chat_template`` in ``tokenizer_config.json``, else
        ``chat_template.json``; the built-in template when there is none. Special
        tokens come from ``tokenizer_config.json`` (and ``special_tokens_map.json``).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist")

        config_path = path / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        special_tokens: dict[str, str] = {}
        map_path = path / "special_tokens_map.json"
        if map_path.is_file():
            special_tokens.update(_special_tokens(_read_json(map_path)))
        special_tokens.update(_special_tokens(config))

        templates: dict[str, str] = {}
        jinja_path = path / "chat_template.jinja"
        if jinja_path.is_file():
            templates[_DEFAULT] = _read_text(jinja_path)
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for extra in sorted(extra_dir.glob("*.jinja")):
                templates[extra.stem] = _read_text(extra)
        if not templates:
            templates = _templates_from_value(config.get("chat_template"), config_path.name)
        legacy_path = path / "chat_template.json"
        if not templates and legacy_path.is_file():
            templates = _templates_from_value(
                _read_json(legacy_path).get("chat_template"), legacy_path.name
            )
        if not templates:
            return cls({_DEFAULT: BUILTIN_TEMPLATE}, special_tokens, builtin=True)
        return cls(templates, special_tokens)

    @property
    def source(self) -> str:
        """The text of the template used for requests without tools."""
        return self._sources[self._default]

    @property
    def supports_tools(self) -> bool:
        """Whether the template (or its tool_use variant) reads ``tools`` at all."""
        return _TOOL_USE in self._sources or "tools" in self._sources[self._default]

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """The prompt text for ``messages``.

        ``tools`` are OpenAI tool definitions (``{"type": "function", "function":
        {...}}``), passed to the template as they are; an empty list counts as
        none. A template that does not read them gets them in the system message.
        ``template_vars`` (e.g. ``enable_thinking=False``) are extra template
        variables and win over the special tokens, as in transformers.
        """
        if not isinstance(messages, list) or not messages:
            raise ChatTemplateError("messages must be a non-empty list")
        chat = [_message(message, index) for index, message in enumerate(messages)]
        tool_schemas: list[Any] | None = None
        if tools:
            if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
                raise ChatTemplateError("tools must be a list of objects")
            tool_schemas = _plain(tools)

        if tool_schemas is not None and not self.supports_tools:
            chat = _with_tools_in_system(chat, tool_schemas)
        name = _TOOL_USE if tool_schemas is not None and _TOOL_USE in self._compiled else None
        name = name or self._default
        variables = {
            "documents": None,
            **self.special_tokens,
            **_plain(template_vars),
            "messages": chat,
            "tools": tool_schemas,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled[name].render(variables)
        except jinja2.exceptions.TemplateError as err:
            # raise_exception() in the template lands here with the template's message.
            raise ChatTemplateError(f"chat template rejected the conversation: {err}") from err
        except Exception as err:
            raise ChatTemplateError(
                f"chat template failed on this conversation: {type(err).__name__}: {err}"
            ) from err


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise ChatTemplateError(f"cannot read {path.name}: {err}") from err
