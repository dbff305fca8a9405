"""Routing that knows the prompt cache, end to end with two real workers on 127.0.0.1.

The household sends each request's household-prefix key (X-Hearth-Prefix); the
worker that answered lists it in /v1/capacity (`prompt_cache.warm_keys`); the
next conversation, another member's first turn with the same household prompt,
goes to that worker although the other one would look sooner done without the
cache. `test_router.py` checks the rule on plain data.
"""

from __future__ import annotations

from dataclasses import replace

from homeassistant.core import HomeAssistant
from homeassistant.helpers import intent
from worker_process import WorkerProcess

from custom_components.hearth import router
from custom_components.hearth.household import household_prefix

from .test_household_routing import converse, first_turn_on_alpha, handle


def test_household_prefix_key_is_the_system_message_and_tools() -> None:
    tools = [{"type": "function", "function": {"name": "HassTurnOn", "parameters": {}}}]
    system = {"role": "system", "content": "You control a home. light.kitchen is off."}

    def body(*rest: dict[str, str], tools: list[dict[str, object]] = tools) -> dict[str, object]:
        return {"messages": [system, *rest], "tools": tools}

    anna = household_prefix(body({"role": "system", "content": "Anna: metric"}, USER))
    ben = household_prefix(body({"role": "user", "content": "is it warm?"}))
    assert anna is not None and ben is not None
    assert anna == ben  # what follows the household part does not count
    assert len(anna[0]) == 64 and anna[0] == anna[0].lower()
    assert anna[1] > 0
    # Canonical: key order of the tools does not count; their content does.
    reordered = [{"function": {"parameters": {}, "name": "HassTurnOn"}, "type": "function"}]
    assert household_prefix(body(USER, tools=reordered)) == (anna[0], anna[1])
    assert household_prefix(body(USER, tools=[]))[0] != anna[0]  # type: ignore[index]
    assert household_prefix({"messages": [USER]}) is None


USER = {"role": "user", "content": "turn on the kitchen light"}


async def test_next_member_goes_to_the_worker_holding_the_household_prefix(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    household, spy, recorder, first = await first_turn_on_alpha(
        hass, workers, "turn on the kitchen light"
    )
    key = spy.requests[-1].prefix_key
    assert key is not None and len(key) == 64
    assert spy.requests[-1].prefix_tokens > 0
    alpha, beta = handle(household, "Alpha"), handle(household, "Beta")
    for worker in (alpha, beta):
        await worker.coordinator.async_refresh()
    # Alpha's prompt cache holds the household prefix and says so; Beta's does not.
    assert any(key in keys for keys in alpha.state().warm_keys.values())
    assert not any(key in keys for keys in beta.state().warm_keys.values())

    # Just before it is ranked, other requests of ours are opened on the workers so
    # that, for a request without the key, Alpha looks slower than Beta by half of
    # what its cache saves: without the cache Beta would be asked, with it Alpha.
    cold_order: list[str] = []

    def slow_down_alpha(states: list[router.WorkerState], request: router.RouteRequest) -> None:
        if request.prefix_key != key or cold_order:
            return
        plain = replace(request, prefix_key=None, conversation_id=None)
        cold = {c.worker_id: c for c in router.Router.rank(spy, states, plain)}
        warm = {c.worker_id: c for c in router.Router.rank(spy, states, request)}
        assert "warm" in warm[alpha.entry_id].reasons and "warm" not in warm[beta.entry_id].reasons
        saved = cold[alpha.entry_id].estimated_s - warm[alpha.entry_id].estimated_s
        assert saved > 0
        target = max(cold[alpha.entry_id].estimated_s, cold[beta.entry_id].estimated_s + saved / 2)
        for worker_id, goal in ((alpha.entry_id, target), (beta.entry_id, target - saved / 2)):
            if (left := goal - cold[worker_id].estimated_s) > 0:  # one slot: it adds up
                spy.reserve(replace(cold[worker_id], estimated_s=left, work_s=left), plain)
        cold_order.extend(
            household.workers[c.worker_id].name for c in router.Router.rank(spy, states, plain)
        )
        best = router.Router.rank(spy, states, request)[0]
        assert best.worker_id == alpha.entry_id and "warm" in best.reasons

    spy.before_rank = slow_down_alpha
    released: list[int | None] = []
    real_release = spy.release

    def release(reservation: router.Reservation, **kwargs: int | None) -> None:
        if kwargs.get("completion_tokens") is not None:
            released.append(kwargs.get("cached_tokens"))
        real_release(reservation, **kwargs)

    spy.release = release  # type: ignore[method-assign]
    second = await converse(hass, "is the attic window open?")  # a new conversation
    assert second.conversation_id != first.conversation_id
    assert second.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert cold_order == ["Beta", "Alpha"]
    assert recorder.tried == ["Alpha", "Alpha"]
    assert spy.requests[-1].prefix_key == key  # the same household part, the same key
    # The router heard from Alpha's usage how much of the prompt its cache supplied.
    assert len(released) == 1 and (released[0] or 0) > 0
