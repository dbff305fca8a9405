"""A small typed client for the Hearth worker API (addon/hearth_worker/openapi.yaml).

It knows nothing about Home Assistant: it is given an aiohttp session (Home
Assistant's shared one) and raises typed exceptions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=5)
# A stream may run long; only connecting and silence between events are bounded.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120)


class HearthError(Exception):
    """Base class of every error the client raises."""


class HearthConnectionError(HearthError):
    """The worker could not be reached or answered garbage."""


class HearthAuthError(HearthError):
    """The worker rejected the token (401)."""


class HearthBusyError(HearthError):
    """The worker is busy (429); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class HearthRequestError(HearthError):
    """The worker refused the request (4xx other than 401/429)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HearthPairingError(HearthError):
    """Pairing refused: `reason` is wrong_code, expired, no_code or rate_limited."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class PairResult:
    """What pairing returns: the token is shown only this once."""

    token: str
    token_id: str
    node_id: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the worker serves."""

    id: str
    kind: str
    quantization: str = ""
    context_length: int = 0
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """GET /v1/info."""

    node_id: str
    name: str
    version: str
    api_version: int
    models: list[ModelInfo]
    hardware: dict[str, Any]
    execution_providers: list[str]

    @property
    def chat_models(self) -> list[str]:
        return [m.id for m in self.models if m.kind == "chat"]


@dataclass(frozen=True, slots=True)
class ModelRates:
    """Measured rates of one loaded model."""

    prefill_tok_s: float | None
    decode_tok_s: float | None
    requests_served: int


@dataclass(frozen=True, slots=True)
class Capacity:
    """GET /v1/capacity."""

    node_id: str
    running: int
    queued: int
    max_running: int
    max_queued: int
    models: dict[str, ModelRates]
    memory_free_mb: int
    memory_total_mb: int
    cpu_percent: float
    on_battery: bool | None
    battery_percent: float | None
    user_active: bool | None
    timestamp: float
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(slots=True)
class ChatDelta:
    """One piece of a streamed answer: text, or the finished tool calls."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


def _opt_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def parse_capacity(data: Mapping[str, Any]) -> Capacity:
    """Parse a capacity snapshot; raises HearthConnectionError on a bad shape."""
    try:
        models = {
            str(name): ModelRates(
                prefill_tok_s=_opt_float(rates.get("prefill_tok_s")),
                decode_tok_s=_opt_float(rates.get("decode_tok_s")),
                requests_served=int(rates.get("requests_served") or 0),
            )
            for name, rates in dict(data.get("models") or {}).items()
        }
        on_battery = data.get("on_battery")
        user_active = data.get("user_active")
        return Capacity(
            node_id=str(data["node_id"]),
            running=int(data["running"]),
            queued=int(data["queued"]),
            max_running=int(data["max_running"]),
            max_queued=int(data["max_queued"]),
            models=models,
            memory_free_mb=int(data["memory_free_mb"]),
            memory_total_mb=int(data["memory_total_mb"]),
            cpu_percent=float(data.get("cpu_percent") or 0.0),
            on_battery=on_battery if isinstance(on_battery, bool) else None,
            battery_percent=_opt_float(data.get("battery_percent")),
            user_active=user_active if isinstance(user_active, bool) else None,
            timestamp=float(data.get("timestamp") or 0.0),
            raw=dict(data),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise HearthConnectionError(f"Unexpected capacity answer: {err}") from err


def parse_info(data: Mapping[str, Any]) -> WorkerInfo:
    """Parse GET /v1/info; raises HearthConnectionError on a bad shape."""
    try:
        return WorkerInfo(
            node_id=str(data["node_id"]),
            name=str(data.get("name") or data["node_id"]),
            version=str(data.get("version") or ""),
            api_version=int(data.get("api_version") or 1),
            models=[
                ModelInfo(
                    id=str(m["id"]),
                    kind=str(m.get("kind") or "chat"),
                    quantization=str(m.get("quantization") or ""),
                    context_length=int(m.get("context_length") or 0),
                    size_bytes=int(m.get("size_bytes") or 0),
                )
                for m in data.get("models") or []
            ],
            hardware=dict(data.get("hardware") or {}),
            execution_providers=[str(p) for p in data.get("execution_providers") or []],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise HearthConnectionError(f"Unexpected info answer: {err}") from err


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


async def _error_body(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """(code, message) of an error answer, tolerating any body."""
    try:
        body = await response.json(content_type=None)
        error = body["error"]
        return str(error.get("code") or ""), str(error.get("message") or "")
    except (ValueError, KeyError, TypeError, AttributeError, aiohttp.ClientError):
        return "", response.reason or f"HTTP {response.status}"


class HearthClient:
    """Talks to one worker."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        host: str,
        port: int,
        token: str | None = None,
    ) -> None:
        self._session = session
        self.host = host
        self.port = port
        self.token = token

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        code, message = await _error_body(response)
        if response.status == 401:
            raise HearthAuthError(message or "Token rejected")
        if response.status == 429:
            raise HearthBusyError(message or "Worker busy", _retry_after(response))
        if response.status < 500:
            raise HearthRequestError(response.status, code, message)
        raise HearthConnectionError(f"Worker error {response.status}: {message}")

    async def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            async with self._session.request(
                method,
                self.base_url + path,
                json=body,
                headers=self._headers(),
                timeout=REQUEST_TIMEOUT,
            ) as response:
                await self._raise_for_status(response)
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise HearthConnectionError(f"Cannot talk to {self.base_url}: {err}") from err
        if not isinstance(data, dict):
            raise HearthConnectionError(f"Unexpected answer from {self.base_url}")
        return data

    async def health(self) -> dict[str, Any]:
        """GET /v1/health (no token needed)."""
        return await self._request("GET", "/v1/health")

    async def pair(self, code: str, client_name: str) -> PairResult:
        """Exchange a pairing code for a token."""
        try:
            async with self._session.post(
                self.base_url + "/v1/pair",
                json={"code": code, "client_name": client_name},
                timeout=REQUEST_TIMEOUT,
            ) as response:
                if response.status in (400, 403, 429):
                    reason, message = await _error_body(response)
                    if response.status == 429:
                        reason = "rate_limited"
                    elif response.status == 400 or not reason:
                        reason = "wrong_code"
                    raise HearthPairingError(reason, message, _retry_after(response))
                await self._raise_for_status(response)
                data = await response.json(content_type=None)
            return PairResult(
                token=str(data["token"]),
                token_id=str(data["token_id"]),
                node_id=str(data["node_id"]),
            )
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as err:
            raise HearthConnectionError(f"Cannot pair with {self.base_url}: {err}") from err

    async def info(self) -> WorkerInfo:
        """GET /v1/info."""
        return parse_info(await self._request("GET", "/v1/info"))

    async def capacity(self) -> Capacity:
        """GET /v1/capacity."""
        return parse_capacity(await self._request("GET", "/v1/capacity"))

    async def chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Non-streaming chat completion (OpenAI shape)."""
        return await self._request("POST", "/v1/chat/completions", {**body, "stream": False})

    async def chat_stream(self, body: Mapping[str, Any]) -> AsyncIterator[ChatDelta]:
        """Open a streamed chat completion.

        Returns once the worker has accepted the request (errors before that are
        raised here, so a caller can fail over to another worker); the returned
        iterator yields the answer's deltas. Tool calls arrive in one delta at
        the end, assembled from their fragments.
        """
        try:
            response = await self._session.post(
                self.base_url + "/v1/chat/completions",
                json={**body, "stream": True},
                headers=self._headers(),
                timeout=STREAM_TIMEOUT,
            )
        except (aiohttp.ClientError, TimeoutError) as err:
            raise HearthConnectionError(f"Cannot talk to {self.base_url}: {err}") from err
        try:
            await self._raise_for_status(response)
        except BaseException:
            response.release()
            raise
        return _iter_sse(response)


async def _iter_sse(response: aiohttp.ClientResponse) -> AsyncIterator[ChatDelta]:
    """Parse `data:` events of an OpenAI chat stream into deltas."""
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    try:
        async for raw_line in response.content:
            line = raw_line.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            try:
                event = json.loads(payload)
            except ValueError as err:
                raise HearthConnectionError(f"Bad event in chat stream: {payload!r}") from err
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                finish = choice.get("finish_reason") or finish
                for part in delta.get("tool_calls") or []:
                    call = calls.setdefault(
                        int(part.get("index", len(calls))),
                        {"id": None, "name": "", "arguments": ""},
                    )
                    call["id"] = part.get("id") or call["id"]
                    function = part.get("function") or {}
                    call["name"] += function.get("name") or ""
                    call["arguments"] += function.get("arguments") or ""
                if content := delta.get("content"):
                    yield ChatDelta(content=str(content))
    except (aiohttp.ClientError, TimeoutError) as err:
        raise HearthConnectionError(f"Chat stream broke off: {err}") from err
    except asyncio.CancelledError:
        response.close()
        raise
    finally:
        response.release()
    yield ChatDelta(tool_calls=[calls[i] for i in sorted(calls)], finish_reason=finish)
