"""The request laid out for the workers' prompt cache (issue 10).

What every household request shares comes first (the tools, Home Assistant's
prompt with the exposed entities, the instructions), then the member's
preferences, then the time: two members' first turns render to the same text up
to the end of the household part, and a conversation's next turn extends the
text of the one before. Rendered with the worker's own chat template code and
the tiny model's template; answered by real workers.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from hearth_worker.chat_template import ChatTemplate
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import area_registry as ar
from homeassistant.helpers import device_registry as dr
from homeassistant.setup import async_setup_component
from homeassistant.util import dt as dt_util
from pytest_homeassistant_custom_component.common import MockConfigEntry, MockUser
from worker_process import WorkerProcess

from custom_components.hearth.assistant import PromptLayout, SplitPrompt, split_system_prompt
from custom_components.hearth.const import (
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_TEMPERATURE,
    DEVICES_ONLY_THROUGH_TOOLS_PROMPT,
    DOMAIN,
)
from custom_components.hearth.household import Household

from .conftest import entry_for, setup_entry

AGENT = "conversation.hearth"


@pytest.fixture
def clock() -> Iterator[list[datetime]]:
    """Home Assistant's now() (the prompt's time), set by the test."""
    times = [dt_util.now().replace(hour=8, minute=0, second=0, microsecond=0)]

    def now(time_zone: Any = None) -> datetime:
        return times[-1] if time_zone is None else times[-1].astimezone(time_zone)

    with patch.object(dt_util, "now", now):
        yield times


async def set_up_household(
    hass: HomeAssistant, worker: WorkerProcess, *members: MockUser
) -> MockConfigEntry:
    """A worker, Assist's tools, two exposed lights, and a person per member."""
    entry = entry_for(worker)
    await setup_entry(hass, entry)
    household = Household.get(hass)
    await household.async_update_settings(
        {
            **household.settings,
            CONF_LLM_HASS_API: ["assist"],
            CONF_MAX_TOKENS: 4,
        }
    )
    hass.states.async_set("light.kitchen", "off", {"friendly_name": "Kitchen light"})
    hass.states.async_set("light.porch", "on", {"friendly_name": "Porch light"})
    names = ["Alice", "Bob"]
    persons = [
        {"id": name.lower(), "name": name, "user_id": user.id}
        for name, user in zip(names, members, strict=False)
    ]
    assert await async_setup_component(hass, "person", {"person": persons})
    await hass.async_block_till_done()
    return entry


def record_requests(hass: HomeAssistant) -> list[dict[str, Any]]:
    """Every chat request body the household sends from now on, as a worker gets it."""
    sent: list[dict[str, Any]] = []
    for handle in Household.get(hass).workers.values():
        real = handle.client.chat_stream

        async def chat_stream(body: dict[str, Any], *args: Any, real: Any = real) -> Any:
            sent.append(body)
            return await real(body, *args)

        handle.client.chat_stream = chat_stream
    return sent


async def set_preference(hass: HomeAssistant, person: str, category: str, value: str) -> None:
    await hass.services.async_call(
        DOMAIN,
        "preferences_set",
        {"person": person, "category": category, "value": value},
        blocking=True,
        return_response=True,
    )


async def converse(
    hass: HomeAssistant, text: str, user: MockUser, conversation_id: str | None = None
) -> conversation.ConversationResult:
    return await conversation.async_converse(
        hass, text, conversation_id, Context(user_id=user.id), language="en", agent_id=AGENT
    )


def render(template: ChatTemplate, body: dict[str, Any], *, prompt: bool = True) -> str:
    return template.render(body["messages"], tools=body.get("tools"), add_generation_prompt=prompt)


async def test_two_members_share_the_household_prefix(
    hass: HomeAssistant,
    hass_admin_user: MockUser,
    hass_read_only_user: MockUser,
    chat_worker: WorkerProcess,
    tiny_chat_model: Path,
    clock: list[datetime],
) -> None:
    await set_up_household(hass, chat_worker, hass_admin_user, hass_read_only_user)
    await set_preference(hass, "person.alice", "units", "grams")
    await set_preference(hass, "person.bob", "diet", "vegetarian")
    sent = record_requests(hass)
    alice = await converse(hass, "what can I cook tonight", hass_admin_user)
    clock.append(clock[-1].replace(minute=3, second=17))
    await converse(hass, "is the porch light on", hass_read_only_user)
    assert len(sent) == 2

    template = ChatTemplate.from_model_dir(tiny_chat_model)
    first, second = (render(template, body) for body in sent)
    # The household part: the system message and the tools the template puts with it.
    assert sent[0]["messages"][0] == sent[1]["messages"][0]
    assert sent[0]["tools"] == sent[1]["tools"]
    shared = render(template, {**sent[0], "messages": sent[0]["messages"][:1]}, prompt=False)
    assert first.startswith(shared)
    assert second.startswith(shared)
    for part in ("HassTurnOn", "Kitchen light", "Porch light", DEVICES_ONLY_THROUGH_TOOLS_PROMPT):
        assert part in shared
    for part in ("Current time", "Alice", "Bob", "grams", "vegetarian"):
        assert part not in shared
    # ... and the requests differ only after it: the member, then the time.
    common = next(
        (first[:n] for n, (a, b) in enumerate(zip(first, second, strict=False)) if a != b), first
    )
    assert len(common) <= len(shared) + len("<|im_start|>system\n")
    alice_rest, bob_rest = first[len(shared) :], second[len(shared) :]
    assert alice_rest.index("- Units: grams") < alice_rest.index("what can I cook tonight")
    assert bob_rest.index("- Diet: vegetarian") < bob_rest.index("is the porch light on")
    assert alice_rest.index("grams") < alice_rest.index("Current time is 08:00:00")
    assert alice_rest.index("Current time is") < alice_rest.index("what can I cook tonight")
    assert bob_rest.index("vegetarian") < bob_rest.index("Current time is 08:03:17")
    assert "grams" not in second
    assert "vegetarian" not in first

    # Alice's next turn, later: the first turn's request, extended (its time kept).
    clock.append(clock[-1].replace(minute=9, second=2))
    await converse(hass, "and for two people", hass_admin_user, alice.conversation_id)
    assert len(sent) == 3
    assert sent[2]["messages"][: len(sent[0]["messages"])] == sent[0]["messages"]
    third = render(template, sent[2])
    assert third.startswith(first)
    new = third[len(first) :]
    assert "grams" not in new  # her preferences are in the conversation already
    assert "Current time is 08:09:02" in new
    assert new.index("Current time is") < new.index("and for two people")


async def test_a_conversation_without_a_known_member(
    hass: HomeAssistant, chat_worker: WorkerProcess, tiny_chat_model: Path, clock: list[datetime]
) -> None:
    """A satellite nobody is known at: the household part, then only the time."""
    await set_up_household(hass, chat_worker)
    sent = record_requests(hass)
    await conversation.async_converse(
        hass, "turn on the kitchen light", None, Context(), language="en", agent_id=AGENT
    )
    system, note, user = sent[0]["messages"]
    assert system["role"] == note["role"] == "system"
    assert DEVICES_ONLY_THROUGH_TOOLS_PROMPT in system["content"]
    assert "Current time" not in system["content"]
    # The time, cut out of Home Assistant's prompt (2025.4), or added where its prompt
    # has none (a GetDateTime tool instead, 2025.11 and later).
    assert note["content"] == "Current time is 08:00:00. Today's date is " + (
        f"{clock[-1]:%Y-%m-%d}."
    )
    assert user == {"role": "user", "content": "turn on the kitchen light"}


async def test_no_device_tools_no_device_line(
    hass: HomeAssistant, chat_worker: WorkerProcess, clock: list[datetime]
) -> None:
    await set_up_household(hass, chat_worker)
    household = Household.get(hass)
    await household.async_update_settings({**household.settings, CONF_LLM_HASS_API: []})
    sent = record_requests(hass)
    await conversation.async_converse(hass, "hello", None, Context(), language="en", agent_id=AGENT)
    assert "tools" not in sent[0]
    assert DEVICES_ONLY_THROUGH_TOOLS_PROMPT not in json.dumps(sent[0])


def test_split_system_prompt() -> None:
    """Home Assistant's prompt, on either version's layout: the time and area go apart."""
    area = (
        "You are in area Kitchen (floor Ground) and all generic commands like "
        "'turn on the lights' should target this area."
    )
    time = "Current time is 07:05:09. Today's date is 2026-11-29."
    old = f"{time}\nYou are a voice assistant.\nWhen controlling...\n{area}\nStatic Context: x"
    new = f"You are a voice assistant.\nWhen controlling...\n{area}\nStatic Context: x\n{time}\n"
    for text in (old, new):
        assert split_system_prompt(text) == SplitPrompt(
            "You are a voice assistant.\nWhen controlling...\n\nStatic Context: x",
            f"{area}\n{time}",
            None,
        )
    split = split_system_prompt(f"{new}\nBe quick, it's an alarm.", "Be quick, it's an alarm.")
    assert split.extra == "Be quick, it's an alarm."
    assert "alarm" not in split.household
    assert split_system_prompt("Nothing to move.") == SplitPrompt("Nothing to move.", "", None)


def test_layout_notes_are_kept_per_turn_and_bounded() -> None:
    layout = PromptLayout(max_conversations=2)
    prompt = SplitPrompt("household", "Current time is 1.", None)
    layout.set_section("a", 1, "prefs")
    assert layout.notes("a", 1, "hi", prompt) == {1: ("hi", "prefs\nCurrent time is 1.")}
    later = SplitPrompt("household", "Current time is 2.", None)
    layout.set_section("a", 2, "prefs")  # unchanged: not said again
    notes = layout.notes("a", 2, "more", later)
    assert notes == {1: ("hi", "prefs\nCurrent time is 1."), 2: ("more", "Current time is 2.")}
    assert layout.notes("a", 2, "more", prompt)[2] == ("more", "Current time is 2.")  # kept
    layout.set_section("a", 3, "other prefs")  # changed: said again
    assert layout.notes("a", 3, "x", later)[3] == ("x", "other prefs\nCurrent time is 2.")
    layout.notes("b", 1, "hi", prompt)
    layout.notes("c", 1, "hi", prompt)  # "a" is the least recent: forgotten
    assert layout.notes("a", 1, "hi", later) == {1: ("hi", "Current time is 2.")}


def post(worker: WorkerProcess, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        worker.url + "/v1/chat/completions",
        data=json.dumps({**body, "stream": False}).encode(),
        headers={**worker.headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120, context=worker.ssl) as response:
        return dict(json.load(response))


async def test_the_second_member_finds_the_household_prefix_cached(
    hass: HomeAssistant,
    hass_admin_user: MockUser,
    hass_read_only_user: MockUser,
    chat_worker: WorkerProcess,
    own_worker: WorkerProcess,
    clock: list[datetime],
) -> None:
    """Two members' first turns, sent to a fresh worker: the second finds the household
    part in the worker's prompt cache; the first member's next turn finds all of hers."""
    await set_up_household(hass, chat_worker, hass_admin_user, hass_read_only_user)
    await set_preference(hass, "person.alice", "units", "grams")
    await set_preference(hass, "person.bob", "diet", "vegetarian")
    sent = record_requests(hass)
    alice = await converse(hass, "what can I cook tonight", hass_admin_user)
    await converse(hass, "is the porch light on", hass_read_only_user)
    await converse(hass, "and for two people", hass_admin_user, alice.conversation_id)
    assert len(sent) == 3

    alice_1, bob_1, alice_2 = sent
    household_only = {**alice_1, "messages": alice_1["messages"][:1]}
    loop = asyncio.get_running_loop()
    usage = []
    # Alice's turns, then Bob's; the household part alone last (it fills the cache).
    for body in (alice_1, alice_2, bob_1, household_only):
        answer = await loop.run_in_executor(None, post, own_worker, body)
        usage.append(answer["usage"])
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usage]
    prompt = [u["prompt_tokens"] for u in usage]
    # The household part's tokens, without the few of the assistant's turn start.
    shared = prompt[3] - 4
    assert shared > prompt[2] // 2  # most of a request: the tools and the entities
    assert cached[0] == 0  # a fresh worker
    assert cached[1] >= prompt[0]  # Alice's second turn: all of her first turn's prompt
    assert cached[2] >= shared  # Bob's first turn: the household part came from the cache


async def test_temperature_is_the_models_unless_the_household_sets_one(
    hass: HomeAssistant, chat_worker: WorkerProcess, clock: list[datetime]
) -> None:
    """By default no temperature is sent (the worker uses the model's own default);
    the household form offers that as an empty field, and keeps an explicit number."""
    entry = await set_up_household(hass, chat_worker)
    household = Household.get(hass)
    assert household.settings[CONF_TEMPERATURE] is None
    sent = record_requests(hass)
    await conversation.async_converse(hass, "hello", None, Context(), language="en", agent_id=AGENT)
    await hass.services.async_call(
        DOMAIN, "ask", {"prompt": "hi", "max_tokens": 2}, blocking=True, return_response=True
    )
    assert [("temperature" in body) for body in sent] == [False, False]

    async def household_form(answers: dict[str, Any]) -> None:
        menu = await hass.config_entries.options.async_init(entry.entry_id)
        form = await hass.config_entries.options.async_configure(
            menu["flow_id"], {"next_step_id": "household"}
        )
        assert form["type"] is FlowResultType.FORM
        result = await hass.config_entries.options.async_configure(
            form["flow_id"], {CONF_MAX_TOKENS: 4, **answers}
        )
        assert result["type"] is FlowResultType.CREATE_ENTRY

    await household_form({CONF_TEMPERATURE: 0})
    assert household.settings[CONF_TEMPERATURE] == 0
    sent.clear()
    await conversation.async_converse(hass, "hello", None, Context(), language="en", agent_id=AGENT)
    await hass.services.async_call(
        DOMAIN, "ask", {"prompt": "hi", "max_tokens": 2}, blocking=True, return_response=True
    )
    assert [body.get("temperature") for body in sent] == [0.0, 0.0]

    await household_form({})  # emptied: the model's default again
    assert household.settings[CONF_TEMPERATURE] is None
    sent.clear()
    await conversation.async_converse(hass, "hello", None, Context(), language="en", agent_id=AGENT)
    assert "temperature" not in sent[0]


async def test_satellites_in_two_areas_share_the_household_prefix(
    hass: HomeAssistant, chat_worker: WorkerProcess, clock: list[datetime]
) -> None:
    """The Assist prompt's line for the speaking device's area goes to the turn's note."""
    entry = await set_up_household(hass, chat_worker)
    areas = ar.async_get(hass)
    devices = dr.async_get(hass)
    satellites = []
    for name in ("Kitchen", "Bedroom"):
        device = devices.async_get_or_create(
            config_entry_id=entry.entry_id, identifiers={(DOMAIN, f"satellite-{name}")}
        )
        area = areas.async_get_or_create(name)
        devices.async_update_device(device.id, area_id=area.id)
        satellites.append(device.id)
    sent = record_requests(hass)
    for device_id in satellites:
        await conversation.async_converse(
            hass,
            "turn on the light",
            None,
            Context(),
            language="en",
            agent_id=AGENT,
            device_id=device_id,
        )
    (kitchen_system, kitchen_note, _), (bedroom_system, bedroom_note, _) = (
        body["messages"] for body in sent
    )
    assert kitchen_system == bedroom_system
    assert "You are in area" not in kitchen_system["content"]
    assert kitchen_note["content"].startswith("You are in area Kitchen ")
    assert bedroom_note["content"].startswith("You are in area Bedroom ")
    assert "Current time is 08:00:00" in kitchen_note["content"]
