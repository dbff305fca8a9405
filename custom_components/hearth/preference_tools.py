"""Hearth's preference tools for the LLM (remember, forget, list) and its household LLM API.

`HouseholdAPI`, a registered `llm.API`, gives Hearth's agent the household's LLM
APIs plus the speaking member's `remember_preference`, `forget_preference` and
`list_preferences`; Home Assistant sets it on the chat log. Remembering and
forgetting take two calls in two turns: the first only records a proposal and
returns the question to ask; a call with `confirmed=true` in a *later* turn of the
same conversation carries out the proposal the user heard (not whatever arguments
a small model repeats).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Self

import voluptuous as vol
from homeassistant.components import conversation
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import llm
from homeassistant.util.json import JsonObjectType

from .const import DOMAIN, HOUSEHOLD_API_ID
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

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        """Itself: a conversation's trace copies the tools it lists, and this one holds the
        preferences (and so Home Assistant), which cannot be copied."""
        return self

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


class _AskFirstTool(_PreferenceTool):
    """A change in two calls: propose (and ask), then carry out after the user's yes."""

    kind: str  # the proposal's kind: "remember" or "forget"

    async def async_call(
        self, hass: HomeAssistant, tool_input: llm.ToolInput, llm_context: llm.LLMContext
    ) -> JsonObjectType:
        args = tool_input.tool_args
        category = normalize_category(args["category"]) if args.get("category") else ""
        value = clean_value(args.get("value"))
        if _truthy(args.get("confirmed")) and (
            pending := self.prefs.take_confirmed(self.turn, self.kind, category, value)
        ):
            try:
                return await self._async_carry_out(pending)
            except PreferencesCorruptError:
                return dict(_UNAVAILABLE)
        return self._propose(category, value)

    async def _async_carry_out(self, pending: Pending) -> JsonObjectType:
        """Do what the user said yes to."""
        raise NotImplementedError

    def _propose(self, category: str, value: str) -> JsonObjectType:
        """Record a proposal and return the question to ask (or why there is none)."""
        raise NotImplementedError


class RememberTool(_AskFirstTool):
    """remember_preference: propose, then store after the user's yes."""

    name = TOOL_REMEMBER
    kind = "remember"
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

    async def _async_carry_out(self, pending: Pending) -> JsonObjectType:
        item = await self.prefs.async_set(self.turn.member, pending.category, pending.value)
        return {
            "status": "stored",
            "category": item["category"],
            "value": item["value"],
            "say": "Tell the user it is remembered.",
        }

    def _propose(self, category: str, value: str) -> JsonObjectType:
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


class ForgetTool(_AskFirstTool):
    """forget_preference: propose which ones, then forget after the user's yes."""

    name = TOOL_FORGET
    kind = "forget"
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

    async def _async_carry_out(self, pending: Pending) -> JsonObjectType:
        removed = await self.prefs.async_delete(self.turn.member.key, pending.item_ids)
        return {
            "status": "forgotten",
            "forgotten": [embedding_text(i) for i in removed],
            "say": "Tell the user these are forgotten.",
        }

    def _propose(self, category: str, value: str) -> JsonObjectType:
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


@dataclass(frozen=True, slots=True)
class _AgentTurn:
    """What the household API gives Hearth's agent in this turn."""

    api_ids: list[str]  # the household's configured LLM APIs
    tools: list[llm.Tool]  # the speaking member's preference tools


_AGENT_TURN: ContextVar[_AgentTurn | None] = ContextVar(f"{DOMAIN}_agent_turn", default=None)


class HouseholdAPI(llm.API):
    """Hearth's agent's tools: the household's LLM APIs and the member's preference tools.

    Registered with Home Assistant (`llm.async_register_api`), so that the chat log
    gets its API, tools and prompt from Home Assistant itself (`async_provide_llm_data`)
    with the tools under their own names (Home Assistant's merging of several APIs
    renames them). Only a request of Hearth's agent fills it (`agent_turn`); for
    anyone else it is empty. The API prompt is the household APIs' own.
    """

    async def async_get_api_instance(self, llm_context: llm.LLMContext) -> llm.APIInstance:
        turn = _AGENT_TURN.get()
        inner: llm.APIInstance | None = None
        if turn is not None and turn.api_ids:
            ids: Any = turn.api_ids[0] if len(turn.api_ids) == 1 else turn.api_ids
            inner = await llm.async_get_api(self.hass, ids, llm_context)
        return llm.APIInstance(
            api=self,
            api_prompt=inner.api_prompt if inner else "",
            llm_context=llm_context,
            tools=[*(inner.tools if inner else []), *(turn.tools if turn else [])],
            custom_serializer=inner.custom_serializer if inner else None,
        )


@callback
def async_register_household_api(hass: HomeAssistant) -> None:
    """Offer the household API to Hearth's agent (once, when the integration sets up)."""
    llm.async_register_api(hass, HouseholdAPI(hass=hass, id=HOUSEHOLD_API_ID, name="Hearth"))


@contextmanager
def agent_turn(api_ids: list[str], tools: list[llm.Tool]) -> Iterator[None]:
    """While the chat log gets its LLM data: what the household API gives this turn."""
    token = _AGENT_TURN.set(_AgentTurn(api_ids, tools))
    try:
        yield
    finally:
        _AGENT_TURN.reset(token)


async def async_member_tools(
    chat_log: conversation.ChatLog, user_input: conversation.ConversationInput
) -> tuple[list[llm.Tool], str | None]:
    """The speaking member's preference tools and their preferences' prompt section.

    The section (None if there is none) is not written into the household's system
    prompt: the request puts it after that prompt and its tools, which are the same
    for every member (assistant.PromptLayout). No tools and no section when Home
    Assistant does not know who is speaking.
    """
    hass = chat_log.hass
    prefs = hass.data.get(DATA_PREFERENCES)
    context = user_input.context
    member = await async_member_for_user(hass, context.user_id if context else None)
    if prefs is None or member is None:
        return [], None
    section = await prefs.async_prompt(member, user_input.text)
    turn = Turn(
        chat_log.conversation_id,
        sum(isinstance(c, conversation.UserContent) for c in chat_log.content),
        member,
    )
    return preference_tools(prefs, turn), section
