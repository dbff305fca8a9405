"""The worker's HTTP API (aiohttp), as specified in openapi.yaml."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from importlib import resources
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import API_VERSION, __version__, catalog, pairing, pull, speech, transcription
from .admission import Busy, run_to_end
from .auth import AuthStore, TokenInfo
from .chat_engine import ChatModel, GenerationResult, PromptTooLong, Sampling
from .chat_template import ChatTemplateError
from .embedding_engine import EmbeddingModel, EmbeddingTooLarge
from .guidance import Guide, GuidedAnswer
from .manifest import Manifest
from .model import ModelHost
from .pairing import PairingError
from .pull_jobs import PullJob
from .registry import Held, ModelNotRemovable
from .settings import WorkerSettings
from .tool_calls import ParsedToolCall, ToolCallStreamFilter, parse_tool_calls
from .validation import (
    ApiError,
    ChatRequest,
    EmbeddingRequest,
    model_not_found,
    parse_chat_request,
    parse_embedding_request,
    parse_json_object,
    parse_pull_request,
)

_LOGGER = logging.getLogger(__name__)
_M = TypeVar("_M", ChatModel, EmbeddingModel)

TOKEN_KEY = "hearth_token"  # noqa: S105 - the request's TokenInfo, set by _authenticate
PUBLIC_PATHS = frozenset({"/v1/health", "/v1/pair", "/v1/openapi.yaml"})
MAX_BODY_BYTES = 4 * 1024 * 1024
# POST /v1/pair needs no token: read no more than a pairing proof needs.
MAX_PAIR_BODY_BYTES = 4 * 1024
PARSE_ON_LOOP_BYTES = 64 * 1024
# The client's key for a request's household prompt prefix (SHA-256, hex).
PREFIX_HEADER = "X-Hearth-Prefix"
# POST /v1/models/pull: a source and a name.
MAX_PULL_BODY_BYTES = 4 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HEX = re.compile("(?:[0-9a-fA-F]{2})*")


def _hex_field(data: dict[str, Any], name: str, low: int, high: int) -> bytes:
    value = data.get(name)
    raw = bytes.fromhex(value) if isinstance(value, str) and _HEX.fullmatch(value) else None
    if raw is None or not low <= len(raw) <= high:
        size = f"{low}" if low == high else f"{low} to {high}"
        raise ApiError(400, f"'{name}' must be {size} bytes in hex", param=name)
    return raw


def _pairing_error(err: PairingError) -> ApiError:
    if err.reason == "rate_limited":
        retry = max(1, int(err.retry_after or 1))
        return ApiError(
            429,
            "Too many wrong pairing codes; wait before trying again",
            code="rate_limited",
            type_="rate_limit_error",
            headers={"Retry-After": str(retry)},
        )
    messages = {
        "no_code": "This worker has no active pairing code: run 'hearth-worker pair' on it",
        "expired": "The pairing code has expired: run 'hearth-worker pair' for a new one",
        "wrong_code": "Wrong pairing code",
    }
    return ApiError(
        403,
        messages.get(err.reason, "Pairing refused"),
        code=err.reason,
        type_="permission_error",
    )


class _QuietBadHttp(logging.Filter):
    """Malformed HTTP is the client's mistake: one debug line, no traceback.

    aiohttp answers a request it cannot parse (a NUL byte in a header, a line
    too long, a broken chunk) with a 400 itself, but logs it on
    ``aiohttp.server`` as an ERROR with a traceback. This filter drops such
    records and logs a one-line debug message instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        message = " ".join(str(exc.message).split())[:200]
        _LOGGER.debug("%s: refused with %s (%s)", record.getMessage(), exc.code or 400, message)
        return False


_QUIET_BAD_HTTP = _QuietBadHttp()


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(event: Mapping[str, Any]) -> bytes:
    """One server-sent event: ``event`` as JSON (``json.dumps``'s default separators)."""
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def chunk_event(
    head: Mapping[str, Any], delta: Mapping[str, Any], finish: str | None = None
) -> bytes:
    """A ``chat.completion.chunk`` event: ``head`` (id, object, created, model), one choice."""
    return sse_event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


class Worker:
    """The HTTP API of a worker: routes, middleware, pairing and streaming over ``models``."""

    def __init__(
        self,
        settings: WorkerSettings,
        auth: AuthStore,
        *,
        fingerprint: bytes = b"",
        models: ModelHost | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.node_id = auth.node_id
        # SHA-256 of the served TLS certificate; empty when serving plain HTTP.
        self.fingerprint = fingerprint
        self.models = models if models is not None else ModelHost(settings, auth.node_id)
        self.on_paired: list[Callable[[], Awaitable[None]]] = []
        self._pairing = asyncio.Lock()
        # Prompts rendered and tokenized at once (each in an executor thread).
        self._preparing = asyncio.Semaphore(max(2, settings.max_running))

    # -- application ----------------------------------------------------------

    def build_app(self) -> web.Application:
        logging.getLogger("aiohttp.server").addFilter(_QUIET_BAD_HTTP)  # once: same object
        app = web.Application(
            middlewares=[self._errors, self._authenticate], client_max_size=MAX_BODY_BYTES
        )
        app.add_routes(
            [
                web.get("/v1/health", self.health),
                web.get("/v1/pair", self.pair_challenge),
                web.post("/v1/pair", self.pair),
                web.get("/v1/info", self.info),
                web.get("/v1/capacity", self.capacity),
                web.get("/v1/models", self.list_models),
                web.delete("/v1/models/{model_id}", self.delete_model),
                web.post("/v1/models/pull", self.pull_model),
                web.get("/v1/models/pull/{job_id}", self.pull_status),
                web.delete("/v1/models/pull/{job_id}", self.pull_cancel),
                web.get("/v1/catalog", self.catalog),
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/embeddings", self.embeddings),
                web.delete("/v1/tokens/self", self.revoke_own_token),
                web.get("/v1/openapi.yaml", self.openapi),
            ]
        )
        app.cleanup_ctx.append(self._pull_jobs)
        registry = self.models.registry  # POST /v1/audio/speech, voices from both sources
        speech.install(app, registry.models_dir, registry.fixed_dirs, registry.speech_costs)
        transcription.install(app, registry)  # POST /v1/audio/transcriptions
        return app

    async def _pull_jobs(self, app: web.Application) -> AsyncIterator[None]:
        """Running pulls are cancelled when the app stops (their downloads are kept)."""
        yield
        await self.models.jobs.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as err:
            return _error_response(err)
        except web.HTTPRequestEntityTooLarge:
            return _error_response(
                ApiError(413, "Request body is too large", code="body_too_large")
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            return _error_response(
                ApiError(
                    exc.status,
                    exc.reason,
                    code=f"http_{exc.status}",
                    type_=kind,
                    headers={k: v for k, v in exc.headers.items() if k in ("Allow",)},
                )
            )
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            _LOGGER.exception("Unexpected error answering %s %s", request.method, request.path)
            return _error_response(
                ApiError(500, "Internal error", code="internal_error", type_="server_error")
            )

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            info = self.auth.verify(token.strip()) if scheme.lower() == "bearer" else None
            if info is None:
                raise ApiError(
                    401,
                    "A valid bearer token is required: pair with this worker first",
                    code="invalid_token",
                    type_="authentication_error",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            request[TOKEN_KEY] = info
        return await handler(request)

    async def _json(self, request: web.Request, limit: int | None = None) -> dict[str, Any]:
        """The body as a JSON object; with `limit`, reading stops past that many bytes."""
        if limit is None:
            raw = await request.read()
            if len(raw) <= PARSE_ON_LOOP_BYTES:
                return parse_json_object(raw)
            # A big body takes a while to parse and check: not on the event loop.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, parse_json_object, raw)
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        body = bytearray()
        while len(body) <= limit:
            chunk = await request.content.read(limit + 1 - len(body))
            if not chunk:
                break
            body += chunk
        if len(body) > limit:
            raise _too_large(limit)
        return parse_json_object(bytes(body))

    # -- endpoints --------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "version": __version__, "api_version": API_VERSION}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        text = resources.files("hearth_worker").joinpath("openapi.yaml").read_text("utf-8")
        return web.Response(text=text, content_type="application/yaml")

    async def pair_challenge(self, request: web.Request) -> web.Response:
        """The first step of the pairing proof: the current code's salt."""
        try:
            salt = self.auth.pairing_salt()
        except PairingError as err:
            raise _pairing_error(err) from err
        return web.json_response(
            {
                "protocol": pairing.PROTOCOL,
                "salt": salt,
                "kdf": {
                    "name": "scrypt",
                    "n": pairing.SCRYPT_N,
                    "r": pairing.SCRYPT_R,
                    "p": pairing.SCRYPT_P,
                },
                "tls": bool(self.fingerprint),
            }
        )

    async def pair(self, request: web.Request) -> web.Response:
        """Check the client's pairing proof; answer with a token and the worker's proof."""
        data = await self._json(request, MAX_PAIR_BODY_BYTES)
        if "code" in data:
            raise ApiError(
                400,
                "The pairing code is never sent: use the pairing proof (GET /v1/pair first)",
                code="code_not_accepted",
                param="code",
            )
        name = data.get("client_name")
        if name is not None and (not isinstance(name, str) or len(name) > 100):
            raise ApiError(400, "'client_name' must be a short string", param="client_name")
        salt = _hex_field(data, "salt", pairing.SALT_BYTES, pairing.SALT_BYTES)
        nonce = _hex_field(data, "client_nonce", pairing.MIN_NONCE_BYTES, pairing.MAX_NONCE_BYTES)
        proof = _hex_field(data, "proof", 32, 32)
        was_paired = self.auth.paired
        loop = asyncio.get_running_loop()
        try:
            async with self._pairing:  # one slow check at a time, off the event loop
                token, info, worker_proof = await loop.run_in_executor(
                    None,
                    functools.partial(
                        self.auth.pair_with_proof,
                        salt=salt.hex(),
                        client_nonce=nonce,
                        proof=proof,
                        fingerprint=self.fingerprint,
                        client_id=request.remote or "unknown",
                        client_name=name,
                    ),
                )
        except PairingError as err:
            raise _pairing_error(err) from err
        _LOGGER.info("Paired with %s (token %s)", name or request.remote, info.token_id)
        if not was_paired:
            for callback in self.on_paired:
                await callback()
        return web.json_response(
            {
                "token": token,
                "token_id": info.token_id,
                "node_id": self.node_id,
                "proof": worker_proof.hex(),
            }
        )

    async def revoke_own_token(self, request: web.Request) -> web.Response:
        """Revoke exactly the token this request presents (a client that is removed)."""
        info = request[TOKEN_KEY]
        assert isinstance(info, TokenInfo)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.auth.revoke, info.token_id)
        _LOGGER.info("Token %s (%s) revoked by its holder", info.token_id, info.name)
        return web.Response(status=204)

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "node_id": self.node_id,
                "name": self.settings.name,
                "version": __version__,
                "api_version": API_VERSION,
                "hardware": self.models.hardware,
                "execution_providers": self.models.providers,
                "models": [self.models.model_info(m) for m in self.models.manifests.values()],
                "pulls": self.models.jobs.summaries(),
            }
        )

    async def capacity(self, request: web.Request) -> web.Response:
        snapshot = self.models.capacity_snapshot()
        # Speech models: their measured costs (speech to text, and the voices).
        snapshot["models"] |= await transcription.capacity_models(request.app, self.models.registry)
        return web.json_response(snapshot)

    async def list_models(self, request: web.Request) -> web.Response:
        data = [_model_json(m) for m in self.models.manifests.values() if m.kind != "stt"]
        data += transcription.models_json(self.models.registry)  # kind "stt"
        data += speech.models_json(request.app)  # Piper voices (kind "tts")
        return web.json_response({"object": "list", "data": data})

    # -- changing what is served (admin) -------------------------------------------

    async def delete_model(self, request: web.Request) -> web.Response:
        """Stop serving a model and delete it; running requests on it finish first."""
        _require_admin(request)
        model_id = request.match_info["model_id"]
        try:
            await self.models.registry.remove_model(model_id)
        except KeyError as err:
            served = sorted(self.models.manifests)
            raise ApiError(
                404,
                f"No model {model_id!r} is served here (served: {served})",
                code="model_not_found",
                type_="not_found_error",
            ) from err
        except ModelNotRemovable as err:
            raise ApiError(
                409,
                f"Model {model_id!r} was given to this worker with --model: remove it there",
                code="model_not_removable",
            ) from err
        return web.json_response({"id": model_id, "deleted": True})

    async def pull_model(self, request: web.Request) -> web.Response:
        """Start pulling a model from the hub; the job says how it goes."""
        _require_admin(request)
        req = parse_pull_request(await self._json(request, MAX_PULL_BODY_BYTES))
        if self.models.registry.models_dir is None:
            raise ApiError(409, "This worker has no models directory", code="no_models_dir")
        try:
            job, new = self.models.jobs.start(req.source, req.name)
        except ValueError as err:
            raise ApiError(400, str(err), param="source") from err
        return web.json_response(self._job_json(job), status=202 if new else 200)

    async def pull_status(self, request: web.Request) -> web.Response:
        _require_admin(request)
        return web.json_response(self._job_json(self._job(request)))

    async def pull_cancel(self, request: web.Request) -> web.Response:
        """Cancel a pull (what was downloaded stays for a retry); the job as it is now."""
        _require_admin(request)
        job = self.models.jobs.cancel(self._job(request).id)
        assert job is not None
        return web.json_response(self._job_json(job))

    def _job(self, request: web.Request) -> PullJob:
        job_id = request.match_info["job_id"]
        job = self.models.jobs.get(job_id)
        if job is None:
            raise ApiError(
                404,
                f"No pull job {job_id!r} (jobs are forgotten when the worker restarts)",
                code="job_not_found",
                type_="not_found_error",
            )
        return job

    def _job_json(self, job: PullJob) -> dict[str, Any]:
        return job.to_json(_model_json)

    async def catalog(self, request: web.Request) -> web.Response:
        """The model catalog, with what fits this machine and what is installed."""
        models_dir = self.models.registry.models_dir or self.settings.state_dir
        machine = await asyncio.get_running_loop().run_in_executor(
            None, catalog.probe_machine, models_dir
        )
        recommendations = catalog.recommend(
            machine.available_memory_bytes, machine.cores, machine.free_disk_bytes
        )
        installed = {
            m.path.name for m in self.models.manifests.values() if m.path.parent == models_dir
        }
        host = request.app.get(speech.SPEECH_HOST)  # voices are the speech host's
        if host is not None:
            voices = await asyncio.get_running_loop().run_in_executor(None, lambda: host.voices)
            installed |= {v.path.name for v in voices.values() if v.path.parent == models_dir}
        data = [
            {
                **rec.to_json(),
                "installed": pull.parse_source(rec.entry.source).folder_name in installed,
            }
            for rec in recommendations
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "machine": {
                    "memory_total_bytes": machine.total_memory_bytes,
                    "memory_available_bytes": machine.available_memory_bytes,
                    "cores": machine.cores,
                    "free_disk_bytes": machine.free_disk_bytes,
                },
            }
        )

    def _hold(self, hold: Callable[[str], Held[_M]], name: str, kind: str) -> Held[_M]:
        """``hold(name)``, or the 404 that names the ``kind`` models served here."""
        try:
            return hold(name)
        except KeyError as err:
            models = self.models.chat_models if kind == "chat" else self.models.embedding_models
            raise model_not_found(name, kind, models) from err

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat_request(await self._json(request))
        with self._hold(
            self.models.registry.hold_chat, req.model, "chat"
        ) as model:  # a removal of the model waits for this request
            return await self._chat(request, req, model)

    async def _chat(
        self, request: web.Request, req: ChatRequest, model: ChatModel
    ) -> web.StreamResponse:
        tools = req.tools if req.tool_choice != "none" else []
        try:
            model.check_fits(req.messages)  # before any rendering: cheap
            async with self._preparing:  # rendering and tokenizing, off the event loop
                prompt_ids = await run_to_end(
                    asyncio.get_running_loop().run_in_executor(
                        None, model.prepare, req.messages, tools
                    )
                )
                # The grammar for tool calls and response_format (checked once per grammar).
                guide = await run_to_end(
                    asyncio.get_running_loop().run_in_executor(
                        None,
                        functools.partial(
                            model.guidance.plan,
                            tools=tools,
                            tool_choice=req.tool_choice,
                            tool_name=req.tool_choice_name,
                            response_format=req.response_format,
                        ),
                    )
                )
            max_new = model.budget(len(prompt_ids), req.max_tokens)
        except ChatTemplateError as err:
            raise ApiError(400, f"Cannot build the prompt: {err}", param="messages") from err
        except PromptTooLong as err:
            raise ApiError(400, str(err), code="context_length_exceeded", param="messages") from err
        sampling = Sampling(
            max_new_tokens=max_new,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.engine_seed,
            stop=req.stop,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            guidance=guide.guidance if guide is not None else None,
        )
        try:
            async with self.models.admission.slot():
                _LOGGER.debug("Chat request: %d prompt tokens", len(prompt_ids))
                key = prefix_key_header(request)
                if req.stream:
                    return await self._stream_chat(
                        request, req, model, prompt_ids, sampling, guide, key
                    )
                return await self._complete_chat(req, model, prompt_ids, sampling, guide, key)
        except Busy as err:
            raise _busy(err) from err

    async def _complete_chat(
        self,
        req: ChatRequest,
        model: ChatModel,
        prompt_ids: list[int],
        sampling: Sampling,
        guide: Guide | None,
        prefix_key: str | None = None,
    ) -> web.Response:
        pieces: list[str] = []
        result = GenerationResult()
        async with contextlib.aclosing(
            model.stream(prompt_ids, sampling, threading.Event(), prefix_key)
        ) as items:
            async for item in items:
                if isinstance(item, GenerationResult):
                    result = item
                else:
                    pieces.append(item)
        self.models.record(model.id, result)
        content: str | None = "".join(pieces)
        calls: list[ParsedToolCall] = []
        cut = result.finish_reason == "length"
        if guide is not None and guide.calls:
            reader = guide.reader()
            shown = reader.feed(content or "")
            rest, calls = reader.finish(cut=cut)
            content = shown + rest
        elif req.tools and req.tool_choice != "none":
            content, calls = parse_tool_calls(content or "", req.tool_names)
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        finish = result.finish_reason
        if calls:
            message["tool_calls"] = [_tool_call_json(c) for c in calls]
            finish = "length" if cut else "tool_calls"
        elif not content:
            message["content"] = ""
        return web.json_response(
            {
                "id": _completion_id(),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model.id,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": _usage(result),
            }
        )

    async def _stream_chat(
        self,
        request: web.Request,
        req: ChatRequest,
        model: ChatModel,
        prompt_ids: list[int],
        sampling: Sampling,
        guide: Guide | None,
        prefix_key: str | None = None,
    ) -> web.StreamResponse:
        head = {
            "id": _completion_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model.id,
        }
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(chunk_event(head, {"role": "assistant", "content": ""}))
        filt: GuidedAnswer | ToolCallStreamFilter | None = None
        if guide is not None and guide.calls:
            filt = guide.reader()
        elif req.tools and req.tool_choice != "none":
            filt = ToolCallStreamFilter(req.tool_names)
        result = GenerationResult()
        cancelled = threading.Event()
        try:
            # Closed on the way out, however it is left: the generation thread has
            # ended before the admission slot is given back.
            async with contextlib.aclosing(
                model.stream(prompt_ids, sampling, cancelled, prefix_key)
            ) as items:
                async for item in items:
                    if isinstance(item, GenerationResult):
                        result = item
                        break
                    text = filt.feed(item) if filt else item
                    if text:
                        await response.write(chunk_event(head, {"content": text}))
            finish = result.finish_reason
            if filt:
                text, calls = filt.finish(cut=finish == "length")
                if text:
                    await response.write(chunk_event(head, {"content": text}))
                if calls:
                    deltas = [{"index": i, **_tool_call_json(call)} for i, call in enumerate(calls)]
                    await response.write(chunk_event(head, {"tool_calls": deltas}))
                    finish = "length" if finish == "length" else "tool_calls"
            await response.write(chunk_event(head, {}, finish))
            if req.include_usage:
                usage = {
                    **head,
                    "created": int(time.time()),
                    "choices": [],
                    "usage": _usage(result),
                }
                await response.write(sse_event(usage))
            # One write: the end of the body comes with `[DONE]`, not in a later packet.
            await response.write_eof(SSE_DONE)
        except ConnectionResetError:
            cancelled.set()
            _LOGGER.debug("Client went away; generation cancelled")
        finally:
            self.models.record(model.id, result)
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        req = parse_embedding_request(await self._json(request))
        with self._hold(
            self.models.registry.hold_embedding, req.model, "embedding"
        ) as model:  # a removal of the model waits for this request
            return await self._embed(req, model)

    async def _embed(self, req: EmbeddingRequest, model: EmbeddingModel) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            encodings = await run_to_end(loop.run_in_executor(None, model.tokenize, req.inputs))
        except EmbeddingTooLarge as err:
            raise ApiError(400, str(err), code="too_many_tokens", param="input") from err
        try:
            async with self.models.admission.slot():
                vectors, tokens = await run_to_end(
                    loop.run_in_executor(None, model.embed_tokens, encodings)
                )
        except Busy as err:
            raise _busy(err) from err
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(vector.astype("<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else vector.tolist(),
            }
            for i, vector in enumerate(vectors)
        ]
        return web.json_response(
            {
                "object": "list",
                "model": model.id,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def _model_json(manifest: Manifest) -> dict[str, Any]:
    """A model as /v1/models lists it (OpenAI's shape, Hearth's details in ``hearth``)."""
    try:
        created = int(manifest.path.stat().st_mtime)
    except OSError:  # being removed
        created = 0
    return {
        "id": manifest.name,
        "object": "model",
        "created": created,
        "owned_by": "hearth",
        "hearth": manifest.public(),
    }


def _require_admin(request: web.Request) -> None:
    """Routes that change the machine need an admin token (pairing gives one)."""
    info = request[TOKEN_KEY]
    assert isinstance(info, TokenInfo)
    if not info.admin:
        raise ApiError(
            403,
            "This needs an admin token: pair with this worker (Home Assistant does), or make "
            "one with 'hearth-worker tokens create NAME --admin'",
            code="admin_required",
            type_="permission_error",
        )


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"Request body is too large (at most {limit} bytes)", code="body_too_large"
    )


def _error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


def prefix_key_header(request: web.Request) -> str | None:
    """The client's household prefix key (X-Hearth-Prefix): 64 hex digits, else none."""
    value = request.headers.get(PREFIX_HEADER, "").strip().lower()
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _busy(err: Busy) -> ApiError:
    return ApiError(
        429,
        "This worker is busy; try again shortly or use another worker",
        code="busy",
        type_="rate_limit_error",
        headers={"Retry-After": str(err.retry_after)},
    )


def _completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def _usage(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _tool_call_json(call: ParsedToolCall) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(8)}",
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
    }
