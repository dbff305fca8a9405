"""Nothing leaves the home: every network destination of a full conversation, recorded.

Home Assistant (this test process) and a real worker (a subprocess) are watched with
Python audit hooks (`tests/connection_audit.py`: `socket.connect`, `socket.sendto`,
`socket.sendmsg`, `socket.getaddrinfo`) while Home Assistant pairs with the worker
through the config flow, answers a chat turn through the conversation agent and
computes an embedding on the worker. Any destination other than the worker's
address (loopback here) fails the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from connection_audit import record_connections
from homeassistant import config_entries
from homeassistant.components import conversation
from homeassistant.const import CONF_HOST, CONF_PORT
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import intent
from worker_process import start_worker

from custom_components.hearth.const import (
    CONF_CODE,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    DOMAIN,
)
from custom_components.hearth.household import Household

from .conftest import pairing_code

WORKER_HOST = "127.0.0.1"
LOCAL = {WORKER_HOST, "::1", "localhost", None}


def _model_name(path: Path) -> str:
    return str(json.loads((path / "hearth-model.json").read_text())["name"])


def _outbound(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("family") == "inet" and r["event"] != "socket.bind"]


async def test_full_conversation_stays_home(
    hass: HomeAssistant, tiny_chat_model: Path, embedding_model: Path, tmp_path: Path
) -> None:
    worker_log = tmp_path / "worker-connections.jsonl"
    worker = start_worker(
        [tiny_chat_model, embedding_model],
        tmp_path / "worker",
        token=False,
        host=WORKER_HOST,
        connection_log=worker_log,
    )
    try:
        with record_connections() as seen:
            # Pairing, as a person does it: address, then the code the worker shows.
            result = await hass.config_entries.flow.async_init(
                DOMAIN, context={"source": config_entries.SOURCE_USER}
            )
            result = await hass.config_entries.flow.async_configure(
                result["flow_id"], {CONF_HOST: WORKER_HOST, CONF_PORT: worker.port}
            )
            result = await hass.config_entries.flow.async_configure(
                result["flow_id"], {CONF_CODE: pairing_code(worker)}
            )
            assert result["type"] is FlowResultType.CREATE_ENTRY
            await hass.async_block_till_done()
            entry = result["result"]
            assert entry.state is config_entries.ConfigEntryState.LOADED

            # A chat turn through the household's conversation agent.
            household = Household.get(hass)
            await household.async_update_settings(
                {
                    **household.settings,
                    CONF_LLM_HASS_API: [],
                    CONF_MAX_TOKENS: 16,
                }
            )
            answer = await conversation.async_converse(
                hass,
                "what should I cook tonight?",
                None,
                Context(),
                language="en",
                agent_id="conversation.hearth",
            )
            assert answer.response.response_type is intent.IntentResponseType.ACTION_DONE

            # An embedding computed on the worker.
            vectors = await entry.runtime_data.coordinator.client.embeddings(
                _model_name(embedding_model), ["grams, not cups"]
            )
            assert len(vectors) == 1 and len(vectors[0]) == 384
            assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        assert worker.stop() == 0, worker.log()

    # Home Assistant's process: only the worker, and it did reach it (the hook works).
    ha = _outbound(seen)
    assert any(
        r["event"] == "socket.connect" and (r["host"], r["port"]) == (WORKER_HOST, worker.port)
        for r in ha
    ), ha
    assert {r["host"] for r in ha} <= LOCAL, ha
    assert {r["port"] for r in ha if r["event"] == "socket.connect"} == {worker.port}, ha

    # The worker's process: the hook was installed, it listened, and it opened nothing.
    records = [json.loads(line) for line in worker_log.read_text().splitlines()]
    assert records[0] == {"event": "started", "module": "hearth_worker"}
    assert any(r["event"] == "socket.bind" and r["host"] == WORKER_HOST for r in records)
    assert {r["host"] for r in _outbound(records)} <= LOCAL, _outbound(records)
