"""Talking to the household's workers through a ChatLog (shared by conversation and ai_task)."""

from __future__ import annotations

import ast
import json
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, cast

import voluptuous as vol
from homeassistant.components import conversation
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm, template
from homeassistant.helpers.translation import async_get_translations
from homeassistant.util.hass_dict import HassKey
from voluptuous_openapi import convert  # type: ignore[import-untyped,unused-ignore]

from .const import (
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    DEFAULT_MAX_TOKENS,
    DEVICES_ONLY_THROUGH_TOOLS_PROMPT,
    DOMAIN,
    HOUSEHOLD_API_ID,
    LOGGER,
    MAX_REMEMBERED_CONVERSATIONS,
    MAX_TOOL_ITERATIONS,
)
from .household import AnswerCutOffError, Household
from .preference_tools import agent_turn, async_member_tools
from .preferences import TOOL_FORGET, TOOL_LIST, TOOL_REMEMBER
from .worker_api import ChatDelta


def json_schema(
    schema: vol.Schema, custom_serializer: Callable[[Any], Any] | None = None
) -> dict[str, Any]:
    """The JSON schema of a voluptuous schema: a tool's parameters, an AI task's structure.

    The only place that converts schemas (a new schema library in Home Assistant
    changes this function only).
    """
    converted: dict[str, Any] = convert(schema, custom_serializer=custom_serializer)
    return converted


def format_tool(tool: llm.Tool, custom_serializer: Callable[[Any], Any] | None) -> dict[str, Any]:
    """One HA LLM tool as an OpenAI tool. The only place that reads a tool's name and schema."""
    function: dict[str, Any] = {
        "name": tool.name,
        "parameters": json_schema(tool.parameters, custom_serializer),
    }
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def tool_result_text(content: conversation.ToolResultContent) -> str:
    """A tool's result as the text a worker reads. The only place that reads tool results."""
    return json.dumps(content.tool_result)


def _repair_value(value: Any) -> Any:
    """Small models sometimes put JSON inside a string value; undo that."""
    if isinstance(value, str) and value[:1] + value[-1:] in ("{}", "[]"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def json_object_from_model(arguments: Any) -> dict[str, Any] | None:
    """A JSON object from a small model, read tolerantly; None if there is none.

    Accepts a dict, a JSON string, JSON with code fences or text around it,
    Python-literal dicts (single quotes, True/None).
    """
    parsed: Any = arguments
    if isinstance(arguments, str):
        text = re.sub(r"^```(?:json)?|```$", "", arguments.strip()).strip()
        parsed = None
        if text:
            try:
                parsed = json.loads(text)
            except ValueError:
                start, end = text.find("{"), text.rfind("}")
                candidate = text[start : end + 1] if 0 <= start < end else text
                for loader in (json.loads, ast.literal_eval):
                    try:
                        parsed = loader(candidate)
                        break
                    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                        continue
    return parsed if isinstance(parsed, dict) else None


def parse_tool_arguments(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments, read tolerantly; empty values dropped (they fail intent matching)."""
    parsed = json_object_from_model(arguments) or {}
    return {str(k): _repair_value(v) for k, v in parsed.items() if v not in (None, "", [], {})}


def _content_to_message(content: conversation.Content) -> dict[str, Any]:
    if isinstance(content, conversation.ToolResultContent):
        return {
            "role": "tool",
            "tool_call_id": content.tool_call_id,
            "name": content.tool_name,
            "content": tool_result_text(content),
        }
    if isinstance(content, conversation.AssistantContent):
        message: dict[str, Any] = {"role": "assistant", "content": content.content or ""}
        if content.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.tool_name, "arguments": json.dumps(call.tool_args)},
                }
                for call in content.tool_calls
            ]
        return message
    return {"role": content.role, "content": content.content}


# --- The request's layout: what every household request shares first, what changes last.
#
# A worker reuses the computed prefix of an earlier request (its prompt cache), so
# the request is laid out from the most to the least shared:
#
# 1. the household's system message: Home Assistant's instructions and Assist API
#    prompt (entities), Hearth's own line; the worker's chat template renders the
#    tools with it. The same for every member and every turn.
# 2. before each user message, a system message with what is new for that turn:
#    the member's preferences (and an automation's extra prompt) when they differ
#    from what the conversation already carries, then the speaking device's area
#    and the time, cut out of Home Assistant's prompt (the time added where it has
#    none).
#
# A turn's note is remembered (PromptLayout), so a later turn sends the earlier
# ones exactly as they were sent: each request extends the one before.

_TEMPLATE_EXPRESSION: Final = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)


def _rendered_pattern(template: str) -> re.Pattern[str]:
    """What a Home Assistant prompt template renders to: its text, any value in one line."""
    parts = _TEMPLATE_EXPRESSION.split(template.strip())
    return re.compile(r"[^\n]*?".join(re.escape(part) for part in parts))


# Home Assistant 2025.4 starts the prompt with BASE_PROMPT (the date and time);
# later versions add DATE_TIME_PROMPT after the API's prompt, unless a GetDateTime
# tool is offered.
_DATE_TIME_TEMPLATE: Final = str(
    getattr(llm, "DATE_TIME_PROMPT", None) or getattr(llm, "BASE_PROMPT", "")
)
_DATE_TIME: Final = _rendered_pattern(_DATE_TIME_TEMPLATE)
# The Assist API's line for a speaking device with an area (differs between satellites).
_DEVICE_AREA: Final = re.compile(r"^You are in area [^\n]* should target this area\.$", re.M)


@dataclass(frozen=True, slots=True)
class SplitPrompt:
    """Home Assistant's system prompt, in the parts the request lays out apart."""

    household: str  # the same for every member and turn
    live: str  # this turn's: the time, the speaking device's area
    extra: str | None  # an automation's extra prompt for this conversation


def split_system_prompt(text: str, extra: str | None = None) -> SplitPrompt:
    """Cut the time, the device's area and the extra prompt out of Home Assistant's prompt.

    What is not found (another Home Assistant's wording) stays where it is.
    """
    live: list[str] = []

    def take(match: re.Match[str]) -> str:
        live.append(match.group(0).strip())
        return ""

    text = _DEVICE_AREA.sub(take, text, count=1)
    if _DATE_TIME.pattern:
        text = _DATE_TIME.sub(take, text, count=1)
    kept_extra: str | None = None
    if extra and extra.strip() and text.rstrip().endswith(extra.strip()):
        text = text.rstrip().removesuffix(extra.strip())
        kept_extra = extra.strip()
    household = re.sub(r"\n{3,}", "\n\n", text).strip()
    return SplitPrompt(household, "\n".join(live), kept_extra)


@dataclass
class _Conversation:
    # user turn (1 = the first) -> (its text, the note sent before it)
    notes: dict[int, tuple[str, str]] = field(default_factory=dict)
    sections: dict[int, str | None] = field(default_factory=dict)  # preferences, per turn
    shared: str | None = None  # the conversation-wide part the notes so far carry


class PromptLayout:
    """The note sent before each user turn, per conversation (bounded, in memory)."""

    def __init__(self, max_conversations: int = MAX_REMEMBERED_CONVERSATIONS) -> None:
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._max = max_conversations

    def _get(self, conversation_id: str) -> _Conversation:
        found = self._conversations.get(conversation_id)
        if found is None:
            found = self._conversations[conversation_id] = _Conversation()
            while len(self._conversations) > self._max:
                self._conversations.popitem(last=False)
        self._conversations.move_to_end(conversation_id)
        return found

    def set_section(self, conversation_id: str, turn: int, section: str | None) -> None:
        """The member's preference section for a turn, before its first request."""
        self._get(conversation_id).sections[turn] = section

    def notes(
        self, conversation_id: str, turn: int, text: str, prompt: SplitPrompt
    ) -> dict[int, tuple[str, str]]:
        """Every turn's note; the current turn's is made on its first request.

        The conversation-wide part (an extra prompt, the member's preferences)
        goes into a turn's note only when it differs from what earlier notes
        carry; the live part (time, area) goes into each.
        """
        conv = self._get(conversation_id)
        known = conv.notes.get(turn)
        if known is None or known[0] != text:
            shared = system_prompt(prompt.extra, conv.sections.pop(turn, None))
            parts = [prompt.live]
            if shared and shared != conv.shared:
                parts.insert(0, shared)
            conv.shared = shared or None
            conv.notes[turn] = (text, system_prompt(*parts))
        return conv.notes


DATA_PROMPT_LAYOUT: HassKey[PromptLayout] = HassKey(f"{DOMAIN}_prompt_layout")
PREFERENCE_TOOLS: Final = frozenset({TOOL_REMEMBER, TOOL_FORGET, TOOL_LIST})


def _prompt_layout(hass: HomeAssistant) -> PromptLayout:
    if (layout := hass.data.get(DATA_PROMPT_LAYOUT)) is None:
        layout = hass.data[DATA_PROMPT_LAYOUT] = PromptLayout()
    return layout


def system_prompt(*parts: str | None) -> str:
    """A system message from its parts, in order, empty ones left out: the one place a
    system prompt is extended (Hearth's line after the household's prompt, an AI task's
    instructions; hearth.ask's instructions and the person's preferences)."""
    return "\n".join(part for part in parts if part)


def request_messages(
    hass: HomeAssistant,
    chat_log: conversation.ChatLog,
    *,
    device_tools: bool = False,
    extra_instructions: str | None = None,
) -> list[dict[str, Any]]:
    """The chat log as a request's messages, laid out for the workers' prompt cache."""
    contents = list(chat_log.content)
    first = contents[0] if contents else None
    system = first.content if isinstance(first, conversation.SystemContent) else None
    if system is None:
        return [
            *([{"role": "system", "content": extra_instructions}] if extra_instructions else []),
            *(_content_to_message(content) for content in contents),
        ]
    prompt = split_system_prompt(system, getattr(chat_log, "extra_system_prompt", None))
    if _DATE_TIME_TEMPLATE and not (_DATE_TIME.pattern and _DATE_TIME.search(prompt.live)):
        # The time in every turn's note, as Home Assistant's prompt had it: a small
        # model answers "what time is it" without a tool call and its second
        # generation, and the note's place at the end costs no cached prefix.
        now = template.Template(_DATE_TIME_TEMPLATE, hass).async_render(parse_result=False)
        prompt = replace(prompt, live=system_prompt(prompt.live, now.strip()))
    users = [c for c in contents if isinstance(c, conversation.UserContent)]
    notes: dict[int, tuple[str, str]] = {}
    if users:
        notes = _prompt_layout(hass).notes(
            chat_log.conversation_id, len(users), users[-1].content, prompt
        )
    household = system_prompt(
        prompt.household,
        DEVICES_ONLY_THROUGH_TOOLS_PROMPT if device_tools else None,
        extra_instructions,
    )
    messages = [{"role": "system", "content": household}]
    turn = 0
    for content in contents[1:]:
        if isinstance(content, conversation.UserContent):
            turn += 1
            text, note = notes.get(turn, ("", ""))
            if note and text == content.content:
                messages.append({"role": "system", "content": note})
        messages.append(_content_to_message(content))
    return messages


FINISH_LENGTH: Final = "length"  # the worker's finish_reason for an answer cut by max_tokens


class AnswerLengthLimitError(HomeAssistantError):
    """An answer that reached the longest answer allowed: what came is passed on, cut."""

    def __init__(self, max_tokens: int) -> None:
        super().__init__(
            translation_domain=DOMAIN,
            translation_key="answer_length_limit",
            translation_placeholders={"max_tokens": str(max_tokens)},
        )


async def _deltas_to_chat_log(
    deltas: AsyncIterator[ChatDelta],
    cut_off: list[HomeAssistantError],
    note: Callable[[HomeAssistantError], Awaitable[str]] | None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seen: list[ChatDelta] | None = None,
) -> AsyncGenerator[conversation.AssistantContentDeltaDict]:
    """Worker deltas as ChatLog deltas: the role once, then text and tool calls.

    A worker that breaks off mid-answer ends the stream normally, so the chat log
    keeps what was produced; the error goes to `cut_off`, and `note` (if given)
    turns it into a last piece of text that tells the user. An answer the worker
    cut at `max_tokens` (finish_reason "length") is told the same way.
    """
    yield {"role": "assistant"}
    try:
        async for delta in deltas:
            if seen is not None:
                seen.append(delta)
            if delta.finish_reason == FINISH_LENGTH:
                cut_off.append(AnswerLengthLimitError(max_tokens))
            if delta.content:
                yield {"content": delta.content}
            if delta.tool_calls:
                yield {
                    "tool_calls": [
                        llm.ToolInput(
                            tool_name=call["name"],
                            tool_args=parse_tool_arguments(call["arguments"]),
                            **({"id": call["id"]} if call.get("id") else {}),
                        )
                        for call in delta.tool_calls
                        if call.get("name")
                    ]
                }
    except AnswerCutOffError as err:
        cut_off.append(err)
    if cut_off and note is not None:
        yield {"content": "\n\n" + await note(cut_off[-1])}


def _trace_round(
    chat_log: conversation.ChatLog,
    worker_name: str,
    deltas: list[ChatDelta],
    *,
    device_tools: bool,
    earlier: int,
) -> int:
    """Put what one round with a worker came to in the conversation's trace (Settings ->
    Voice assistants -> Debug): the worker, its tokens, its tool calls, and whether a
    turn offered device tools but ended in words without any call (a device command
    may have been answered without acting). Returns the round's tool calls."""
    last = deltas[-1] if deltas else ChatDelta()
    calls = sum(len(delta.tool_calls) for delta in deltas)
    stats: dict[str, Any] = {}
    if last.prompt_tokens is not None:
        stats["input_tokens"] = last.prompt_tokens
    if last.completion_tokens is not None:
        stats["output_tokens"] = last.completion_tokens
    if last.cached_tokens is not None:
        stats["cached_input_tokens"] = last.cached_tokens
    chat_log.async_trace(
        {
            "hearth": {
                "worker": worker_name,
                "finish_reason": last.finish_reason,
                "tool_calls": calls,
                "answered_without_tool_call": device_tools and calls == 0 and earlier == 0,
            },
            "stats": stats,
        }
    )
    return calls


async def _replay(deltas: list[ChatDelta]) -> AsyncGenerator[ChatDelta]:
    for delta in deltas:
        yield delta


async def async_provide_llm_data(
    chat_log: conversation.ChatLog,
    user_input: conversation.ConversationInput,
    settings: dict[str, Any],
) -> None:
    """Let Home Assistant set the chat log's system prompt and LLM API, on old and new versions.

    The API is the household's configured APIs, plus the speaking member's preference
    tools when Home Assistant knows who speaks (preference_tools.HouseholdAPI); their
    preferences go after the household's prompt and tools (request_messages).
    """
    apis: list[str] = list(settings.get(CONF_LLM_HASS_API) or [])
    prompt: str | None = settings.get(CONF_PROMPT)
    new_api = hasattr(chat_log, "async_provide_llm_data")  # Home Assistant 2025.7 and later
    if len(apis) > 1 and not new_api:
        LOGGER.warning("This Home Assistant uses one LLM API at a time; using %s", apis[0])
        apis = apis[:1]
    tools, section = await async_member_tools(chat_log, user_input)
    api: list[str] | None = [HOUSEHOLD_API_ID] if tools else apis or None
    with agent_turn(apis, tools):
        if hasattr(chat_log, "async_provide_llm_data"):  # (as new_api, for the type check)
            await chat_log.async_provide_llm_data(
                cast(Any, user_input).as_llm_context(DOMAIN),
                api,
                prompt,
                user_input.extra_system_prompt,
            )
        else:
            await chat_log.async_update_llm_data(
                DOMAIN, user_input, api[0] if api else None, prompt
            )
    turn = sum(isinstance(c, conversation.UserContent) for c in chat_log.content)
    _prompt_layout(chat_log.hass).set_section(chat_log.conversation_id, turn, section)


def sampling_temperature(settings: dict[str, Any]) -> float | None:
    """The household's temperature; None (send none): the model's own default."""
    value = settings.get(CONF_TEMPERATURE)
    if value is None or value == "":
        return None
    return float(value)


def request_body(
    settings: dict[str, Any],
    messages: list[dict[str, Any]],
    *,
    max_tokens: int | None = None,
    tools: list[dict[str, Any]] | None = None,
    response_format: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A chat request's body with the household's settings. The only place that builds one
    (the agent, the AI task and hearth.ask)."""
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens or answer_max_tokens(settings),
    }
    if (temperature := sampling_temperature(settings)) is not None:
        body["temperature"] = temperature
    if response_format is not None:  # the worker holds the answer to it (a grammar)
        body["response_format"] = response_format
    if tools:
        body["tools"] = tools
    return body


def answer_max_tokens(settings: dict[str, Any]) -> int:
    """The household's longest answer (tokens)."""
    return int(settings.get(CONF_MAX_TOKENS) or DEFAULT_MAX_TOKENS)


async def async_run_chat_log(
    hass: HomeAssistant,
    household: Household,
    chat_log: conversation.ChatLog,
    agent_id: str,
    *,
    extra_instructions: str | None = None,
    language: str | None = None,
    purpose: str = "voice",
    response_format: dict[str, Any] | None = None,
) -> None:
    """Let the household's workers answer the chat log, running tool calls in between.

    Raises NoWorkerError when no worker can answer, RequestNotServableError when
    the request itself cannot be served (too long, refused).

    With `language`, the answer streams to a person as it comes: when a worker
    breaks off mid-answer, the chat log keeps what it produced and a translated
    note saying so ends the answer (this returns normally), as it does for an
    answer cut at the length limit (max_tokens). Without, nobody sees
    the answer before it is whole, so a cut-off answer is asked again of another
    worker; only when every worker broke off is AnswerCutOffError raised.
    """
    settings = household.settings
    tools: list[dict[str, Any]] | None = None
    if chat_log.llm_api:
        tools = [
            format_tool(tool, chat_log.llm_api.custom_serializer) for tool in chat_log.llm_api.tools
        ]
    device_tools = any(t["function"]["name"] not in PREFERENCE_TOOLS for t in tools or [])
    turn_calls = 0  # tool calls the worker made in this turn so far (for the trace)
    for _ in range(MAX_TOOL_ITERATIONS):
        messages = request_messages(
            hass, chat_log, device_tools=device_tools, extra_instructions=extra_instructions
        )
        max_tokens = answer_max_tokens(settings)
        body = request_body(settings, messages, tools=tools, response_format=response_format)
        cut_off: list[HomeAssistantError] = []
        if language is None:  # nobody waits on the stream: a whole answer, or an error
            done = await household.async_complete(
                body, conversation_id=chat_log.conversation_id, purpose=purpose
            )
            if done.cut_off is not None:
                raise done.cut_off
            async for _content in chat_log.async_add_delta_content_stream(
                agent_id, _deltas_to_chat_log(_replay(done.deltas), cut_off, None, max_tokens)
            ):
                pass
            turn_calls += _trace_round(
                chat_log,
                done.worker.name,
                done.deltas,
                device_tools=device_tools,
                earlier=turn_calls,
            )
            if cut_off:
                LOGGER.info("The answer reached the length limit (%d tokens)", max_tokens)
                break
            if not chat_log.unresponded_tool_results:
                break
            continue
        stream = await household.async_open_chat(
            body,
            conversation_id=chat_log.conversation_id,
            purpose=purpose,
        )

        async def note(err: HomeAssistantError, language: str = language) -> str:
            return await async_error_text(hass, language, err)

        seen: list[ChatDelta] = []
        async for _content in chat_log.async_add_delta_content_stream(
            agent_id, _deltas_to_chat_log(stream.deltas, cut_off, note, max_tokens, seen)
        ):
            pass
        turn_calls += _trace_round(
            chat_log, stream.worker.name, seen, device_tools=device_tools, earlier=turn_calls
        )
        if cut_off:  # the answer so far and the note stay; no second answer after it
            break
        if not chat_log.unresponded_tool_results:
            break


async def async_error_text(hass: HomeAssistant, language: str, err: HomeAssistantError) -> str:
    """The translated message of an error with a translation key, else its text."""
    if err.translation_key and err.translation_domain == DOMAIN:
        key = f"component.{DOMAIN}.exceptions.{err.translation_key}.message"
        for lang in (language, "en"):
            translations = await async_get_translations(hass, lang, "exceptions", [DOMAIN])
            if key in translations:
                text = translations[key]
                for name, value in (err.translation_placeholders or {}).items():
                    text = text.replace("{" + name + "}", value)
                return text
    return str(err)
