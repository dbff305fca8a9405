"""The worker API's answers and errors as typed values, and the parsers that make them.

What `client.HearthClient` returns and raises: the answers of the Hearth worker API
(addon/hearth_worker/openapi.yaml) as frozen dataclasses, the parsers that build
them from JSON (a bad shape raises HearthConnectionError), and the error classes.
No Home Assistant imports (tests/integration/test_pure_modules.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class HearthError(Exception):
    """Base class of every error the client raises."""


class HearthConnectionError(HearthError):
    """The worker could not be reached or answered garbage."""


class HearthTimeoutError(HearthConnectionError):
    """The worker did not answer in time (connect, first token, between tokens or total)."""


class HearthAuthError(HearthError):
    """The worker rejected the token (401)."""


class HearthCertificateError(HearthAuthError):
    """The worker's certificate is not the pinned one (or none is pinned): pair again."""


class HearthAddressError(HearthError):
    """The worker's address is outside the home network and not explicitly allowed."""


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


class HearthAdminRequiredError(HearthRequestError):
    """The token may not change the worker's models (403 `admin_required`): tokens from
    pairing may; one made with `hearth-worker tokens create` only with `--admin`."""


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
    fingerprint: str | None = None  # hex SHA-256 of the certificate; None for plain HTTP


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the worker serves."""

    id: str
    kind: str
    quantization: str = ""
    context_length: int = 0
    size_bytes: int = 0


# A pull job's `status` while the worker downloads, and once it ended.
PULL_RUNNING = "running"
PULL_DONE = "done"
PULL_FAILED = "failed"
PULL_CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class PullJob:
    """A model download on the worker (POST /v1/models/pull); jobs live in its memory."""

    id: str
    source: str
    status: str  # PULL_RUNNING, PULL_DONE, PULL_FAILED or PULL_CANCELLED
    phase: str  # resolving, downloading, verifying, installing, done
    done_bytes: int
    total_bytes: int
    model: ModelInfo | None  # the installed model, once done
    error_code: str | None = None  # unknown_repo, unknown_subfolder, not_a_model, no_space, ...
    error_message: str | None = None

    @property
    def running(self) -> bool:
        return self.status == PULL_RUNNING

    @property
    def fraction(self) -> float | None:
        """How much of the download is done, 0 to 1; None while the size is unknown."""
        if self.total_bytes <= 0:
            return None
        return min(1.0, max(0.0, self.done_bytes / self.total_bytes))


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A model of the worker's catalog (GET /v1/catalog), judged for that machine."""

    id: str
    name: str
    source: str  # owner/name:subfolder
    kind: str  # chat or embedding
    parameters_b: float
    disk_bytes: int
    memory_bytes: int
    context_length: int
    license: str
    tool_calling: bool
    fits: bool
    recommended: bool
    installed: bool


@dataclass(frozen=True, slots=True)
class PullInfo:
    """One pull job in GET /v1/info (the add-on's start-up pulls and the API's)."""

    source: str
    status: str  # running | done | failed | cancelled
    phase: str
    done_bytes: int
    total_bytes: int
    error_code: str | None
    error_message: str | None


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
    pulls: list[PullInfo] = field(default_factory=list)  # oldest first

    @property
    def chat_models(self) -> list[str]:
        return [m.id for m in self.models if m.kind == "chat"]


@dataclass(frozen=True, slots=True)
class ModelRates:
    """Measured rates of one loaded model (a speech model: its measured costs)."""

    prefill_tok_s: float | None
    decode_tok_s: float | None
    requests_served: int
    kind: str | None = None  # "stt", "tts" for speech models; None: chat or embedding
    loaded: bool | None = None  # in memory now (None: the worker does not say)
    stt_fixed_ms: float | None = None
    stt_ms_per_audio_s: float | None = None
    tts_first_audio_ms: float | None = None
    tts_rtf: float | None = None


@dataclass(frozen=True, slots=True)
class SpeechModel:
    """A speech model a worker serves, as /v1/models lists it (kind "stt" or "tts")."""

    id: str
    kind: str
    languages: tuple[str, ...] = ()
    voices: tuple[str, ...] = ()
    sample_rate: int = 16000


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
    # Per chat model: the household prefix keys (X-Hearth-Prefix) its prompt cache holds.
    warm_keys: dict[str, frozenset[str]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(slots=True)
class ChatDelta:
    """One piece of a streamed answer: text, or the finished tool calls."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None  # on the last delta, when the worker reports usage
    cached_tokens: int | None = None  # prompt tokens its prompt cache supplied (same)
    prompt_tokens: int | None = None  # (same)


def _opt_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _warm_keys(cache: Any) -> dict[str, frozenset[str]]:
    """`prompt_cache.warm_keys` of a capacity snapshot (none from older workers)."""
    keys = cache.get("warm_keys") if isinstance(cache, Mapping) else None
    if not isinstance(keys, Mapping):
        return {}
    return {
        str(model): frozenset(k for k in listed if isinstance(k, str))
        for model, listed in keys.items()
        if isinstance(listed, list)
    }


def parse_capacity(data: Mapping[str, Any]) -> Capacity:
    """Parse a capacity snapshot; raises HearthConnectionError on a bad shape."""
    try:
        models = {
            str(name): ModelRates(
                prefill_tok_s=_opt_float(rates.get("prefill_tok_s")),
                decode_tok_s=_opt_float(rates.get("decode_tok_s")),
                requests_served=int(rates.get("requests_served") or 0),
                kind=str(rates["kind"]) if isinstance(rates.get("kind"), str) else None,
                loaded=rates["loaded"] if isinstance(rates.get("loaded"), bool) else None,
                stt_fixed_ms=_opt_float(rates.get("stt_fixed_ms")),
                stt_ms_per_audio_s=_opt_float(rates.get("stt_ms_per_audio_s")),
                tts_first_audio_ms=_opt_float(rates.get("tts_first_audio_ms")),
                tts_rtf=_opt_float(rates.get("tts_rtf")),
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
            warm_keys=_warm_keys(data.get("prompt_cache")),
            raw=dict(data),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise HearthConnectionError(f"Unexpected capacity answer: {err}") from err


def parse_model(data: Mapping[str, Any]) -> ModelInfo:
    """A model as /v1/info lists it, or as /v1/models does (details under `hearth`)."""
    details = data.get("hearth")
    if isinstance(details, Mapping):
        data = {**details, "id": details.get("id") or data["id"]}
    return ModelInfo(
        id=str(data["id"]),
        kind=str(data.get("kind") or "chat"),
        quantization=str(data.get("quantization") or ""),
        context_length=int(data.get("context_length") or 0),
        size_bytes=int(data.get("size_bytes") or 0),
    )


SPEECH_KINDS = frozenset({"stt", "tts"})


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(str(item) for item in value if isinstance(item, str) and item)
    return ()


def parse_speech_models(data: Mapping[str, Any]) -> list[SpeechModel]:
    """The speech models of a /v1/models answer (others are left out).

    A model's details may be at the top level or under `hearth` (the voices).
    Raises HearthConnectionError on a bad shape.
    """
    try:
        models: list[SpeechModel] = []
        for row in data["data"]:
            details = row.get("hearth")
            merged = {**row, **details} if isinstance(details, Mapping) else dict(row)
            kind = merged.get("kind")
            if kind not in SPEECH_KINDS:
                continue
            voices = _strings(merged.get("voices")) or _strings(merged.get("voice"))
            models.append(
                SpeechModel(
                    id=str(merged["id"]),
                    kind=str(kind),
                    languages=_strings(merged.get("languages")),
                    voices=voices,
                    sample_rate=int(merged.get("sample_rate") or 16000),
                )
            )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise HearthConnectionError(f"Unexpected models answer: {err}") from err
    return models


def parse_pull_job(data: Mapping[str, Any]) -> PullJob:
    """Parse a pull job; raises HearthConnectionError on a bad shape."""
    try:
        model = data.get("model")
        error = data.get("error")
        error = error if isinstance(error, Mapping) else {}
        return PullJob(
            id=str(data["id"]),
            source=str(data.get("source") or ""),
            status=str(data["status"]),
            phase=str(data.get("phase") or ""),
            done_bytes=int(data.get("done_bytes") or 0),
            total_bytes=int(data.get("total_bytes") or 0),
            model=parse_model(model) if isinstance(model, Mapping) else None,
            error_code=str(error.get("code") or "") or None,
            error_message=str(error.get("message") or "") or None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise HearthConnectionError(f"Unexpected pull job answer: {err}") from err


def parse_catalog(data: Mapping[str, Any]) -> list[CatalogEntry]:
    """Parse GET /v1/catalog; raises HearthConnectionError on a bad shape."""
    try:
        return [
            CatalogEntry(
                id=str(row["id"]),
                name=str(row.get("name") or row["id"]),
                source=str(row["source"]),
                kind=str(row.get("kind") or "chat"),
                parameters_b=float(row.get("parameters_b") or 0.0),
                disk_bytes=int(row.get("disk_bytes") or 0),
                memory_bytes=int(row.get("memory_bytes") or 0),
                context_length=int(row.get("context_length") or 0),
                license=str(row.get("license") or ""),
                tool_calling=bool(row.get("tool_calling")),
                fits=bool(row.get("fits")),
                recommended=bool(row.get("recommended")),
                installed=bool(row.get("installed")),
            )
            for row in data["data"]
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise HearthConnectionError(f"Unexpected catalog answer: {err}") from err


def parse_info(data: Mapping[str, Any]) -> WorkerInfo:
    """Parse GET /v1/info; raises HearthConnectionError on a bad shape."""
    try:
        return WorkerInfo(
            node_id=str(data["node_id"]),
            name=str(data.get("name") or data["node_id"]),
            version=str(data.get("version") or ""),
            api_version=int(data.get("api_version") or 1),
            models=[parse_model(m) for m in data.get("models") or []],
            hardware=dict(data.get("hardware") or {}),
            execution_providers=[str(p) for p in data.get("execution_providers") or []],
            pulls=[parse_pull_info(p) for p in data.get("pulls") or []],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise HearthConnectionError(f"Unexpected info answer: {err}") from err


def parse_pull_info(data: Mapping[str, Any]) -> PullInfo:
    """One entry of /v1/info's `pulls` (KeyError, TypeError, ValueError on a bad shape)."""
    error = data.get("error") or {}
    return PullInfo(
        source=str(data["source"]),
        status=str(data["status"]),
        phase=str(data.get("phase") or ""),
        done_bytes=int(data.get("done_bytes") or 0),
        total_bytes=int(data.get("total_bytes") or 0),
        error_code=str(error["code"]) if error.get("code") else None,
        error_message=str(error["message"]) if error.get("message") else None,
    )
