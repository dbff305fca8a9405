"""scripts/develop's stack end to end: a real Home Assistant process driven over REST and
WebSocket, as a new user would: onboarding, the discovered worker paired with its code,
Hearth as the Assist agent switching the demo light, and hearth.ask from a script."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from hearth_worker.discovery import SERVICE_TYPE
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from scripts import develop

from .home_assistant import HomeAssistant, speech

pytestmark = pytest.mark.slow

AGENT = "conversation.hearth"
LIGHT = "light.kitchen_light"


async def wait_for_txt(name: str, key: str, value: str, timeout: float = 60.0) -> None:
    """Until the worker's mDNS TXT record (on loopback) says key=value, as Home Assistant
    hears it; the worker re-announces itself when paired."""
    zeroconf = AsyncZeroconf(interfaces=[develop.LOOPBACK], ip_version=IPVersion.V4Only)
    try:
        deadline = time.monotonic() + timeout
        seen: dict[bytes, bytes | None] = {}
        while True:
            info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}")
            if await info.async_request(zeroconf.zeroconf, 3000):
                seen = dict(info.properties)
                if seen.get(key.encode()) == value.encode():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no TXT {key}={value} in {timeout:.0f} s; saw {seen}")
            await asyncio.sleep(0.5)
    finally:
        await zeroconf.async_close()


async def test_develop_end_to_end(stack: develop.Stack, http: aiohttp.ClientSession) -> None:
    ha = HomeAssistant(http, stack.ha_url)
    assert stack.ha_url.startswith("http://127.0.0.1:")
    await ha.onboard()
    assert await ha.state(LIGHT) == "off"

    async with ha.websocket():
        # The worker, advertised over mDNS on loopback, waits under Settings > Discovered.
        flow = await ha.discovered_flow("hearth", stack.node_id)
        assert flow["context"]["source"] == "zeroconf"
        # ("Demo worker-2" while another scripts/develop advertises on this machine)
        assert flow["context"]["title_placeholders"]["name"].startswith(develop.WORKER_NAME)
        entry = await ha.pair(flow["flow_id"], stack.pairing_code)
        assert entry["domain"] == "hearth"
        assert entry["title"] == develop.WORKER_NAME
        assert entry["state"] == "loaded"
        # No longer "discovered": once the worker re-announces itself as paired, Home
        # Assistant finds its id configured (no fixed sleep: wait for that announcement).
        name = flow["context"]["title_placeholders"]["name"]
        await wait_for_txt(name, "paired", "true")
        await ha.no_discovered_flow("hearth", stack.node_id)

        # Let the model do the work (not Home Assistant's own sentence matching).
        await ha.set_options(
            entry["entry_id"],
            llm_hass_api=["assist"],
            max_tokens=64,
            temperature=0,
        )
        pipeline = await ha.use_conversation_agent(AGENT)
        assert pipeline["conversation_engine"] == AGENT

        events = await ha.assist("turn on the kitchen light")
        types = [e["type"] for e in events]
        assert types[:2] == ["run-start", "intent-start"], types
        assert types[-2:] == ["intent-end", "run-end"], types
        assert events[1]["data"]["engine"] == AGENT
        # Streamed (intent-progress): the model's tool call, Home Assistant's result, the answer.
        deltas = [e["data"]["chat_log_delta"] for e in events if e["type"] == "intent-progress"]
        calls = [call for d in deltas for call in d.get("tool_calls", [])]
        assert [(c["tool_name"], c["tool_args"]) for c in calls] == [
            ("HassTurnOn", {"name": "kitchen light"})
        ]
        results = [d["tool_result"] for d in deltas if d.get("role") == "tool_result"]
        assert [s["id"] for s in results[0]["data"]["success"]] == [LIGHT]
        assert "".join(d.get("content") or "" for d in deltas) == "The kitchen light is on."
        assert events[-2]["data"]["processed_locally"] is False
        assert speech(events) == "The kitchen light is on."
    assert await ha.state(LIGHT) == "on"

    # hearth.ask from a script that returns the answer.
    await ha.rest(
        "POST",
        "/api/config/script/config/ask_hearth",
        {
            "alias": "Ask Hearth",
            "sequence": [
                {"action": "hearth.ask", "data": {"prompt": "hello"}, "response_variable": "reply"},
                {"stop": "answered", "response_variable": "reply"},
            ],
        },
    )
    ran = await ha.rest("POST", "/api/services/script/ask_hearth?return_response", {})
    assert ran["service_response"]["answer"] == "Hello from Hearth!"
    assert ran["service_response"]["worker"] == develop.WORKER_NAME
