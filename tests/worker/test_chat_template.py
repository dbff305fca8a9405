"""Chat templates rendered the way transformers renders them, without transformers."""

# The model templates below keep their real, long lines.
# ruff: noqa: E501

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hearth_worker.chat_template import ChatTemplate, ChatTemplateError

# Modelled on Qwen2.5-Instruct's template (Hermes-style tools, ChatML).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Modelled on Llama 3.2-Instruct's template: bos_token, strftime_now, tools in
# the first user message with tojson(indent=4), raise_exception.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

TURN_ON = {
    "type": "function",
    "function": {
        "name": "HassTurnOn",
        "description": "Turns on a device",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "area": {"type": "string"}},
        },
    },
}

TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You control the house."},
    {"role": "user", "content": "Turn on the Küche light"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "HassTurnOn", "arguments": '{"name": "Küche", "area": "EG"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"success": true}'},
]

# TOOL_CONVERSATION with TURN_ON offered, as Qwen 2.5's template (Hermes style) renders it.
TOOL_PROMPT = (
    "<|im_start|>system\nYou control the house.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "HassTurnOn", "description": '
    '"Turns on a device", "parameters": {"type": "object", "properties": '
    '{"name": {"type": "string"}, "area": {"type": "string"}}}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nTurn on the Küche light<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "HassTurnOn", "arguments": {"name": "Küche", "area": "EG"}}\n'
    "</tool_call><|im_end|>\n"
    '<|im_start|>user\n<tool_response>\n{"success": true}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n"
)


def write_model(folder: Path, files: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, str) else json.dumps(content)
        target.write_text(text, encoding="utf-8")
    return folder


# --------------------------------------------------------------------------- #
# Built-in fallback


def test_builtin_fallback_when_model_has_no_template(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {"tokenizer_config.json": {"eos_token": "</s>"}})
    template = ChatTemplate.from_model_dir(model)
    assert template.builtin
    assert template.special_tokens == {"eos_token": "</s>"}
    prompt = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_builtin_fallback_without_any_files(tmp_path: Path) -> None:
    template = ChatTemplate.from_model_dir(tmp_path)
    assert template.builtin
    assert template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_builtin_fallback_offers_and_replays_tools_hermes_style() -> None:
    prompt = ChatTemplate.builtin_template().render(TOOL_CONVERSATION, tools=[TURN_ON])
    assert prompt == TOOL_PROMPT  # as Qwen 2.5's own template renders it


def test_builtin_fallback_keeps_unparseable_arguments_as_given() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": "Trying.",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
            ],
        },
    ]
    prompt = ChatTemplate.builtin_template().render(messages, add_generation_prompt=False)
    assert (
        '<|im_start|>assistant\nTrying.\n<tool_call>\n{"name": "f", "arguments": {oops}' in prompt
    )


# --------------------------------------------------------------------------- #
# Qwen2.5-style template with tools


def test_qwen25_template_with_tools(tmp_path: Path) -> None:
    model = write_model(
        tmp_path,
        {
            "chat_template.jinja": QWEN25_TEMPLATE,
            "tokenizer_config.json": {
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": "ignored because chat_template.jinja exists",
            },
        },
    )
    template = ChatTemplate.from_model_dir(model)
    assert not template.builtin
    assert template.supports_tools
    assert template.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    prompt = template.render(TOOL_CONVERSATION, tools=[TURN_ON])
    assert prompt == TOOL_PROMPT


def test_qwen25_template_without_tools_uses_its_default_system_prompt() -> None:
    template = ChatTemplate.from_string(QWEN25_TEMPLATE, eos_token="<|im_end|>")
    prompt = template.render([{"role": "user", "content": "Hello"}], tools=[])
    assert prompt == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multiple_tool_responses_are_grouped_in_one_user_turn() -> None:
    messages = [
        *TOOL_CONVERSATION[:3],
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": "two"},
    ]
    prompt = ChatTemplate.from_string(QWEN25_TEMPLATE).render(messages, add_generation_prompt=False)
    assert prompt.endswith(
        "<|im_start|>user\n<tool_response>\none\n</tool_response>"
        "\n<tool_response>\ntwo\n</tool_response><|im_end|>\n"
    )


# --------------------------------------------------------------------------- #
# Llama-3-style template with bos_token


def llama_model(tmp_path: Path) -> ChatTemplate:
    model = write_model(
        tmp_path,
        {
            "tokenizer_config.json": {
                "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "special": True},
                "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>"},
                "model_max_length": 131072,
                "chat_template": LLAMA3_TEMPLATE,
            }
        },
    )
    return ChatTemplate.from_model_dir(model)


def test_llama3_template_with_bos_token(tmp_path: Path) -> None:
    template = llama_model(tmp_path)
    assert template.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    prompt = template.render(
        [{"role": "system", "content": " Be nice. "}, {"role": "user", "content": "Hi there\n"}],
        date_string="23 Nov 2026",
    )
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 23 Nov 2026\n\n"
        "Be nice.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_template_with_tools_and_strftime_now(tmp_path: Path) -> None:
    template = llama_model(tmp_path)
    before = datetime.now().strftime("%d %b %Y")
    prompt = template.render(TOOL_CONVERSATION[1:], tools=[TURN_ON])
    after = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {before}\n" in prompt or f"Today Date: {after}\n" in prompt
    assert "Environment: ipython\n" in prompt
    assert json.dumps(TURN_ON, indent=4) + "\n\nTurn on the Küche light<|eot_id|>" in prompt
    assert (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "HassTurnOn", "parameters": {"name": "Küche", "area": "EG"}}<|eot_id|>'
    ) in prompt
    # Llama's template tojson-s string tool results (a string is iterable).
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"success\\": true}"<|eot_id|>' in (
        prompt
    )


def test_raise_exception_becomes_chat_template_error(tmp_path: Path) -> None:
    template = llama_model(tmp_path)
    messages = copy.deepcopy(TOOL_CONVERSATION)
    messages[2]["tool_calls"].append(messages[2]["tool_calls"][0])
    with pytest.raises(ChatTemplateError, match="only supports single tool-calls at once"):
        template.render(messages)


# --------------------------------------------------------------------------- #
# Several templates in tokenizer_config.json


TOOL_USE_TEMPLATE = (
    "TOOLS:{% for tool in tools %}{{ tool.function.name }};{% endfor %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
)
DEFAULT_TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def test_template_list_picks_default_and_tool_use(tmp_path: Path) -> None:
    model = write_model(
        tmp_path,
        {
            "tokenizer_config.json": {
                "bos_token": "<s>",
                "chat_template": [
                    {"name": "rag", "template": "RAG"},
                    {"name": "default", "template": DEFAULT_TEMPLATE},
                    {"name": "tool_use", "template": TOOL_USE_TEMPLATE},
                ],
            }
        },
    )
    template = ChatTemplate.from_model_dir(model)
    messages = [{"role": "user", "content": "hi"}]
    assert template.source == DEFAULT_TEMPLATE
    assert template.supports_tools
    assert template.render(messages) == "<s><user>hi"
    assert template.render(messages, tools=[]) == "<s><user>hi"
    assert template.render(messages, tools=[TURN_ON]) == "TOOLS:HassTurnOn;[user]hi"


def test_template_list_without_default_uses_the_first(tmp_path: Path) -> None:
    model = write_model(
        tmp_path,
        {"tokenizer_config.json": {"chat_template": [{"name": "a", "template": "A"}]}},
    )
    assert ChatTemplate.from_model_dir(model).render([{"role": "user", "content": ""}]) == "A"


def test_malformed_template_list_is_an_error(tmp_path: Path) -> None:
    model = write_model(tmp_path, {"tokenizer_config.json": {"chat_template": [{"name": "a"}]}})
    with pytest.raises(ChatTemplateError, match="chat_template"):
        ChatTemplate.from_model_dir(model)


def test_additional_chat_templates_folder(tmp_path: Path) -> None:
    model = write_model(
        tmp_path,
        {
            "chat_template.jinja": DEFAULT_TEMPLATE,
            "additional_chat_templates/tool_use.jinja": TOOL_USE_TEMPLATE,
            "special_tokens_map.json": {"bos_token": {"content": "<B>"}},
        },
    )
    template = ChatTemplate.from_model_dir(model)
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages) == "<B><user>hi"
    assert template.render(messages, tools=[TURN_ON]) == "TOOLS:HassTurnOn;[user]hi"


def test_legacy_chat_template_json(tmp_path: Path) -> None:
    model = write_model(tmp_path, {"chat_template.json": {"chat_template": "LEGACY"}})
    assert ChatTemplate.from_model_dir(model).render([{"role": "user", "content": ""}]) == "LEGACY"


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ChatTemplate.from_model_dir(tmp_path / "nope")


def test_unreadable_tokenizer_config(tmp_path: Path) -> None:
    model = write_model(tmp_path, {"tokenizer_config.json": "{not json"})
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json"):
        ChatTemplate.from_model_dir(model)


# --------------------------------------------------------------------------- #
# Message normalisation

ECHO = (
    "{% for m in messages %}{{ m.role }}={{ m.content | tojson }}"
    "{% if m.tool_calls is defined %} calls={{ m.tool_calls | tojson }}{% endif %};{% endfor %}"
)


def test_content_parts_are_joined_and_none_becomes_empty() -> None:
    template = ChatTemplate.from_string(ECHO)
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "user"},
    ]
    before = copy.deepcopy(messages)
    assert template.render(messages) == 'user="a\\nb";assistant="";user="";'
    assert messages == before  # the caller's messages are untouched


def test_openai_tool_calls_are_given_as_hf_expects() -> None:
    template = ChatTemplate.from_string(ECHO)
    messages: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "a", "arguments": '{"x": [1, 2]}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "nope"}},
                {"id": "c3", "type": "function", "function": {"name": "c", "arguments": "[1]"}},
                {"id": "c4", "type": "function", "function": {"name": "d", "arguments": {"y": 1}}},
            ],
        }
    ]
    rendered = template.render(messages)
    calls = json.loads(rendered.split("calls=", 1)[1].rstrip(";"))
    assert calls == [
        {"id": "c1", "type": "function", "function": {"name": "a", "arguments": {"x": [1, 2]}}},
        {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "nope"}},
        {"id": "c3", "type": "function", "function": {"name": "c", "arguments": "[1]"}},
        {"id": "c4", "type": "function", "function": {"name": "d", "arguments": {"y": 1}}},
    ]


def test_none_valued_keys_are_dropped_like_transformers() -> None:
    template = ChatTemplate.from_string(ECHO)
    assert template.render([{"role": "assistant", "content": "x", "tool_calls": None}]) == (
        'assistant="x";'
    )


def test_reasoning_fields_are_aliased() -> None:
    template = ChatTemplate.from_string(
        "{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }}{% endfor %}"
    )
    assert template.render([{"role": "assistant", "content": "", "reasoning": "hmm"}]) == "hmm|hmm"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty"),
        (["hello"], r"messages\[0\] must be an object"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "'image_url' are not supported",
        ),
        ([{"role": "user", "content": 5}], "content must be a string"),
    ],
)
def test_bad_messages(messages: list[Any], match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate.builtin_template().render(messages)


# --------------------------------------------------------------------------- #
# The Jinja environment


def test_tojson_matches_transformers() -> None:
    template = ChatTemplate.from_string(
        "{{ messages[0].content | tojson }}|{{ tools | tojson(indent=2) }}|"
        "{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}|"
        "{{ '<b>&' | tojson }}"
    )
    tools = [{"b": "ü", "a": 1}]
    assert template.render([{"role": "user", "content": "Grüße"}], tools=tools) == (
        '"Grüße"|' + json.dumps(tools, indent=2, ensure_ascii=False) + '|[{"a":1,"b":"ü"}]|"<b>&"'
    )


def test_trim_blocks_lstrip_blocks_and_loopcontrols() -> None:
    template = ChatTemplate.from_string(
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "{{ m.content }}\n"
        "{% endfor %}"
    )
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "user", "content": "u2"},
    ]
    assert template.render(messages) == "u1\n"


def test_namespace_and_dict_globals() -> None:
    template = ChatTemplate.from_string(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}{{ dict(a=1) | tojson }}"
    )
    assert template.render([{"role": "user", "content": "a"}] * 3) == '3{"a": 1}'


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.append(1) }}",  # immutable sandbox
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% set ns = namespace(_secret=1) %}",
        "{{ messages[0].content + 1 }}",
        "{{ undefined_thing.attr }}",
        "{{ messages[5].content }}{{ messages[5].content.x }}",
        "{{ raise_exception('custom problem') }}",
    ],
)
def test_render_errors_become_chat_template_error(source: str) -> None:
    template = ChatTemplate.from_string(source)
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "x"}])


def test_syntax_error_is_reported_when_loading() -> None:
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate.from_string("{% for m in messages %}")


def test_raise_exception_message_is_kept() -> None:
    template = ChatTemplate.from_string(
        "{{ raise_exception('Conversation roles must alternate') }}"
    )
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        template.render([{"role": "user", "content": "x"}])


def test_template_vars_override_special_tokens() -> None:
    template = ChatTemplate.from_string(
        "{{ bos_token }}{% if enable_thinking is defined and not enable_thinking %}nothink{% endif %}",
        bos_token="<s>",
    )
    messages = [{"role": "user", "content": "x"}]
    assert template.render(messages) == "<s>"
    assert template.render(messages, enable_thinking=False, bos_token="<B>") == "<B>nothink"
