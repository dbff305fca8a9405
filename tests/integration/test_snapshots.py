"""The fast tier: diagnostics, entities and pairing against the fake worker, as snapshots.

The fake (tests/fake_worker.py) runs in the test's own event loop, so these tests
take a second or so each; the real-process tests (test_init.py and others) stay
the contract for behaviour. The first test keeps the fake honest: everything it
answers is checked against openapi.yaml.

Snapshots are in snapshots/test_snapshots.ambr (syrupy, Home Assistant's
extension, as core's tests use it). After a deliberate change of what they show:
`pytest tests/integration/test_snapshots.py --snapshot-update`, then read the diff.
Values that differ from run to run (the fake's port and certificate, the config
dir, timestamps, registry ids) are replaced by their type or by a fixed word.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
import pytest
from fake_worker import FakeWorker, check_schema, spec
from homeassistant import config_entries
from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN, Platform
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.syrupy import HomeAssistantSnapshotExtension
from syrupy.assertion import SnapshotAssertion
from syrupy.filters import props
from syrupy.matchers import path_type

from custom_components.hearth.const import (
    CONF_CODE,
    CONF_FINGERPRINT,
    CONF_TOKEN_ID,
    DOMAIN,
)
from custom_components.hearth.diagnostics import async_get_config_entry_diagnostics

from .conftest import setup_fake_entry


@pytest.fixture
def snapshot(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    """Home Assistant's snapshot extension (snapshots/ beside this file), as core's conftest."""
    return snapshot.use_extension(HomeAssistantSnapshotExtension)


def pinned(fake: FakeWorker) -> ssl.SSLContext:
    """A client context that trusts exactly the fake's certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(fake.certificate.cert_path))
    return context


async def test_fake_worker_speaks_the_spec(fake: FakeWorker) -> None:
    """Every answer the fake gives validates against openapi.yaml; its routes are the spec's."""
    paths = spec()["paths"]
    routes = {
        ("get", "/v1/health"),
        ("get", "/v1/pair"),
        ("post", "/v1/pair"),
        ("get", "/v1/info"),
        ("get", "/v1/capacity"),
        ("get", "/v1/models"),
        ("post", "/v1/chat/completions"),
        ("delete", "/v1/tokens/self"),
    }
    for method, path in routes:
        assert method in paths.get(path, {}), f"{method.upper()} {path} is not in openapi.yaml"

    async with aiohttp.ClientSession() as http:
        ssl_context = pinned(fake)

        async def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
            async with http.get(fake.url + path, headers=headers, ssl=ssl_context) as response:
                return response.status, await response.json()

        status, body = await get("/v1/health")
        assert status == 200
        check_schema(body, "Health")
        for path, schema in (
            ("/v1/info", "Info"),
            ("/v1/capacity", "Capacity"),
            ("/v1/models", "ModelList"),
        ):
            status, body = await get(path, fake.headers)
            assert status == 200, body
            check_schema(body, schema)
            status, body = await get(path)
            assert status == 401
            check_schema(body, "Error")
        for model in (await get("/v1/info", fake.headers))[1]["models"]:
            check_schema(model, "ModelInfo")

        status, body = await get("/v1/pair")
        assert status == 403
        check_schema(body, "Error")
        fake.show_pairing_code()
        status, body = await get("/v1/pair")
        assert status == 200
        check_schema(body, "PairChallenge")

        chat = {"model": fake.model, "messages": [{"role": "user", "content": "hi"}]}
        check_schema(chat, "ChatCompletionRequest")
        url = fake.url + "/v1/chat/completions"
        async with http.post(url, json=chat, headers=fake.headers, ssl=ssl_context) as response:
            assert response.status == 200
            completion = await response.json()
        check_schema(completion, "ChatCompletion")
        assert completion["choices"][0]["message"]["content"] == fake.answer

        streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(url, json=streamed, headers=fake.headers, ssl=ssl_context) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = [
                line.decode().removeprefix("data: ").strip()
                async for line in response.content
                if line.startswith(b"data: ")
            ]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        for chunk in chunks:
            check_schema(chunk, "ChatCompletionChunk")
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
        assert text == fake.answer
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] > 0

        for bad in ({**chat, "model": ""}, {"model": fake.model, "messages": []}):
            async with http.post(url, json=bad, headers=fake.headers, ssl=ssl_context) as resp:
                assert resp.status == 400
                check_schema(await resp.json(), "Error")
        unknown = {**chat, "model": "no-such-model"}
        async with http.post(url, json=unknown, headers=fake.headers, ssl=ssl_context) as resp:
            assert resp.status == 404
            check_schema(await resp.json(), "Error")

        async with http.delete(
            fake.url + "/v1/tokens/self", headers=fake.headers, ssl=ssl_context
        ) as response:
            assert response.status == 204
        assert (await get("/v1/info", fake.headers))[0] == 401


DIAGNOSTICS_MATCHER = path_type(
    {
        "entry.port": (int,),
        "entry.fingerprint": (str,),
        "capacity.timestamp": (float,),
        "household.preferences.store": (str,),
    }
)


async def test_diagnostics(
    hass: HomeAssistant, fake: FakeWorker, snapshot: SnapshotAssertion
) -> None:
    entry = await setup_fake_entry(hass, fake)
    diagnostics = await async_get_config_entry_diagnostics(hass, entry)
    assert diagnostics == snapshot(matcher=DIAGNOSTICS_MATCHER)
    # Redaction: no token, and no secret of the certificate (only its public hash).
    text = json.dumps(diagnostics)
    assert fake.token not in text
    assert "tok-fake" not in text
    key_pem = fake.certificate.key_path.read_text(encoding="ascii")
    assert "PRIVATE KEY" not in text
    assert "".join(key_pem.splitlines()[1:-1])[:40] not in text
    assert str(fake.certificate.key_path) not in text
    assert diagnostics["entry"][CONF_FINGERPRINT] == fake.fingerprint


# Registry fields that only one of the tested Home Assistant versions has (2025.4 has
# the device's is_new and suggested_area, 2026.2 the entity's object_id_base and
# suggested_object_id): Home Assistant's own bookkeeping, none set by Hearth. Left
# out, one snapshot set holds for both versions.
REGISTRY_FIELDS_OF_ONE_VERSION = props(
    "is_new", "suggested_area", "object_id_base", "suggested_object_id"
)


async def test_entities(
    hass: HomeAssistant,
    fake: FakeWorker,
    snapshot: SnapshotAssertion,
    entity_registry: er.EntityRegistry,
    device_registry: dr.DeviceRegistry,
) -> None:
    """The worker's device, its sensors and binary sensor: registry entries and states."""
    entry = await setup_fake_entry(hass, fake)
    device = device_registry.async_get_device(identifiers={(DOMAIN, fake.node_id)})
    assert device is not None
    # No configuration_url: a worker added by hand has no page a person reads (only
    # its API); an add-on's device links the add-on (test_flow_links.py).
    assert device == snapshot(name="device", exclude=REGISTRY_FIELDS_OF_ONE_VERSION)
    entities = [
        e
        for e in er.async_entries_for_config_entry(entity_registry, entry.entry_id)
        if e.domain in (Platform.SENSOR, Platform.BINARY_SENSOR)
    ]
    assert sorted(e.entity_id for e in entities) == snapshot(name="entity_ids")
    for entity in sorted(entities, key=lambda e: e.entity_id):
        assert entity.device_id == device.id
        assert entity == snapshot(
            name=f"{entity.entity_id}-entry", exclude=REGISTRY_FIELDS_OF_ONE_VERSION
        )
        assert hass.states.get(entity.entity_id) == snapshot(name=f"{entity.entity_id}-state")


async def test_pairing_flow(
    hass: HomeAssistant, fake: FakeWorker, snapshot: SnapshotAssertion
) -> None:
    """Adding a worker by address and pairing code: the entry the flow makes, and it loads."""
    code = fake.show_pairing_code()
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    assert result["type"] is FlowResultType.FORM
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: fake.host, CONF_PORT: fake.port}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "pair"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_CODE: code.lower()}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    data = dict(result["data"])
    assert data[CONF_TOKEN] in fake.tokens
    assert data[CONF_FINGERPRINT] == fake.fingerprint
    assert data == snapshot(
        matcher=path_type(
            {
                CONF_PORT: (int,),
                CONF_TOKEN: (str,),
                CONF_TOKEN_ID: (str,),
                CONF_FINGERPRINT: (str,),
            }
        )
    )
    await hass.async_block_till_done()
    assert result["result"].state is config_entries.ConfigEntryState.LOADED
