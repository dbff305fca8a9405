"""A small client for a real Home Assistant process: REST, WebSocket, onboarding, Assist."""

from __future__ import annotations

import asyncio
import itertools
import json as json_module
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

OWNER = {"name": "Owner", "username": "owner", "password": "hearth-demo-owner"}


class HomeAssistantError(Exception):
    """Home Assistant answered with an error."""


class HomeAssistant:
    """One logged-in user of a Home Assistant at `url` (http://127.0.0.1:PORT)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.client_id = f"{url}/"
        self.token = ""
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    # --- REST -----------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def rest(self, method: str, path: str, json: Any = None, **kwargs: Any) -> Any:
        async with self.session.request(
            method, self.url + path, json=json, headers=self.headers, **kwargs
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise HomeAssistantError(f"{method} {path}: {response.status} {text}")
            try:
                return json_module.loads(text) if text else None
            except ValueError as err:
                raise HomeAssistantError(f"{method} {path}: not JSON: {text!r}") from err

    async def state(self, entity_id: str) -> str:
        return str((await self.rest("GET", f"/api/states/{entity_id}"))["state"])

    # --- onboarding and login --------------------------------------------------

    async def onboard(self, owner: dict[str, str] = OWNER) -> None:
        """Every onboarding step a new user goes through; leaves this client logged in."""
        created = await self.rest(
            "POST",
            "/api/onboarding/users",
            {"client_id": self.client_id, "language": "en", **owner},
        )
        await self._token(created["auth_code"])
        await self.rest("POST", "/api/onboarding/core_config", {})
        await self.rest("POST", "/api/onboarding/analytics", {})
        await self.rest(
            "POST",
            "/api/onboarding/integration",
            {"client_id": self.client_id, "redirect_uri": f"{self.url}/?auth_callback=1"},
        )
        assert all(step["done"] for step in await self.rest("GET", "/api/onboarding"))

    async def _token(self, code: str) -> None:
        async with self.session.post(
            f"{self.url}/auth/token",
            data={"grant_type": "authorization_code", "code": code, "client_id": self.client_id},
        ) as response:
            body = await response.json()
            if response.status != 200:
                raise HomeAssistantError(f"/auth/token: {response.status} {body}")
        self.token = body["access_token"]

    # --- WebSocket -------------------------------------------------------------

    @asynccontextmanager
    async def websocket(self) -> AsyncIterator[HomeAssistant]:
        async with self.session.ws_connect(f"{self.url}/api/websocket") as ws:
            assert (await ws.receive_json())["type"] == "auth_required"
            await ws.send_json({"type": "auth", "access_token": self.token})
            reply = await ws.receive_json()
            if reply["type"] != "auth_ok":
                raise HomeAssistantError(f"websocket auth: {reply}")
            self._ws = ws
            try:
                yield self
            finally:
                self._ws = None

    async def _send(self, command: str, payload: dict[str, Any]) -> int:
        assert self._ws is not None, "use `async with ha.websocket():`"
        msg_id = next(self._ids)
        await self._ws.send_json({"id": msg_id, "type": command, **payload})
        return msg_id

    async def _receive(self, msg_id: int, timeout: float) -> dict[str, Any]:
        assert self._ws is not None
        while True:
            message: dict[str, Any] = await self._ws.receive_json(timeout=timeout)
            if message.get("id") == msg_id:
                return message

    async def ws(self, command: str, timeout: float = 60.0, **payload: Any) -> Any:
        """Send a command, return its result."""
        reply = await self._receive(await self._send(command, payload), timeout)
        if not reply.get("success", False):
            raise HomeAssistantError(f"{command}: {reply.get('error')}")
        return reply["result"]

    # --- what the tests do ---------------------------------------------------------

    async def discovered_flows(self, domain: str, unique_id: str) -> list[dict[str, Any]]:
        return [
            dict(flow)
            for flow in await self.ws("config_entries/flow/progress")
            if flow["handler"] == domain and flow["context"].get("unique_id") == unique_id
        ]

    async def discovered_flow(
        self, domain: str, unique_id: str, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Wait until a discovery flow is in progress (Settings > Discovered).

        By unique id: other workers advertised on this machine are discovered too.
        """
        deadline = time.monotonic() + timeout
        while True:
            if flows := await self.discovered_flows(domain, unique_id):
                return flows[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no discovered {domain} flow in {timeout:.0f} s")
            await asyncio.sleep(0.5)

    async def no_discovered_flow(self, domain: str, unique_id: str, timeout: float = 60.0) -> None:
        """Wait until no discovery flow for `unique_id` is in progress (a bounded wait)."""
        deadline = time.monotonic() + timeout
        while flows := await self.discovered_flows(domain, unique_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{domain} flows still there after {timeout:.0f} s: {flows}")
            await asyncio.sleep(0.5)

    async def pair(self, flow_id: str, code: str) -> dict[str, Any]:
        """Confirm a discovered Hearth worker with its pairing code: the new config entry."""
        form = await self.rest("GET", f"/api/config/config_entries/flow/{flow_id}")
        assert form["step_id"] == "pair", form
        done = await self.rest("POST", f"/api/config/config_entries/flow/{flow_id}", {"code": code})
        assert done["type"] == "create_entry", done
        return dict(done["result"])

    async def set_options(self, entry_id: str, **options: Any) -> None:
        """Hearth's household options: its options flow opens a menu, then the form."""
        flow = "/api/config/config_entries/options/flow"
        step = await self.rest("POST", flow, {"handler": entry_id})
        assert step["type"] == "menu", step
        form = await self.rest("POST", f"{flow}/{step['flow_id']}", {"next_step_id": "household"})
        assert form["type"] == "form", form
        done = await self.rest("POST", f"{flow}/{form['flow_id']}", options)
        assert done["type"] == "create_entry", done

    async def preferred_pipeline(self) -> dict[str, Any]:
        """The preferred Assist pipeline ("Home Assistant" after onboarding)."""
        listed = await self.ws("assist_pipeline/pipeline/list")
        return dict(next(p for p in listed["pipelines"] if p["id"] == listed["preferred_pipeline"]))

    async def update_pipeline(self, **changes: Any) -> dict[str, Any]:
        """Change fields of the preferred Assist pipeline and save it, as its dialog's
        **Update** does (the dialog sends every field)."""
        pipeline = await self.preferred_pipeline()
        fields = {k: v for k, v in pipeline.items() if k != "id"}
        fields.update(changes)
        return dict(
            await self.ws("assist_pipeline/pipeline/update", pipeline_id=pipeline["id"], **fields)
        )

    async def use_conversation_agent(self, agent_id: str) -> dict[str, Any]:
        """Make `agent_id` the conversation agent of the preferred Assist pipeline."""
        return await self.update_pipeline(conversation_engine=agent_id, conversation_language="*")

    async def speech_choices(self, stt_engine: str, tts_engine: str) -> dict[str, Any]:
        """What the assistant's dialog fills in when these engines are picked: each
        engine's first language matching the pipeline's (the languages Home Assistant
        lists for it, best match first), and the first voice of that language."""
        language = (await self.preferred_pipeline())["language"]

        async def first_language(kind: str, engine_id: str) -> str:
            listed = await self.ws(f"{kind}/engine/list", language=language)
            (provider,) = [p for p in listed["providers"] if p["engine_id"] == engine_id]
            return str(provider["supported_languages"][0])

        tts_language = await first_language("tts", tts_engine)
        voices = await self.ws("tts/engine/voices", engine_id=tts_engine, language=tts_language)
        return {
            "stt_engine": stt_engine,
            "stt_language": await first_language("stt", stt_engine),
            "tts_engine": tts_engine,
            "tts_language": tts_language,
            "tts_voice": voices["voices"][0]["voice_id"],
        }

    async def assist(self, text: str, timeout: float = 120.0) -> list[dict[str, Any]]:
        """A text turn through the preferred Assist pipeline (what the Assist dialog sends)."""
        msg_id = await self._send(
            "assist_pipeline/run",
            {"start_stage": "intent", "end_stage": "intent", "input": {"text": text}},
        )
        reply = await self._receive(msg_id, timeout)
        if not reply.get("success", False):
            raise HomeAssistantError(f"assist_pipeline/run: {reply.get('error')}")
        return await self._events(msg_id, timeout)

    async def assist_audio(
        self, pcm: bytes, timeout: float = 120.0, chunk: int = 2048
    ) -> list[dict[str, Any]]:
        """A voice turn through the preferred Assist pipeline, speech to text to speech,
        as the Assist dialog's microphone sends it: 16 kHz 16-bit mono PCM in binary
        messages, each led by the handler id Home Assistant gave (run-start), then an
        empty one (that id alone) to end the utterance."""
        msg_id = await self._send(
            "assist_pipeline/run",
            {"start_stage": "stt", "end_stage": "tts", "input": {"sample_rate": 16000}},
        )
        reply = await self._receive(msg_id, timeout)
        if not reply.get("success", False):
            raise HomeAssistantError(f"assist_pipeline/run: {reply.get('error')}")
        start = (await self._receive(msg_id, timeout))["event"]
        assert start["type"] == "run-start", start
        handler = bytes([start["data"]["runner_data"]["stt_binary_handler_id"]])
        assert self._ws is not None
        for offset in range(0, len(pcm), chunk):
            await self._ws.send_bytes(handler + pcm[offset : offset + chunk])
        await self._ws.send_bytes(handler)
        return [start, *await self._events(msg_id, timeout)]

    async def _events(self, msg_id: int, timeout: float) -> list[dict[str, Any]]:
        """A pipeline run's events, up to its run-end (or error)."""
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] not in ("run-end", "error"):
            events.append((await self._receive(msg_id, timeout))["event"])
        return events


def speech(events: list[dict[str, Any]]) -> str:
    """The answer Assist shows, from a pipeline run's intent-end event."""
    end = next(e for e in events if e["type"] == "intent-end")
    return str(end["data"]["intent_output"]["response"]["speech"]["plain"]["speech"])
