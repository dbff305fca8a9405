"""Tolerant tool-call parsing, and the stream filter that agrees with it."""

import random

import pytest
from hearth_worker.tool_calls import ParsedToolCall, ToolCallStreamFilter, parse_tool_calls

TOOLS = ["HassTurnOn", "HassTurnOff", "HassLightSet", "GetLiveContext"]

ON_KITCHEN = ParsedToolCall("HassTurnOn", {"name": "kitchen light"})
OFF_GARAGE = ParsedToolCall("HassTurnOff", {"area": "garage"})

# (id, text, tool names, expected content, expected calls)
CASES: list[tuple[str, str, list[str] | None, str, list[ParsedToolCall]]] = [
    (
        "hermes",
        '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}\n</tool_call>',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "hermes-two-with-text",
        "Sure, doing both.\n"
        '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}</tool_call>\n'
        '<tool_call>{"name": "HassTurnOff", "arguments": {"area": "garage"}}</tool_call>',
        TOOLS,
        "Sure, doing both.",
        [ON_KITCHEN, OFF_GARAGE],
    ),
    (
        "hermes-unclosed-at-end",
        'OK.\n<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}\n',
        TOOLS,
        "OK.",
        [ON_KITCHEN],
    ),
    (
        "hermes-unclosed-before-next",
        '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}\n'
        '<tool_call>{"name": "HassTurnOff", "arguments": {"area": "garage"}}</tool_call>',
        TOOLS,
        "",
        [ON_KITCHEN, OFF_GARAGE],
    ),
    (
        "hermes-missing-brace",
        '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}</tool_call>',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "hermes-extra-brace",
        '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}}</tool_call>',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "hermes-list-inside",
        '<tool_call>[{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}, '
        '{"name": "HassTurnOff", "arguments": {"area": "garage"}}]</tool_call>',
        TOOLS,
        "",
        [ON_KITCHEN, OFF_GARAGE],
    ),
    (
        "hermes-text-after",
        '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}</tool_call>'
        "\nI turned it on.",
        TOOLS,
        "I turned it on.",
        [ON_KITCHEN],
    ),
    (
        "arguments-as-json-string",
        '<tool_call>{"name": "HassTurnOn", "arguments": "{\\"name\\": \\"kitchen light\\"}"}'
        "</tool_call>",
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "single-quotes-python-literals-trailing-commas",
        "<tool_call>{'name': 'HassLightSet', 'arguments': {'name': 'desk', 'on': True, "
        "'color': None, 'brightness': 50,},}</tool_call>",
        TOOLS,
        "",
        [
            ParsedToolCall(
                "HassLightSet", {"name": "desk", "on": True, "color": None, "brightness": 50}
            )
        ],
    ),
    (
        "unquoted-keys",
        '{name: "HassTurnOn", arguments: {name: "kitchen light"}}',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "bare-json-parameters",
        '{"name": "HassTurnOn", "parameters": {"name": "kitchen light"}}',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "bare-json-list",
        '[{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}, '
        '{"name": "HassTurnOff", "parameters": {"area": "garage"}}]',
        TOOLS,
        "",
        [ON_KITCHEN, OFF_GARAGE],
    ),
    (
        "bare-json-semicolon-separated",
        '{"name": "HassTurnOn", "parameters": {"name": "kitchen light"}}; '
        '{"name": "HassTurnOff", "parameters": {"area": "garage"}}',
        TOOLS,
        "",
        [ON_KITCHEN, OFF_GARAGE],
    ),
    (
        "bare-json-unclosed",
        '  {"name": "HassTurnOn", "arguments": {"name": "kitchen light"',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "json-on-its-own-line-after-text",
        'Turning it on now.\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}',
        TOOLS,
        "Turning it on now.",
        [ON_KITCHEN],
    ),
    (
        "openai-function-wrapper",
        '{"type": "function", "function": {"name": "HassTurnOn", '
        '"arguments": "{\\"name\\": \\"kitchen light\\"}"}}',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "openai-tool-calls-wrapper",
        '{"tool_calls": [{"id": "x", "type": "function", "function": {"name": "HassTurnOff", '
        '"arguments": {"area": "garage"}}}]}',
        TOOLS,
        "",
        [OFF_GARAGE],
    ),
    (
        "function-key-as-name",
        '{"function": "HassTurnOn", "parameters": {"name": "kitchen light"}}',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "flat-arguments-beside-name",
        '{"name": "HassTurnOff", "area": "garage"}',
        TOOLS,
        "",
        [OFF_GARAGE],
    ),
    (
        "no-arguments",
        '<tool_call>{"name": "GetLiveContext"}</tool_call>',
        TOOLS,
        "",
        [ParsedToolCall("GetLiveContext", {})],
    ),
    (
        "fenced-json",
        "Here you go:\n```json\n"
        '{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}\n```',
        TOOLS,
        "Here you go:",
        [ON_KITCHEN],
    ),
    (
        "fenced-unclosed",
        '```json\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "fenced-tool-code",
        '```tool_code\nHassTurnOn(name="kitchen light")\n```',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "function-syntax",
        'HassTurnOn(name="kitchen light")',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "function-syntax-several-lines",
        "HassTurnOn(name='kitchen light')\nHassTurnOff(area='garage')",
        TOOLS,
        "",
        [ON_KITCHEN, OFF_GARAGE],
    ),
    (
        "pythonic-list",
        '[HassTurnOn(name="kitchen light"), HassTurnOff(area="garage")]',
        TOOLS,
        "",
        [ON_KITCHEN, OFF_GARAGE],
    ),
    (
        "pythonic-with-json-literals-and-prefix",
        "functions.HassLightSet(name='desk', on=true, color=null)",
        TOOLS,
        "",
        [ParsedToolCall("HassLightSet", {"name": "desk", "on": True, "color": None})],
    ),
    (
        "function-syntax-after-text-line",
        'I will turn it on.\nHassTurnOn(name="kitchen light")',
        TOOLS,
        "I will turn it on.",
        [ON_KITCHEN],
    ),
    (
        "function-syntax-needs-tool-names",
        'HassTurnOn(name="kitchen light")',
        None,
        'HassTurnOn(name="kitchen light")',
        [],
    ),
    (
        "mistral-marker",
        '[TOOL_CALLS] [{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}]',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "phi4-tags",
        '<|tool_call|>[{"name": "HassTurnOff", "arguments": {"area": "garage"}}]<|/tool_call|>',
        TOOLS,
        "",
        [OFF_GARAGE],
    ),
    (
        "qwen3-coder-xml",
        "<tool_call>\n<function=HassLightSet>\n<parameter=name>\ndesk\n</parameter>\n"
        "<parameter=brightness>\n40\n</parameter>\n</function>\n</tool_call>",
        TOOLS,
        "",
        [ParsedToolCall("HassLightSet", {"name": "desk", "brightness": 40})],
    ),
    (
        "name-then-arguments-in-tag",
        '<tool_call>HassTurnOn\n{"name": "kitchen light"}</tool_call>',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "name-case-and-namespace-forgiven",
        '{"name": "functions.hassturnon", "arguments": {"name": "kitchen light"}}',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "any-name-without-tool-names",
        '<tool_call>{"name": "whatever", "arguments": {}}</tool_call>',
        None,
        "",
        [ParsedToolCall("whatever", {})],
    ),
    (
        "stray-closing-tag",
        '{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}</tool_call>',
        TOOLS,
        "",
        [ON_KITCHEN],
    ),
    (
        "empty-tag-is-dropped",
        "Done.<tool_call></tool_call>",
        TOOLS,
        "Done.",
        [],
    ),
    # Plain answers stay as they are.
    ("plain", "  The kitchen light is on.  \n", TOOLS, "The kitchen light is on.", []),
    (
        "plain-with-symbols",
        "5 < 6, use `code` and {braces} or [links](x).\nHass is an abbreviation.",
        TOOLS,
        "5 < 6, use `code` and {braces} or [links](x).\nHass is an abbreviation.",
        [],
    ),
    ("plain-json-answer", '{"temperature": 21.5}', TOOLS, '{"temperature": 21.5}', []),
    (
        "plain-code-block",
        "Try:\n```python\nprint('hi')\n```\nThat prints hi.",
        TOOLS,
        "Try:\n```python\nprint('hi')\n```\nThat prints hi.",
        [],
    ),
    (
        "name-only-object-without-tool-names",
        '{"name": "Bob"}',
        None,
        '{"name": "Bob"}',
        [],
    ),
    ("footnote", "[1] See the manual.", TOOLS, "[1] See the manual.", []),
]

# Calls naming tools that were not offered stay as text.
UNKNOWN_CASES: list[tuple[str, str]] = [
    (
        "hermes",
        '<tool_call>{"name": "DeleteEverything", "arguments": {}}</tool_call>',
    ),
    ("bare-json", '{"name": "DeleteEverything", "arguments": {"now": true}}'),
    ("function-syntax", 'DeleteEverything(now="yes")'),
    ("pythonic-list-with-one-unknown", '[HassTurnOn(name="x"), DeleteEverything()]'),
    ("fenced", '```json\n{"name": "DeleteEverything", "arguments": {}}\n```'),
    ("mixed-list", '[{"name": "HassTurnOn", "arguments": {}}, {"name": "Nope", "arguments": {}}]'),
]


@pytest.mark.parametrize(
    ("text", "tool_names", "content", "calls"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_parse(
    text: str, tool_names: list[str] | None, content: str, calls: list[ParsedToolCall]
) -> None:
    assert parse_tool_calls(text, tool_names) == (content, calls)


@pytest.mark.parametrize(
    "text", [case[1] for case in UNKNOWN_CASES], ids=[c[0] for c in UNKNOWN_CASES]
)
def test_unknown_tool_names_are_left_as_text(text: str) -> None:
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_unknown_call_beside_a_known_one() -> None:
    text = (
        '<tool_call>{"name": "Nope", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "HassTurnOff", "arguments": {"area": "garage"}}</tool_call>'
    )
    assert parse_tool_calls(text, TOOLS) == (
        '<tool_call>{"name": "Nope", "arguments": {}}</tool_call>',
        [OFF_GARAGE],
    )


def test_no_tools_offered_means_no_calls() -> None:
    text = '<tool_call>{"name": "HassTurnOn", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, []) == (text, [])


def test_arguments_are_plain_json_data() -> None:
    _, calls = parse_tool_calls("HassLightSet(name='x', rgb=(255, 0, 0))", TOOLS)
    assert calls == [ParsedToolCall("HassLightSet", {"name": "x", "rgb": [255, 0, 0]})]
    # A set is no JSON: the call is not accepted.
    assert parse_tool_calls("HassLightSet(rgb={1, 2})", TOOLS)[1] == []


def test_non_dict_arguments_are_no_call() -> None:
    text = '{"name": "HassTurnOn", "arguments": "kitchen light"}'
    assert parse_tool_calls(text, TOOLS) == (text, [])


# --------------------------------------------------------------------------- #
# Never raises

FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<|tool_call|>", "<|/tool_call|>", "<", "`", "``", "```",
    "```json\n", "{", "}", "[", "]", "(", ")", '"', "'", ",", ";", ":", "=", "\\", "\n", " ",
    "\t", "\r\n", "\u00a0", "\u2028", "\x00", "é", "name", "arguments", '"name"', '"HassTurnOn"',
    "HassTurnOn", "Hass", "Get", '(name="x")', "True", "null", "functions.", "[TOOL_CALLS]",
    "<function=HassTurnOff>", "<parameter=a>", "\\u00e9", "1e5", "-3", "hello",
    '{"name": "HassTurnOn", "arguments": {"a": 1}}',
]  # fmt: skip


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 40)))
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 14)))


def test_garbage_never_raises() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        text = random_text(rng)
        names = rng.choice([TOOLS, None, []])
        content, calls = parse_tool_calls(text, names)
        assert isinstance(content, str)
        assert all(isinstance(call.arguments, dict) for call in calls)
        if names is not None:
            assert all(call.name in names for call in calls)


@pytest.mark.parametrize(
    "text",
    [
        "{" * 5000,
        "[" * 3000 + "]" * 3000,
        "HassTurnOn(" + "(" * 3000,
        '{"name": "HassTurnOn", "arguments": ' + "[" * 3000 + "]" * 3000 + "}",
        "<tool_call>" + "9" * 10000 + "</tool_call>",
        "<tool_call>{'name': 'HassTurnOn', 'arguments': {'a': 1e999999}}",
        "\ud800<tool_call>\udfff",
    ],
)
def test_pathological_input_never_raises(text: str) -> None:
    parse_tool_calls(text, TOOLS)
    stream = ToolCallStreamFilter(TOOLS)
    stream.feed(text)
    stream.finish()


def test_wrong_types_never_raise() -> None:
    assert parse_tool_calls(None, TOOLS) == ("", [])  # type: ignore[arg-type]
    assert parse_tool_calls(" hi ", 5) == ("hi", [])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# The stream filter


def stream(pieces: list[str], tool_names: list[str] | None) -> tuple[str, list[ParsedToolCall]]:
    filt = ToolCallStreamFilter(tool_names)
    shown = "".join(filt.feed(piece) for piece in pieces)
    rest, calls = filt.finish()
    return shown + rest, calls


ALL_TEXTS: list[tuple[str, list[str] | None]] = [(case[1], case[2]) for case in CASES] + [
    (text, TOOLS) for _, text in UNKNOWN_CASES
]


@pytest.mark.parametrize(("text", "tool_names"), ALL_TEXTS)
def test_stream_split_anywhere_matches_parse(text: str, tool_names: list[str] | None) -> None:
    expected = parse_tool_calls(text, tool_names)
    for cut in range(len(text) + 1):
        assert stream([text[:cut], text[cut:]], tool_names) == expected, cut
    assert stream(list(text), tool_names) == expected


def test_stream_random_splits_of_random_text_match_parse() -> None:
    rng = random.Random(99)
    for _ in range(2000):
        text = random_text(rng)
        names = rng.choice([TOOLS, None])
        count = rng.randint(0, min(len(text), 8))
        cuts = sorted(rng.sample(range(len(text) + 1), count))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(pieces, names) == parse_tool_calls(text, names), (text, pieces)


def test_plain_text_streams_without_delay() -> None:
    filt = ToolCallStreamFilter(TOOLS)
    assert filt.feed("The") == "The"
    assert filt.feed(" kitchen") == " kitchen"
    assert filt.feed(" light is on.") == " light is on."
    assert filt.feed("\n\n") == ""  # trailing whitespace waits for more text
    assert filt.feed("Anything") == "\n\nAnything"
    assert filt.feed(" else?") == " else?"
    assert filt.finish() == ("", [])


def test_plain_text_without_tool_names_streams_without_delay() -> None:
    filt = ToolCallStreamFilter(None)
    assert filt.feed("Hass") == "Hass"
    assert filt.feed("TurnOn is a word. 3 < 4") == "TurnOn is a word. 3 < 4"
    assert filt.finish() == ("", [])


def test_stream_holds_back_only_what_may_be_a_call() -> None:
    filt = ToolCallStreamFilter(TOOLS)
    assert filt.feed("Sure. <tool") == "Sure."
    assert filt.feed('_call>{"name": "HassTurnOn", ') == ""
    assert filt.feed('"arguments": {"name": "kitchen light"}}</tool_call>') == ""
    assert filt.tool_calls == [ON_KITCHEN]
    assert filt.feed(" Done") == "  Done"  # the space before the call, and this one
    assert filt.finish() == ("", [ON_KITCHEN])


def test_stream_releases_a_false_alarm() -> None:
    filt = ToolCallStreamFilter(TOOLS)
    assert filt.feed("<") == ""
    assert filt.feed("b>bold") == "<b>bold"
    assert filt.feed(" and `") == " and"
    assert filt.feed("x`") == " `x"  # a backtick at the end may begin a fence
    assert filt.feed(" ok") == "` ok"
    assert filt.finish() == ("", [])


def test_stream_leading_json_waits_until_it_closes() -> None:
    filt = ToolCallStreamFilter(TOOLS)
    assert filt.feed('{"temperature"') == ""
    assert filt.feed(": 21}") == '{"temperature": 21}'
    assert filt.feed(" degrees") == " degrees"
    assert filt.finish() == ("", [])


def test_stream_line_start_tool_name_prefix_is_held() -> None:
    filt = ToolCallStreamFilter(TOOLS)
    assert filt.feed("Hass") == ""
    assert filt.feed(" is short for Home Assistant.") == "Hass is short for Home Assistant."
    assert filt.finish() == ("", [])


def test_stream_finish_twice_and_feed_after_finish() -> None:
    filt = ToolCallStreamFilter(TOOLS)
    filt.feed("Hi <tool_call>")
    assert filt.finish() == ("", [])
    assert filt.finish() == ("", [])
    with pytest.raises(RuntimeError):
        filt.feed("more")
