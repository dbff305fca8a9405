"""Hearth's preference tools for the LLM: remember, forget and list a member's preferences.

Hearth's agent appends `remember_preference`, `forget_preference` and
`list_preferences` to the chat log's LLM API. Remembering and forgetting take two
calls in two turns: the first only records a proposal and returns the question to
ask; a call with `confirmed=true` in a *later* turn of the same conversation carries
out the proposal the user heard (not whatever arguments a small model repeats).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Final

import voluptuous as vol
from homeassistant.components import conversation
from homeassistant.core import HomeAssistant
from homeassistant.helpers import llm
from homeassistant.util.json import JsonObjectType

from .const import DOMAIN
from .preference_store import CATEGORIES, PreferencesCorruptError
from .preferences import (
    DATA_PREFERENCES,
    LABELS,
    TOOL_FORGET,
    TOOL_LIST,
    TOOL_REMEMBER,
    Pending,
    Preferences,
    Turn,
    async_member_for_user,
    clean_value,
    embedding_text,
    normalize_category,
)


def _truthy(raw: Any) -> bool:
    if isinstance(raw, str):
        return raw.strip().lower() in ("true", "yes", "1", "y")
    return bool(raw)


def preference_tools(prefs: Preferences, turn: Turn) -> list[llm.Tool]:
    """The speaking member's preference tools for this turn."""
    return [RememberTool(prefs, turn), ForgetTool(prefs, turn), ListTool(prefs, turn)]


_UNAVAILABLE: Final = {
    "error": "preferences_unavailable",
    "message": "Preferences cannot be changed right now: the household's preference "
    "store needs repair in Home Assistant. Tell the user so.",
}


class _PreferenceTool(llm.Tool):
    def __init__(self, prefs: Preferences, turn: Turn) -> None:
        self.prefs = prefs
        self.turn = turn

    def _ask_first(self, pending: Pending, question: str, nothing_yet: str) -> JsonObjectType:
        """Record the proposal (valid PENDING_TTL) and tell the model to ask the user."""
        self.prefs.propose(self.turn, pending)
        return {
            "status": "confirmation_needed",
            "question": question,
            "next_step": (
                f"Ask the user this question and wait for the answer. {nothing_yet} "
                f"If the user says yes, call {self.name} with confirmed=true."
            ),
        }


class RememberTool(_PreferenceTool):
    """remember_preference: propose, then store after the user's yes."""

    name = TOOL_REMEMBER
    description = (
        "Remember a lasting preference of the person you are talking to (units, diet, "
        "recipe sites, sources to cite or avoid, language, tone, or other). The first call "
        "stores nothing: it returns a question; ask the user exactly that and stop. Only "
        "after the user answers yes, call again with confirmed=true."
    )
    parameters = vol.Schema(
        {
            vol.Required("category"): vol.In(list(CATEGORIES)),
            vol.Required("value"): str,
            vol.Optional("confirmed"): bool,
        }
    )

    async def async_call(
        self, hass: HomeAssistant, tool_input: llm.ToolInput, llm_context: llm.LLMContext
    ) -> JsonObjectType:
        args = tool_input.tool_args
        category = normalize_category(args["category"]) if args.get("category") else ""
        value = clean_value(args.get("value"))
        if _truthy(args.get("confirmed")) and (
            pending := self.prefs.take_confirmed(self.turn, "remember", category, value)
        ):
            try:
                item = await self.prefs.async_set(self.turn.member, pending.category, pending.value)
            except PreferencesCorruptError:
                return dict(_UNAVAILABLE)
            return {
                "status": "stored",
                "category": item["category"],
                "value": item["value"],
                "say": "Tell the user it is remembered.",
            }
        if not value:
            return {"error": "value_missing", "message": "Say what to remember in 'value'."}
        if self.prefs.corrupt is not None:
            return dict(_UNAVAILABLE)
        category = category or "other"
        return self._ask_first(
            Pending("remember", self.turn.index, category=category, value=value),
            f"Shall I remember this preference ({LABELS[category]}): {value}?",
            "Nothing is stored yet.",
        )


class ForgetTool(_PreferenceTool):
    """forget_preference: propose which ones, then forget after the user's yes."""

    name = TOOL_FORGET
    description = (
        "Forget preferences of the person you are talking to, chosen by category and/or a "
        "word of their text. The first call forgets nothing: it returns a question; ask the "
        "user exactly that and stop. Only after the user answers yes, call again with "
        "confirmed=true."
    )
    parameters = vol.Schema(
        {
            vol.Optional("category"): vol.In(list(CATEGORIES)),
            vol.Optional("value"): str,
            vol.Optional("confirmed"): bool,
        }
    )

    async def async_call(
        self, hass: HomeAssistant, tool_input: llm.ToolInput, llm_context: llm.LLMContext
    ) -> JsonObjectType:
        args = tool_input.tool_args
        category = normalize_category(args["category"]) if args.get("category") else ""
        value = clean_value(args.get("value"))
        if _truthy(args.get("confirmed")) and (
            pending := self.prefs.take_confirmed(self.turn, "forget", category, value)
        ):
            try:
                removed = await self.prefs.async_delete(self.turn.member.key, pending.item_ids)
            except PreferencesCorruptError:
                return dict(_UNAVAILABLE)
            return {
                "status": "forgotten",
                "forgotten": [embedding_text(i) for i in removed],
                "say": "Tell the user these are forgotten.",
            }
        if self.prefs.corrupt is not None:
            return dict(_UNAVAILABLE)
        found = self.prefs.find(self.turn.member.key, category=category, value=value)
        if not found:
            return {
                "status": "not_found",
                "preferences": [embedding_text(i) for i in self.prefs.items(self.turn.member.key)],
            }
        described = "; ".join(embedding_text(i) for i in found)
        return self._ask_first(
            Pending(
                "forget",
                self.turn.index,
                category=category,
                value=value,
                item_ids=[i["id"] for i in found],
            ),
            f"Shall I forget {described}?",
            "Nothing is forgotten yet.",
        )


class ListTool(_PreferenceTool):
    """list_preferences: what is remembered about the person."""

    name = TOOL_LIST
    description = "List the preferences remembered for the person you are talking to."

    async def async_call(
        self, hass: HomeAssistant, tool_input: llm.ToolInput, llm_context: llm.LLMContext
    ) -> JsonObjectType:
        return {
            "person": self.turn.member.name,
            "preferences": [embedding_text(i) for i in self.prefs.items(self.turn.member.key)],
        }


class _PreferencesAPI(llm.API):
    """Holds Hearth's own tools when no Home Assistant LLM API is selected."""

    async def async_get_api_instance(self, llm_context: llm.LLMContext) -> llm.APIInstance:
        return llm.APIInstance(api=self, api_prompt="", llm_context=llm_context, tools=[])


def _llm_context(user_input: conversation.ConversationInput) -> llm.LLMContext:
    """An LLMContext on old and new Home Assistant (its fields changed)."""
    values: dict[str, Any] = {
        "platform": DOMAIN,
        "context": user_input.context,
        "user_prompt": user_input.text,
        "language": user_input.language,
        "assistant": conversation.DOMAIN,
        "device_id": user_input.device_id,
    }
    names = {f.name for f in fields(llm.LLMContext)}
    return llm.LLMContext(**{k: v for k, v in values.items() if k in names})


async def async_prepare_chat_log(
    chat_log: conversation.ChatLog, user_input: conversation.ConversationInput
) -> str | None:
    """Add the preference tools for the speaking member; return their prompt section.

    Called after the chat log got its prompt and LLM API for this turn. The
    section (None if there is none) is not written into the household's system
    prompt: the request puts it after that prompt and its tools, which are the
    same for every member (assistant.PromptLayout). Nothing happens, and None is
    returned, when Home Assistant does not know who is speaking.
    """
    hass = chat_log.hass
    prefs = hass.data.get(DATA_PREFERENCES)
    context = user_input.context
    member = await async_member_for_user(hass, context.user_id if context else None)
    if prefs is None or member is None:
        return None
    section = await prefs.async_prompt(member, user_input.text)
    turn = Turn(
        chat_log.conversation_id,
        sum(isinstance(c, conversation.UserContent) for c in chat_log.content),
        member,
    )
    tools = preference_tools(prefs, turn)
    if chat_log.llm_api is None:
        api = _PreferencesAPI(hass=hass, id=f"{DOMAIN}_preferences", name="Hearth preferences")
        chat_log.llm_api = llm.APIInstance(
            api=api, api_prompt="", llm_context=_llm_context(user_input), tools=tools
        )
    else:
        chat_log.llm_api = replace(chat_log.llm_api, tools=[*chat_log.llm_api.tools, *tools])
    return section
