"""An answer the worker cut at the token limit (finish_reason "length") says so
everywhere: hearth.ask marks it partial with the reason, Assist ends it with a
translated note. The taught model (scripts/demo_model) answers "hello" with
"Hello from Hearth!" (several tokens, then its end): a limit of 2 tokens cuts it,
a limit of 64 does not."""

from __future__ import annotations

from typing import Any

from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import intent
from worker_process import WorkerProcess

from custom_components.hearth.const import (
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    DOMAIN,
)
from custom_components.hearth.household import Household

from .conftest import entry_for, setup_entry

AGENT = "conversation.hearth"
HELLO = "Hello from Hearth!"


async def set_up_household(hass: HomeAssistant, worker: WorkerProcess, max_tokens: int) -> None:
    await setup_entry(hass, entry_for(worker))
    household = Household.get(hass)
    await household.async_update_settings(
        {
            **household.settings,
            CONF_LLM_HASS_API: [],
            CONF_MAX_TOKENS: max_tokens,
            "temperature": 0.0,  # greedy: the taught answer
        }
    )


async def ask(hass: HomeAssistant, **data: Any) -> dict[str, Any]:
    response = await hass.services.async_call(
        DOMAIN, "ask", {"prompt": "hello", **data}, blocking=True, return_response=True
    )
    assert response is not None
    return dict(response)


async def test_ask_cut_by_the_limit_is_partial(
    hass: HomeAssistant, taught_worker: WorkerProcess
) -> None:
    await set_up_household(hass, taught_worker, 64)
    whole = await ask(hass)
    assert whole == {
        "answer": HELLO,
        "worker": "Test worker",
        "partial": False,
        "finish_reason": "stop",
        "error": None,
    }
    cut = await ask(hass, max_tokens=2)
    assert HELLO.startswith(cut["answer"])
    assert cut["answer"] != HELLO
    assert cut["partial"] is True
    assert cut["finish_reason"] == "length"
    assert cut["error"] == (
        "The answer was cut off here: it reached the longest answer allowed (2 tokens)."
    )


async def test_assist_answer_cut_by_the_limit_ends_with_a_note(
    hass: HomeAssistant, taught_worker: WorkerProcess
) -> None:
    await set_up_household(hass, taught_worker, 2)
    result = await conversation.async_converse(
        hass, "hello", None, Context(), language="en", agent_id=AGENT
    )
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    speech = result.response.speech["plain"]["speech"]
    answer, note = speech.split("\n\n")
    assert HELLO.startswith(answer)
    assert answer != HELLO
    assert note == "The answer was cut off here: it reached the longest answer allowed (2 tokens)."

    # A limit the answer fits in: no note.
    household = Household.get(hass)
    await household.async_update_settings({**household.settings, CONF_MAX_TOKENS: 64})
    result = await conversation.async_converse(
        hass, "hello", None, Context(), language="en", agent_id=AGENT
    )
    assert result.response.speech["plain"]["speech"] == HELLO
