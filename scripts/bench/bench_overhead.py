"""Time to first token: straight to a worker vs. through the Hearth conversation agent.

One real worker process on 127.0.0.1 and one in-process Home Assistant (the
test harness of pytest-homeassistant-custom-component, with the real
integration loaded from custom_components/). The same messages are sent both
ways, alternating, so both see the same warm worker:

* direct: POST /v1/chat/completions (stream) with aiohttp; time to the first
  content delta;
* hearth: conversation.async_converse with agent conversation.hearth, timed to
  the first content delta reaching the ChatLog (what a voice pipeline streams
  to TTS), the way Assist pipelines listen for deltas.

Both ways go through a TCP relay each (TLS passes through untouched, the same hop
for both) that counts the connections opened: every one is a TLS handshake with the
worker. A client that keeps its connection alive opens one for all its requests.

With --json the last line is {"direct_ttft_ms_p50": ..., "hearth_ttft_ms_p50": ...,
"direct_connections": ..., "hearth_connections": ...} (connections opened during
the measured requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

PROMPT = "hello"
SYSTEM = "You are Hearth, a helpful assistant. Answer briefly."


async def direct_ttft(
    session: aiohttp.ClientSession, url: str, token: str, body: dict[str, Any]
) -> float:
    started = time.perf_counter()
    async with session.post(
        url + "/v1/chat/completions",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        response.raise_for_status()
        first: float | None = None
        async for raw in response.content:
            line = raw.decode().strip()
            if first is None and line.startswith("data:") and line != "data: [DONE]":
                event = json.loads(line[5:])
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        first = time.perf_counter()
    if first is None:
        raise RuntimeError("the worker streamed no content")
    return (first - started) * 1000


async def run(args: argparse.Namespace) -> dict[str, float]:
    from homeassistant import loader
    from homeassistant.components import conversation
    from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN
    from homeassistant.core import Context
    from homeassistant.helpers import chat_session
    from homeassistant.setup import async_setup_component
    from pytest_homeassistant_custom_component.common import (
        MockConfigEntry,
        async_test_home_assistant,
    )
    from relay import CountingRelay
    from worker_process import start_worker

    from custom_components.hearth.const import DOMAIN

    if args.model:
        model = Path(args.model)
    else:
        import model_fixtures

        model = model_fixtures.tiny_chat_model()

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        worker = start_worker([model], Path(tmp) / "worker")
        assert worker.token is not None
        to_direct, to_hearth = CountingRelay(worker.port), CountingRelay(worker.port)
        direct_url = f"https://127.0.0.1:{await to_direct.start()}"
        hearth_port = await to_hearth.start()
        try:
            async with async_test_home_assistant() as hass:
                hass.data.pop(loader.DATA_CUSTOM_COMPONENTS, None)  # load custom_components/
                for component in ("homeassistant", "conversation"):
                    assert await async_setup_component(hass, component, {})
                entry = MockConfigEntry(
                    domain=DOMAIN,
                    title="bench",
                    data={
                        CONF_HOST: "127.0.0.1",
                        CONF_PORT: hearth_port,
                        CONF_TOKEN: worker.token,
                        "fingerprint": worker.fingerprint,  # pinned, as pairing does
                    },
                )
                entry.add_to_hass(hass)
                assert await hass.config_entries.async_setup(entry.entry_id)
                await hass.async_block_till_done()
                household = hass.data[DOMAIN]
                await household.async_update_settings(
                    {
                        "prompt": SYSTEM,
                        "llm_hass_api": [],
                        "prefer_local_intents": False,
                        "max_tokens": args.max_tokens,
                        "temperature": 0.0,
                    }
                )

                async def hearth_ttft() -> tuple[float, list[dict[str, Any]]]:
                    first: list[float] = []
                    log: list[Any] = []

                    def listener(chat_log: Any, delta: dict[str, Any]) -> None:
                        log[:] = [chat_log]
                        if delta.get("content") and not first:
                            first.append(time.perf_counter())

                    started = time.perf_counter()
                    with (
                        chat_session.async_get_chat_session(hass) as session,
                        conversation.async_get_chat_log(
                            hass, session, None, chat_log_delta_listener=listener
                        ),
                    ):
                        await conversation.async_converse(
                            hass,
                            PROMPT,
                            session.conversation_id,
                            Context(),
                            language="en",
                            agent_id="conversation.hearth",
                        )
                    if not first:
                        raise RuntimeError("the agent streamed no content")
                    system = log[0].content[0].content
                    messages = [
                        {"role": "system", "content": system},
                        {"role": "user", "content": PROMPT},
                    ]
                    return (first[0] - started) * 1000, messages

                # Warm up both paths; take the agent's own system prompt for the direct runs.
                _, messages = await hearth_ttft()
                body = {"messages": messages, "max_tokens": args.max_tokens, "temperature": 0.0}
                direct: list[float] = []
                hearth: list[float] = []
                # The same TLS as the integration (the worker's own certificate).
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=worker.ssl)
                ) as http:
                    body["model"] = model_name(model)
                    await direct_ttft(http, direct_url, worker.token, body)
                    opened = to_direct.accepted, to_hearth.accepted
                    for _ in range(args.runs):
                        direct.append(await direct_ttft(http, direct_url, worker.token, body))
                        hearth.append((await hearth_ttft())[0])
                    connections = (
                        to_direct.accepted - opened[0],
                        to_hearth.accepted - opened[1],
                    )
                assert await hass.config_entries.async_unload(entry.entry_id)
                await hass.async_block_till_done()
        finally:
            await to_direct.close()
            await to_hearth.close()
            worker.stop()

    return {
        "runs": args.runs,
        "direct_ttft_ms_p50": round(statistics.median(direct), 2),
        "hearth_ttft_ms_p50": round(statistics.median(hearth), 2),
        "direct_ttft_ms_p90": round(statistics.quantiles(direct, n=10)[-1], 2),
        "hearth_ttft_ms_p90": round(statistics.quantiles(hearth, n=10)[-1], 2),
        "direct_connections": connections[0],
        "hearth_connections": connections[1],
    }


def model_name(model: Path) -> str:
    return str(json.loads((model / "hearth-model.json").read_text())["name"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="chat model folder (default: the tiny test model)")
    parser.add_argument("--runs", type=int, default=30, help="requests each way (default 30)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    overhead = result["hearth_ttft_ms_p50"] - result["direct_ttft_ms_p50"]
    print(f"time to first token over {result['runs']} requests each way")
    print(f"{'':16}{'direct':>12}{'via Hearth':>14}")
    print(
        f"{'p50 (ms)':16}{result['direct_ttft_ms_p50']:>12.2f}{result['hearth_ttft_ms_p50']:>14.2f}"
    )
    print(
        f"{'p90 (ms)':16}{result['direct_ttft_ms_p90']:>12.2f}{result['hearth_ttft_ms_p90']:>14.2f}"
    )
    print(
        f"{'connections':16}{result['direct_connections']:>12}{result['hearth_connections']:>14}"
        "  (opened, each a TLS handshake)"
    )
    print(f"Hearth adds {overhead:.2f} ms at the median (target < 10 ms)")
    if args.json:
        keys = ("direct_ttft_ms_p50", "hearth_ttft_ms_p50", "direct_connections")
        print(json.dumps({k: result[k] for k in (*keys, "hearth_connections")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
