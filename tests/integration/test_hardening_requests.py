"""The request path under any input: long messages, requests no worker can serve,
answers cut off before anyone saw them, members' preferences.

Real workers on 127.0.0.1 and a real Home Assistant; the conversation tests go
through Home Assistant's own conversation API (its HTTP view where it matters).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from typing import Any

import pytest
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError, Unauthorized
from homeassistant.helpers import intent
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockUser
from pytest_homeassistant_custom_component.typing import (
    ClientSessionGenerator,
    WebSocketGenerator,
)
from worker_process import WorkerProcess

from custom_components.hearth.const import (
    CONF_MAX_TOKENS,
    CONF_TEMPERATURE,
    DOMAIN,
)
from custom_components.hearth.household import Household

from .conftest import Tap, entry_for, setup_entry, setup_household
from .test_failover import CUT_OFF, LONG_STORY, kill_once, other, set_up_household

AGENT = "conversation.hearth"
NO_WORKER = "None of the household's Hearth workers can answer right now."
TOO_LONG = "This request is too long for the household's Hearth models ("
# About 14,000 tokens of the tiny model (context 8,192), but under the size that is
# refused before any worker is asked (8 characters a token of the largest context).
BEYOND_CONTEXT = "the sea and the mountains " * 1600


class MatcherSpy:
    """Records every text given to Home Assistant's sentence matcher (then runs it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.texts: list[str] = []
        real = conversation.async_handle_intents

        @functools.wraps(real)  # the agent reads the signature (it differs by version)
        async def spy(hass: HomeAssistant, user_input: Any, *args: Any, **kwargs: Any) -> Any:
            self.texts.append(user_input.text)
            return await real(hass, user_input, *args, **kwargs)

        monkeypatch.setattr(conversation, "async_handle_intents", spy)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records at INFO or above that carry a traceback."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.INFO and (record.exc_info or record.exc_text)
    ]


async def process(
    client: Any, text: str, conversation_id: str | None = None
) -> tuple[str, str, str | None]:
    """POST /api/conversation/process: (response type, speech, conversation id)."""
    body: dict[str, Any] = {"text": text, "agent_id": AGENT, "language": "en"}
    if conversation_id:
        body["conversation_id"] = conversation_id
    response = await client.post("/api/conversation/process", json=body)
    assert response.status == 200, await response.text()
    data = await response.json()
    answer = data["response"]
    return answer["response_type"], answer["speech"]["plain"]["speech"], data["conversation_id"]


# --- a long message cannot hang Home Assistant ----------------------------------


async def test_long_message_skips_sentence_matching(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    chat_worker: WorkerProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hearth never runs Home Assistant's sentence matcher itself (whose time grows with
    the square of the length, holding the event loop): "Prefer handling commands
    locally" is the pipeline's, before Hearth is asked. A short command and a long
    text both go to a worker."""
    household = await setup_household(hass, {"Test worker": chat_worker}, {CONF_MAX_TOKENS: 8})
    matcher = MatcherSpy(monkeypatch)
    tap = Tap(household)
    client = await hass_client()

    kind, _, _ = await process(client, "tell me a story about the garden")
    assert kind == "action_done"

    long_text = ("please tell me about the garden and the weather " * 50)[:2500]
    async with asyncio.timeout(60):
        kind, speech, _ = await process(client, long_text)
    assert matcher.texts == []
    assert tap.tried == ["Test worker", "Test worker"]  # a worker answered both
    assert kind == "action_done"
    assert speech


async def test_huge_message_is_refused_at_once_and_home_assistant_stays_responsive(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    chat_worker: WorkerProcess,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200,000 characters (this froze Home Assistant for minutes): a translated answer,
    nothing expensive runs, other requests are answered meanwhile, and the
    conversation goes on without the message."""
    assert await async_setup_component(hass, "api", {})
    household = await setup_household(hass, {"Test worker": chat_worker}, {CONF_MAX_TOKENS: 8})
    matcher = MatcherSpy(monkeypatch)
    tap = Tap(household)
    client = await hass_client()
    huge = "turn on the light and " * 9091  # 200,002 characters

    async with asyncio.timeout(60):
        posted = asyncio.create_task(process(client, huge))
        alive = await client.get("/api/")  # Home Assistant answers meanwhile
        kind, speech, conversation_id = await posted
    assert alive.status == 200
    assert kind == "error"
    limit = household.prompt_char_limit()
    assert speech == (
        f"This message is too long: {len(huge)} characters, and the household's Hearth "
        f"models read at most {limit}. Shorten it."
    )
    assert matcher.texts == []
    assert tap.tried == []  # no worker spent anything on it
    assert not tracebacks(caplog)

    # The next turn of the same conversation is answered (the huge one is not history).
    async with asyncio.timeout(60):
        kind, _, _ = await process(client, "tell me a story", conversation_id)
    assert kind == "action_done"
    assert tap.tried == ["Test worker"]


# --- the real reason, not "no worker" --------------------------------------------


async def test_prompt_beyond_the_context_says_so(
    hass: HomeAssistant,
    workers: dict[str, WorkerProcess],
    hass_ws_client: WebSocketGenerator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every worker is online and refuses the prompt as too long for its model: the
    answer says that (translated), not "no worker", and no traceback is logged."""
    household = await set_up_household(hass, workers)
    tap = Tap(household)
    assert len(BEYOND_CONTEXT) < household.prompt_char_limit()

    async with asyncio.timeout(60):
        result = await conversation.async_converse(
            hass, BEYOND_CONTEXT, None, Context(), language="en", agent_id=AGENT
        )
    assert sorted(tap.tried) == ["Alpha", "Beta"]  # both asked, both refused
    assert result.response.response_type is intent.IntentResponseType.ERROR
    speech = result.response.speech["plain"]["speech"]
    assert speech.startswith(TOO_LONG), speech
    assert "this model's context is 8192 tokens" in speech

    with pytest.raises(ServiceValidationError) as err:
        async with asyncio.timeout(60):
            await hass.services.async_call(
                DOMAIN, "ask", {"prompt": BEYOND_CONTEXT}, blocking=True, return_response=True
            )
    assert err.value.translation_key == "request_too_long"
    assert str(err.value).startswith(TOO_LONG)

    # Through the websocket API (the frontend, scripts): the reason, no traceback.
    websocket = await hass_ws_client(hass)
    await websocket.send_json_auto_id(
        {
            "type": "call_service",
            "domain": DOMAIN,
            "service": "ask",
            "service_data": {"prompt": BEYOND_CONTEXT},
            "return_response": True,
        }
    )
    async with asyncio.timeout(60):
        answer = await websocket.receive_json()
    assert answer["success"] is False
    assert answer["error"]["translation_key"] == "request_too_long"
    assert not tracebacks(caplog)


async def test_request_refused_by_every_worker_gives_its_reason(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """Bad arguments (a temperature the workers do not take): their reason, translated."""
    household = await set_up_household(hass, workers)
    await household.async_update_settings({**household.settings, CONF_TEMPERATURE: 2.5})
    with pytest.raises(ServiceValidationError) as err:
        async with asyncio.timeout(60):
            await hass.services.async_call(
                DOMAIN, "ask", {"prompt": "hi"}, blocking=True, return_response=True
            )
    assert err.value.translation_key == "request_refused"
    message = str(err.value)
    assert message.startswith("The Hearth worker ")
    assert "cannot handle this request: " in message
    assert "temperature" in message


async def test_unreachable_workers_still_say_no_worker(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """Only real unavailability says "no worker"."""
    await set_up_household(hass, workers)
    for worker in workers.values():
        worker.stop()
    with pytest.raises(HomeAssistantError) as err:
        async with asyncio.timeout(60):
            await hass.services.async_call(
                DOMAIN, "ask", {"prompt": "hi"}, blocking=True, return_response=True
            )
    assert err.value.translation_key == "no_worker"
    assert str(err.value).startswith(NO_WORKER)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
async def test_blank_prompt_is_refused(
    hass: HomeAssistant, chat_worker: WorkerProcess, prompt: str
) -> None:
    await setup_entry(hass, entry_for(chat_worker))
    tap = Tap(Household.get(hass))
    with pytest.raises(ServiceValidationError) as err:
        await hass.services.async_call(
            DOMAIN, "ask", {"prompt": prompt}, blocking=True, return_response=True
        )
    assert err.value.translation_key == "empty_prompt"
    assert str(err.value).rstrip(".") == "The prompt is empty: say what to ask"
    assert tap.tried == []


# --- no answer lost that could still be given ------------------------------------


async def test_ask_cut_off_is_asked_again_of_the_next_worker(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """hearth.ask passes nothing on before the answer is whole: a worker killed
    mid-answer costs nothing, the next worker gives the whole answer."""
    household = await set_up_household(hass, workers)
    tap = Tap(household)
    killed: list[str] = []
    tap.after_first_text = kill_once(workers, killed)
    async with asyncio.timeout(60):
        response = await hass.services.async_call(
            DOMAIN,
            "ask",
            {"prompt": LONG_STORY, "max_tokens": 4000},
            blocking=True,
            return_response=True,
        )
    assert response is not None
    survivor = other(workers, killed[0])
    assert tap.tried == [killed[0], survivor]
    assert response["worker"] == survivor
    assert response["finish_reason"] in ("stop", "length")  # no break-off: the worker finished
    assert response["partial"] is (response["finish_reason"] == "length")
    assert response["answer"]
    assert workers[killed[0]].process.wait(5) == -signal.SIGKILL


async def test_ai_task_cut_off_is_asked_again_of_the_next_worker(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """An AI task's data is whole or an error: a cut-off answer goes to the next worker
    (2026.2.3 leg only: Home Assistant 2025.4 has no ai_task)."""
    ai_task = pytest.importorskip("homeassistant.components.ai_task")
    household = await set_up_household(hass, workers)
    tap = Tap(household)
    killed: list[str] = []
    tap.after_first_text = kill_once(workers, killed)
    async with asyncio.timeout(60):
        result = await ai_task.async_generate_data(
            hass, task_name="story", entity_id="ai_task.hearth", instructions=LONG_STORY
        )
    survivor = other(workers, killed[0])
    assert tap.tried == [killed[0], survivor]
    assert isinstance(result.data, str)
    assert result.data
    assert CUT_OFF.format(name=killed[0]) not in result.data


# --- hearth.ask(person=...) respects members -------------------------------------


async def test_ask_with_another_members_person_needs_an_administrator(
    hass: HomeAssistant,
    hass_admin_user: MockUser,
    hass_read_only_user: MockUser,
    chat_worker: WorkerProcess,
) -> None:
    await setup_entry(hass, entry_for(chat_worker))
    assert await async_setup_component(
        hass,
        "person",
        {
            "person": [
                {"id": "alice", "name": "Alice", "user_id": hass_read_only_user.id},
                {"id": "bob", "name": "Bob", "user_id": hass_admin_user.id},
            ]
        },
    )
    await hass.services.async_call(
        DOMAIN,
        "preferences_set",
        {"person": "person.bob", "category": "diet", "value": "no peanuts"},
        blocking=True,
    )
    household: Household = Household.get(hass)
    await household.async_update_settings({**household.settings, CONF_MAX_TOKENS: 4})
    tap = Tap(household)

    async def ask(person: str, user: MockUser) -> Any:
        return await hass.services.async_call(
            DOMAIN,
            "ask",
            {"prompt": "What should I cook?", "person": person},
            blocking=True,
            return_response=True,
            context=Context(user_id=user.id),
        )

    with pytest.raises(Unauthorized):
        await ask("person.bob", hass_read_only_user)
    assert tap.tried == []  # nothing of Bob's went anywhere
    assert (await ask("person.alice", hass_read_only_user))["finish_reason"]  # her own
    assert (await ask("person.alice", hass_admin_user))["finish_reason"]  # an admin
    assert len(tap.tried) == 2
