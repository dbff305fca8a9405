"""Talking to the household's workers through a ChatLog (shared by conversation and ai_task)."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

from homeassistant.components import conversation
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm
from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.translation import async_get_translations
from voluptuous_openapi import convert  # type: ignore[import-untyped,unused-ignore]

from .client import ChatDelta
from .cluster import AnswerCutOffError, Cluster
from .const import (
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    DEFAULT_MAX_TOKENS,
    DOMAIN,
    HOUSEHOLD_DEVICE_ID,
    LOGGER,
    MAX_TOOL_ITERATIONS,
)
from .preferences import async_prepare_chat_log

HOUSEHOLD_DEVICE = DeviceInfo(
    identifiers={(DOMAIN, HOUSEHOLD_DEVICE_ID)},
    name="Hearth",
    manufacturer="Hearth",
    model="Household assistant",
    entry_type=DeviceEntryType.SERVICE,
)


def format_tool(tool: llm.Tool, custom_serializer: Callable[[Any], Any] | None) -> dict[str, Any]:
    """One HA LLM tool as an OpenAI tool. The only place that reads tool schemas."""
    function: dict[str, Any] = {
        "name": tool.name,
        "parameters": convert(tool.parameters, custom_serializer=custom_serializer),
    }
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _repair_value(value: Any) -> Any:
    """Small models sometimes put JSON inside a string value; undo that."""
    if isinstance(value, str) and value[:1] + value[-1:] in ("{}", "[]"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_json_object(arguments: Any) -> dict[str, Any] | None:
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
    parsed = parse_json_object(arguments) or {}
    return {str(k): _repair_value(v) for k, v in parsed.items() if v not in (None, "", [], {})}


def _content_to_message(content: conversation.Content) -> dict[str, Any]:
    if isinstance(content, conversation.ToolResultContent):
        return {
            "role": "tool",
            "tool_call_id": content.tool_call_id,
            "name": content.tool_name,
            "content": json.dumps(content.tool_result),
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


def chat_log_messages(chat_log: conversation.ChatLog) -> list[dict[str, Any]]:
    """The conversation so far, as OpenAI chat messages."""
    return [_content_to_message(content) for content in chat_log.content]


async def _deltas_to_chat_log(
    deltas: AsyncIterator[ChatDelta],
    cut_off: list[AnswerCutOffError],
    note: Callable[[AnswerCutOffError], Awaitable[str]] | None,
) -> AsyncGenerator[conversation.AssistantContentDeltaDict]:
    """Worker deltas as ChatLog deltas: the role once, then text and tool calls.

    A worker that breaks off mid-answer ends the stream normally, so the chat log
    keeps what was produced; the error goes to `cut_off`, and `note` (if given)
    turns it into a last piece of text that tells the user.
    """
    yield {"role": "assistant"}
    try:
        async for delta in deltas:
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
        if note is not None:
            yield {"content": "\n\n" + await note(err)}


async def _replay(deltas: list[ChatDelta]) -> AsyncGenerator[ChatDelta]:
    for delta in deltas:
        yield delta


async def async_provide_llm_data(
    chat_log: conversation.ChatLog,
    user_input: conversation.ConversationInput,
    settings: dict[str, Any],
) -> None:
    """Set the system prompt and LLM API on the chat log, on old and new Home Assistant."""
    apis: list[str] = list(settings.get(CONF_LLM_HASS_API) or [])
    prompt: str | None = settings.get(CONF_PROMPT)
    if hasattr(chat_log, "async_provide_llm_data"):  # Home Assistant 2025.7 and later
        await chat_log.async_provide_llm_data(
            cast(Any, user_input).as_llm_context(DOMAIN),
            apis or None,
            prompt,
            user_input.extra_system_prompt,
        )
    else:
        if len(apis) > 1:
            LOGGER.warning("This Home Assistant uses one LLM API at a time; using %s", apis[0])
        await chat_log.async_update_llm_data(DOMAIN, user_input, apis[0] if apis else None, prompt)
    # The speaking member's preferences in the prompt, and the preference tools.
    await async_prepare_chat_log(chat_log, user_input)


async def async_run_chat_log(
    hass: HomeAssistant,
    cluster: Cluster,
    chat_log: conversation.ChatLog,
    agent_id: str,
    *,
    tools_allowed: bool = True,
    extra_instructions: str | None = None,
    language: str | None = None,
    kind: str = "voice",
) -> str:
    """Let the household's workers answer the chat log, running tool calls in between.

    Returns the worker name that produced the last answer. Raises NoWorkerError
    when no worker can answer, RequestNotServableError when the request itself
    cannot be served (too long, refused).

    With `language`, the answer streams to a person as it comes: when a worker
    breaks off mid-answer, the chat log keeps what it produced and a translated
    note saying so ends the answer (this returns normally). Without, nobody sees
    the answer before it is whole, so a cut-off answer is asked again of another
    worker; only when every worker broke off is AnswerCutOffError raised.
    """
    settings = cluster.settings
    tools: list[dict[str, Any]] | None = None
    if tools_allowed and chat_log.llm_api:
        tools = [
            format_tool(tool, chat_log.llm_api.custom_serializer) for tool in chat_log.llm_api.tools
        ]
    worker_name = ""
    for _ in range(MAX_TOOL_ITERATIONS):
        messages = chat_log_messages(chat_log)
        if extra_instructions:
            if messages and messages[0]["role"] == "system":
                first = messages[0]["content"]
                messages[0] = {"role": "system", "content": f"{first}\n{extra_instructions}"}
            else:
                messages.insert(0, {"role": "system", "content": extra_instructions})
        body: dict[str, Any] = {
            "messages": messages,
            "max_tokens": int(settings.get(CONF_MAX_TOKENS) or DEFAULT_MAX_TOKENS),
            "temperature": float(settings.get(CONF_TEMPERATURE) or 0.0),
        }
        if tools:
            body["tools"] = tools
        cut_off: list[AnswerCutOffError] = []
        if language is None:  # nobody waits on the stream: a whole answer, or an error
            done = await cluster.async_complete(
                body, conversation_id=chat_log.conversation_id, kind=kind
            )
            if done.cut_off is not None:
                raise done.cut_off
            worker_name = done.worker.name
            async for _content in chat_log.async_add_delta_content_stream(
                agent_id, _deltas_to_chat_log(_replay(done.deltas), cut_off, None)
            ):
                pass
            if not chat_log.unresponded_tool_results:
                break
            continue
        stream = await cluster.async_open_chat(
            body,
            conversation_id=chat_log.conversation_id,
            kind=kind,
        )
        worker_name = stream.worker.name

        async def note(err: AnswerCutOffError, language: str = language) -> str:
            return await async_error_text(hass, language, err)

        async for _content in chat_log.async_add_delta_content_stream(
            agent_id, _deltas_to_chat_log(stream.deltas, cut_off, note)
        ):
            pass
        if cut_off:  # the answer so far and the note stay; no second answer after it
            break
        if not chat_log.unresponded_tool_results:
            break
    return worker_name


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
