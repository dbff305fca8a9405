"""The Hearth agent and hearth.ask against real worker processes on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest
from homeassistant.components import conversation
from homeassistant.components.conversation import trace as conversation_trace
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.typing import WebSocketGenerator
from worker_process import WorkerProcess

from custom_components.hearth.assistant import parse_tool_arguments
from custom_components.hearth.const import (
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    DOMAIN,
    SETTINGS_STORAGE_KEY,
    STORAGE_VERSION,
)
from custom_components.hearth.household import Household
from custom_components.hearth.router import Candidate, RouteRequest

from .conftest import entry_for, setup_entry

AGENT = "conversation.hearth"
NO_WORKER = "None of the household's Hearth workers can answer right now."


async def use_settings(hass: HomeAssistant, **settings: object) -> None:
    household = Household.get(hass)
    await household.async_update_settings({**household.settings, **settings})


async def plain_settings(hass: HomeAssistant) -> None:
    """No tools, no local intents, short answers: fast with the random tiny model."""
    await use_settings(
        hass,
        **{CONF_LLM_HASS_API: [], CONF_MAX_TOKENS: 16},
    )


async def converse(hass: HomeAssistant, text: str, conversation_id: str | None = None):  # type: ignore[no-untyped-def]
    return await conversation.async_converse(
        hass, text, conversation_id, Context(), language="en", agent_id=AGENT
    )


def record_requests(hass: HomeAssistant) -> list[tuple[str, dict[str, Any]]]:
    """(worker name, request body) of every chat request the household sends from now on."""
    sent: list[tuple[str, dict[str, Any]]] = []

    def wrap(name: str, real: Any) -> Any:
        async def chat_stream(body: dict[str, Any], *args: Any) -> Any:
            sent.append((name, body))
            return await real(body, *args)

        return chat_stream

    for handle in Household.get(hass).workers.values():
        handle.client.chat_stream = wrap(handle.name, handle.client.chat_stream)
    return sent


def chat_turns(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The user and assistant messages of a request, without the system prompt."""
    return [(m["role"], m["content"]) for m in body["messages"] if m["role"] != "system"]


async def test_conversation_answers(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:
    await setup_entry(hass, entry_for(chat_worker))
    await plain_settings(hass)
    sent = record_requests(hass)
    result = await converse(hass, "hello")
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    first = result.response.speech["plain"]["speech"]
    assert isinstance(first, str)
    assert first
    assert chat_turns(sent[0][1]) == [("user", "hello")]
    # A second turn in the same conversation carries the history.
    again = await converse(hass, "and again", result.conversation_id)
    assert again.conversation_id == result.conversation_id
    assert again.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert len(sent) == 2
    assert chat_turns(sent[1][1]) == [
        ("user", "hello"),
        ("assistant", first),
        ("user", "and again"),
    ]
    # Another conversation starts afresh.
    await converse(hass, "hi there")
    assert chat_turns(sent[2][1]) == [("user", "hi there")]


async def test_ask_action(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:
    await setup_entry(hass, entry_for(chat_worker, "Kitchen laptop"))
    await plain_settings(hass)
    response = await hass.services.async_call(
        DOMAIN,
        "ask",
        {"prompt": "Write a haiku", "instructions": "Be brief.", "max_tokens": 8},
        blocking=True,
        return_response=True,
    )
    assert response is not None
    assert set(response) == {"answer", "worker", "partial", "finish_reason", "error"}
    assert isinstance(response["answer"], str)
    # 8 tokens of the random tiny model: it stops, or the length limit cuts it
    # (tests/integration/test_finish_length.py: which, and what it says).
    assert response["finish_reason"] in ("stop", "length")
    assert response["partial"] is (response["finish_reason"] == "length")
    assert (response["error"] is None) is (response["finish_reason"] == "stop")
    assert response["worker"] == "Kitchen laptop"


async def test_no_worker_gives_translated_error(
    hass: HomeAssistant, own_worker: WorkerProcess
) -> None:
    await setup_entry(hass, entry_for(own_worker))
    await plain_settings(hass)
    own_worker.stop()  # gone, before the coordinator has noticed
    result = await converse(hass, "hello")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert result.response.speech["plain"]["speech"].startswith(NO_WORKER)
    with pytest.raises(HomeAssistantError) as err:
        await hass.services.async_call(
            DOMAIN, "ask", {"prompt": "hi"}, blocking=True, return_response=True
        )
    assert err.value.translation_key == "no_worker"
    assert str(err.value).startswith(NO_WORKER)


async def test_fails_over_to_the_next_worker(
    hass: HomeAssistant, chat_worker: WorkerProcess, own_worker: WorkerProcess
) -> None:
    """The worker the router ranks first is gone (not noticed yet): the next one answers."""
    await setup_entry(hass, entry_for(own_worker, "Stopped"))
    await setup_entry(hass, entry_for(chat_worker, "Running"))
    await plain_settings(hass)
    household = Household.get(hass)
    running = next(h for h in household.workers.values() if h.name == "Running")
    # Another of our requests (100 s) is open on Running: the router ranks Stopped first.
    busy = household.routing.reserve(
        Candidate(running.entry_id, running.coordinator.info.chat_models[0], 100.0, work_s=100.0),
        RouteRequest(purpose="other"),
    )
    ranked = household.candidates(RouteRequest(max_new_tokens=4))
    assert [household.workers[c.worker_id].name for c in ranked] == ["Stopped", "Running"]
    sent = record_requests(hass)
    own_worker.stop()
    response = await hass.services.async_call(
        DOMAIN, "ask", {"prompt": "hi", "max_tokens": 4}, blocking=True, return_response=True
    )
    assert [name for name, _ in sent] == ["Stopped", "Running"]
    assert response is not None
    assert response["worker"] == "Running"
    assert response["finish_reason"] in ("stop", "length")  # answered to the end
    household.routing.release(busy)


async def setup_kitchen_light(hass: HomeAssistant) -> None:
    """A light named "Kitchen light", exposed to Assist, backed by an input_boolean."""
    assert await async_setup_component(
        hass, "input_boolean", {"input_boolean": {"kitchen": {"name": "Kitchen power"}}}
    )
    assert await async_setup_component(
        hass,
        "light",
        {
            "light": {
                "platform": "template",
                "lights": {
                    "kitchen_light": {
                        "friendly_name": "Kitchen light",
                        "value_template": "{{ is_state('input_boolean.kitchen', 'on') }}",
                        "turn_on": {
                            "action": "input_boolean.turn_on",
                            "target": {"entity_id": "input_boolean.kitchen"},
                        },
                        "turn_off": {
                            "action": "input_boolean.turn_off",
                            "target": {"entity_id": "input_boolean.kitchen"},
                        },
                    }
                },
            }
        },
    )
    await hass.async_block_till_done()
    assert hass.states.get("light.kitchen_light").state == "off"


async def run_pipeline(
    hass: HomeAssistant, hass_ws_client: WebSocketGenerator, text: str, *, prefer_local: bool
) -> dict[str, Any]:
    """Home Assistant's Assist pipeline (text in, the agent's answer out) with Hearth as its
    agent and its own "Prefer handling commands locally" set: the intent-end event's data."""
    assist_pipeline = pytest.importorskip("homeassistant.components.assist_pipeline")
    assert await async_setup_component(hass, "assist_pipeline", {})
    pipeline = assist_pipeline.async_get_pipeline(hass)
    await assist_pipeline.pipeline.async_update_pipeline(
        hass, pipeline, conversation_engine=AGENT, prefer_local_intents=prefer_local
    )
    client = await hass_ws_client(hass)
    await client.send_json_auto_id(
        {
            "type": "assist_pipeline/run",
            "start_stage": "intent",
            "end_stage": "intent",
            "input": {"text": text},
            "pipeline": pipeline.id,
        }
    )
    assert (await client.receive_json())["success"]
    while (event := (await client.receive_json())["event"])["type"] != "run-end":
        assert event["type"] != "error", event
        if event["type"] == "intent-end":
            ended: dict[str, Any] = event["data"]
    return ended


async def test_local_intents_first_is_home_assistants_pipeline_setting(
    hass: HomeAssistant, hass_ws_client: WebSocketGenerator, own_worker: WorkerProcess
) -> None:
    """Home Assistant's "Prefer handling commands locally" (the pipeline's) lets its own
    sentences handle a plain command before Hearth: no worker needed. Off (its default),
    the command goes to Hearth."""
    await setup_kitchen_light(hass)
    await setup_entry(hass, entry_for(own_worker))
    own_worker.stop()  # Home Assistant's own intents need no worker
    ended = await run_pipeline(hass, hass_ws_client, "turn on the kitchen light", prefer_local=True)
    assert ended["processed_locally"] is True
    await hass.async_block_till_done()
    assert hass.states.get("light.kitchen_light").state == "on"

    ended = await run_pipeline(
        hass, hass_ws_client, "turn off the kitchen light", prefer_local=False
    )
    assert ended["processed_locally"] is False
    assert ended["intent_output"]["response"]["speech"]["plain"]["speech"].startswith(NO_WORKER)
    await hass.async_block_till_done()
    assert hass.states.get("light.kitchen_light").state == "on"


async def test_hearth_has_no_local_intents_switch_of_its_own(
    hass: HomeAssistant, hass_storage: dict[str, Any], own_worker: WorkerProcess
) -> None:
    """Hearth's own "prefer local" switch is gone (one switch: the pipeline's); one stored
    by an older version is dropped and changes nothing: a command goes to a worker."""
    await setup_kitchen_light(hass)
    hass_storage[SETTINGS_STORAGE_KEY] = {
        "version": STORAGE_VERSION,
        "key": SETTINGS_STORAGE_KEY,
        "data": {CONF_LLM_HASS_API: ["assist"], "prefer_local_intents": True},
    }
    await setup_entry(hass, entry_for(own_worker))
    household = Household.get(hass)
    assert household.settings[CONF_LLM_HASS_API] == ["assist"]  # the stored settings were read
    assert "prefer_local_intents" not in household.settings
    await household.async_update_settings(household.settings)
    assert "prefer_local_intents" not in hass_storage[SETTINGS_STORAGE_KEY]["data"]
    own_worker.stop()
    result = await converse(hass, "turn on the kitchen light")
    assert result.response.speech["plain"]["speech"].startswith(NO_WORKER)
    await hass.async_block_till_done()
    assert hass.states.get("light.kitchen_light").state == "off"


async def test_tool_call_turns_on_the_light(
    hass: HomeAssistant, taught_worker: WorkerProcess
) -> None:
    """The model calls HassTurnOn through the Assist API; the light really goes on."""
    await setup_kitchen_light(hass)
    await setup_entry(hass, entry_for(taught_worker))
    await use_settings(
        hass,
        **{CONF_LLM_HASS_API: ["assist"], CONF_MAX_TOKENS: 64},
    )
    result = await converse(hass, "turn on the kitchen light")
    await hass.async_block_till_done()
    assert hass.states.get("light.kitchen_light").state == "on"
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert result.response.speech["plain"]["speech"] == "The kitchen light is on."

    hello = await converse(hass, "hello")
    assert hello.response.speech["plain"]["speech"] == "Hello from Hearth!"

    # The trace (Settings -> Voice assistants -> Debug) tells what each round came to.
    light, greeting = (
        [r["hearth"] for r in hearth_rounds(t)] for t in conversation_trace.async_get_traces()[-2:]
    )
    assert [d["tool_calls"] for d in light] == [1, 0]  # the call, then the answer in words
    assert [d["answered_without_tool_call"] for d in light] == [False, False]
    assert [d["answered_without_tool_call"] for d in greeting] == [True]
    assert {d["worker"] for d in light + greeting} == {taught_worker_name(hass)}
    assert all(d["finish_reason"] in ("stop", "tool_calls") for d in light + greeting)
    (stats,) = (r["stats"] for r in hearth_rounds(conversation_trace.async_get_traces()[-1]))
    assert stats["input_tokens"] > stats["cached_input_tokens"] >= 0
    assert stats["output_tokens"] > 0


def hearth_rounds(trace: conversation_trace.ConversationTrace) -> list[dict[str, Any]]:
    """What Hearth traced for each round of one conversation turn (`hearth`, `stats`)."""
    return [
        event["data"]
        for event in trace.as_dict()["events"]
        if event["event_type"] == conversation_trace.ConversationTraceEventType.AGENT_DETAIL
        and "hearth" in event["data"]
    ]


def taught_worker_name(hass: HomeAssistant) -> str:
    (handle,) = Household.get(hass).workers.values()
    return str(handle.name)


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ('{"name": "kitchen light"}', {"name": "kitchen light"}),
        ({"name": "x", "area": ""}, {"name": "x"}),
        ('```json\n{"name": "x"}\n```', {"name": "x"}),
        ("{'name': 'x', 'on': True}", {"name": "x", "on": True}),
        ('Sure: {"name": "x"} done', {"name": "x"}),
        ('{"domain": "[\\"light\\"]"}', {"domain": ["light"]}),
        ('{"domain": "[not json]"}', {"domain": "[not json]"}),
        ("not json at all", {}),
        ("", {}),
        ("[1, 2]", {}),
        (None, {}),
    ],
)
def test_tool_arguments_parsed_tolerantly(raw: object, parsed: dict[str, object]) -> None:
    assert parse_tool_arguments(raw) == parsed
