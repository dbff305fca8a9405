"""Hearth's agent gets its LLM API from Home Assistant: the household API (no worker needed).

The household's configured APIs and the speaking member's preference tools are one
registered `llm.API` (preference_tools.HouseholdAPI); Home Assistant's own
`async_provide_llm_data` sets it on the chat log (nothing writes into the chat log).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from homeassistant.components import conversation
from homeassistant.components.conversation import trace as conversation_trace
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import chat_session, llm
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockUser

from custom_components.hearth.assistant import async_provide_llm_data
from custom_components.hearth.config_flow import filter_invalid_llm_apis
from custom_components.hearth.const import CONF_LLM_HASS_API, DOMAIN, HOUSEHOLD_API_ID
from custom_components.hearth.household import Household
from custom_components.hearth.preferences import TOOL_FORGET, TOOL_LIST, TOOL_REMEMBER

from .conftest import user_input
from .test_preferences import add_person

PREFERENCE_TOOLS = {TOOL_REMEMBER, TOOL_FORGET, TOOL_LIST}


@pytest.fixture
async def household(hass: HomeAssistant) -> Household:
    """Hearth set up without any worker (its household API and preferences need none)."""
    assert await async_setup_component(hass, "homeassistant", {})
    assert await async_setup_component(hass, "conversation", {})
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, DOMAIN, {})
    return Household.get(hass)


async def provide(
    hass: HomeAssistant, household: Household, context: Context
) -> tuple[llm.APIInstance | None, list[dict[str, Any]]]:
    """The chat log's LLM API after Hearth asked Home Assistant for it, and what Home
    Assistant's own trace recorded (its prompt and tools)."""
    asked = user_input("what do I like?", context)
    with (
        conversation_trace.async_conversation_trace() as trace,
        chat_session.async_get_chat_session(hass) as session,
        conversation.async_get_chat_log(hass, session, asked) as chat_log,
    ):
        await async_provide_llm_data(chat_log, asked, household.settings)
        api = chat_log.llm_api
    details = [
        event["data"]
        for event in trace.as_dict()["events"]
        if event["event_type"] == conversation_trace.ConversationTraceEventType.AGENT_DETAIL
        and "tools" in event["data"]
    ]
    return api, details


async def test_member_tools_come_through_home_assistants_api(
    hass: HomeAssistant, household: Household, hass_admin_user: MockUser
) -> None:
    """A known speaker: the chat log's API is the household API, set by Home Assistant,
    with the Assist API's tools and the preference tools under their own names; Home
    Assistant's trace (Debug) lists them all (it missed the preference tools when they
    were added to the chat log afterwards)."""
    await household.async_update_settings({**household.settings, CONF_LLM_HASS_API: ["assist"]})
    await add_person(hass, hass_admin_user)
    api, details = await provide(hass, household, Context(user_id=hass_admin_user.id))
    assert api is not None
    assert api.api.id == HOUSEHOLD_API_ID
    names = {tool.name for tool in api.tools}
    assert names >= PREFERENCE_TOOLS
    assert "HassTurnOn" in names
    assert api.api_prompt  # the Assist API's prompt
    traced = {tool.name for tool in details[-1]["tools"]}
    assert PREFERENCE_TOOLS | {"HassTurnOn"} <= traced


async def test_unknown_speaker_gets_the_household_apis_only(
    hass: HomeAssistant, household: Household
) -> None:
    await household.async_update_settings({**household.settings, CONF_LLM_HASS_API: ["assist"]})
    api, _ = await provide(hass, household, Context())
    assert api is not None
    assert api.api.id == "assist"
    assert not PREFERENCE_TOOLS & {tool.name for tool in api.tools}

    # No household API either: no tools at all.
    await household.async_update_settings({**household.settings, CONF_LLM_HASS_API: []})
    api, _ = await provide(hass, household, Context())
    assert api is None


async def test_member_tools_without_household_apis(
    hass: HomeAssistant, household: Household, hass_admin_user: MockUser
) -> None:
    await household.async_update_settings({**household.settings, CONF_LLM_HASS_API: []})
    await add_person(hass, hass_admin_user)
    api, _ = await provide(hass, household, Context(user_id=hass_admin_user.id))
    assert api is not None
    assert {tool.name for tool in api.tools} == PREFERENCE_TOOLS
    assert api.api_prompt == ""


async def test_a_household_api_home_assistant_lacks_is_refused_as_before(
    hass: HomeAssistant, household: Household, hass_admin_user: MockUser
) -> None:
    """Home Assistant's own error answer ("Error preparing LLM API"), with or without a
    known speaker."""
    await household.async_update_settings({**household.settings, CONF_LLM_HASS_API: ["gone"]})
    await add_person(hass, hass_admin_user)
    for context in (Context(), Context(user_id=hass_admin_user.id)):
        with pytest.raises(conversation.ConverseError):
            await provide(hass, household, context)


async def test_household_api_is_nobody_elses_choice(
    hass: HomeAssistant, household: Household
) -> None:
    """Used outside Hearth's agent it offers nothing; the household form neither offers
    nor keeps it."""
    assert HOUSEHOLD_API_ID in {api.id for api in llm.async_get_apis(hass)}
    context = llm.LLMContext(
        **{
            f.name: None
            for f in dataclasses.fields(llm.LLMContext)
            if f.name not in ("platform", "context")
        },
        platform="other",
        context=Context(),
    )
    instance = await llm.async_get_api(hass, HOUSEHOLD_API_ID, context)
    assert instance.tools == []
    assert instance.api_prompt == ""
    assert filter_invalid_llm_apis(hass, [HOUSEHOLD_API_ID, "assist"]) == ["assist"]
