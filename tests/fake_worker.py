"""A small fake Hearth worker for the fast test tier: an aiohttp server in the test's loop.

It speaks the part of the worker API (addon/hearth_worker/openapi.yaml) that the
integration's set-up, coordinator, diagnostics, sensors and config flow use:
health, pairing (the real pairing proof, with the worker's own functions), info,
capacity, models, streamed and whole chat completions, and revoking a token. Like
a real worker it serves HTTPS with a self-signed certificate made by the worker's
own `hearth_worker.tls` (the integration pins its fingerprint), asks for a bearer
token, answers errors with the worker's own `ApiError`, refuses chat requests the spec
refuses, and counts the requests it is answering in `running`.

Every answer is checked against openapi.yaml's schemas
(tests/integration/test_snapshots.py, `test_fake_worker_speaks_the_spec`) and key
by key against a real worker's (tests/integration/test_fake_worker.py), so the fake
cannot drift from the contract; the real-process tests stay the contract for
behaviour. Values are fixed (a fake machine) except what a real worker makes per
answer (timestamps, completion ids).

Knobs for tests: `answer` (the canned text, streamed word by word), `hold_answers()`
(a streamed answer stops after its first words until `release_answers()`),
`answering` (set once a held answer has sent its first words), `requests` (every
"METHOD /path" served, in order), `running` and `queued` (what capacity reports),
`pulls` (the pull jobs /v1/info reports), `end_delay_s` (a streamed answer ends this
long after its `[DONE]`, as a busy or distant server's last bytes may come).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import jsonschema
import yaml
from aiohttp import web
from hearth_worker import pairing, tls
from hearth_worker.validation import ApiError
from referencing import Registry, Resource

SPEC_PATH = Path(__file__).parents[1] / "addon" / "hearth_worker" / "openapi.yaml"
PUBLIC_PATHS = frozenset({"/v1/health", "/v1/pair", "/v1/openapi.yaml"})
MANIFEST_KEYS = ("id", "kind", "quantization", "context_length", "size_bytes", "dimensions")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@cache
def spec() -> dict[str, Any]:
    """openapi.yaml, parsed."""
    return dict(yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8")))


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    resource: Resource[Any] = Resource.from_contents(
        {**spec(), "$schema": "https://json-schema.org/draft/2020-12/schema"}
    )
    registry: Registry[Any] = Registry().with_resource("urn:hearth-openapi", resource)
    return jsonschema.Draft202012Validator(
        {"$ref": f"urn:hearth-openapi#/components/schemas/{name}"}, registry=registry
    )


def check_schema(instance: Any, name: str) -> None:
    """Validate `instance` against components/schemas/`name` of openapi.yaml."""
    _validator(name).validate(instance)


def _sse(event: dict[str, Any] | str) -> bytes:
    payload = event if isinstance(event, str) else json.dumps(event)
    return f"data: {payload}\n\n".encode()


class FakeWorker:
    """One fake worker on 127.0.0.1; use `async with FakeWorker(state_dir) as worker`."""

    version = "1.0.0-fake"
    api_version = 1

    def __init__(
        self,
        state_dir: Path,
        *,
        name: str = "Fake worker",
        node_id: str = "fake0000node0001",
        model: str = "fake-chat",
        answer: str = "Hello from the fake worker!",
    ) -> None:
        self.state_dir = state_dir
        self.name = name
        self.node_id = node_id
        self.model = model
        self.answer = answer
        self.token = f"fake-token-{secrets.token_hex(8)}"
        self.tokens: set[str] = {self.token}
        self.pairing_code: str | None = None  # normalized; set by show_pairing_code()
        self._pairing_salt = b""
        self.requests: list[str] = []
        self.chat_bodies: list[dict[str, Any]] = []
        self.running = 0
        self.queued = 0
        self.requests_served = 0
        self.pulls: list[dict[str, Any]] = []  # /v1/info's pull jobs (set by tests)
        self.end_delay_s = 0.0
        self.answering = asyncio.Event()
        self._release = asyncio.Event()
        self._release.set()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.certificate = tls.ensure_certificate(state_dir, node_id)

    # --- the test's side --------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate (hex), as an entry pins it."""
        return self.certificate.fingerprint_hex

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def entry_data(self) -> dict[str, Any]:
        """A config entry's data as pairing with this worker makes it (token pinned)."""
        return {
            "host": self.host,
            "port": self.port,
            "token": self.token,
            "token_id": "tok-fake",
            "node_id": self.node_id,
            "fingerprint": self.fingerprint,
            "plain_http": False,
        }

    def show_pairing_code(self) -> str:
        """As `hearth-worker pair` does: a fresh code (returned) that pairing proves."""
        self.pairing_code = "FAKE2345"
        self._pairing_salt = secrets.token_bytes(pairing.SALT_BYTES)
        return self.pairing_code

    def hold_answers(self) -> None:
        """Streamed answers stop after their first words until `release_answers()`."""
        self.answering.clear()
        self._release.clear()

    def release_answers(self) -> None:
        self._release.set()

    def count(self, request: str) -> int:
        """How often "METHOD /path" was served."""
        return self.requests.count(request)

    async def start(self) -> None:
        app = web.Application(middlewares=[self._errors, self._authenticate])
        app.add_routes(
            [
                web.get("/v1/health", self.health),
                web.get("/v1/pair", self.pair_challenge),
                web.post("/v1/pair", self.pair),
                web.get("/v1/info", self.info),
                web.get("/v1/capacity", self.capacity),
                web.get("/v1/models", self.models),
                web.post("/v1/chat/completions", self.chat_completions),
                web.delete("/v1/tokens/self", self.revoke_own_token),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, 0, ssl_context=self.certificate.server_context()
        )
        await site.start()
        server = site._server  # aiohttp tells the bound port nowhere else
        assert isinstance(server, asyncio.Server)
        self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- what the worker answers (the shapes of openapi.yaml) ---------------------

    def info_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "version": self.version,
            "api_version": self.api_version,
            "hardware": {
                "cpu_count": 4,
                "memory_total_mb": 8192,
                "platform": "Linux",
                "machine": "x86_64",
                "cpu_model": "Fake CPU @ 2.0GHz",
            },
            "execution_providers": ["CPUExecutionProvider"],
            "models": [self.model_json()],
            "pulls": [dict(job) for job in self.pulls],
        }

    def model_json(self) -> dict[str, Any]:
        return {
            "id": self.model,
            "kind": "chat",
            "quantization": "int4",
            "context_length": 4096,
            "size_bytes": 123_456_789,
            "dimensions": None,
            "guidance": False,
            "tool_call_format": None,
            "sampling_defaults": {
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": 0,
                "repetition_penalty": 1.1,
                "no_repeat_ngram_size": 0,
                "source": "hearth",
                "repetition_source": "hearth",
            },
        }

    def capacity_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "running": self.running,
            "queued": self.queued,
            "max_running": 2,
            "max_queued": 8,
            "prompt_cache": None,
            "models": {
                self.model: {
                    "prefill_tok_s": 250.0,
                    "decode_tok_s": 25.5,
                    "requests_served": self.requests_served,
                    "batch_peak_bytes": 0,  # never two requests decoding at once
                }
            },
            "memory_free_mb": 4096,
            "memory_total_mb": 8192,
            "cpu_percent": 12.5,
            "on_battery": None,
            "battery_percent": None,
            "user_active": None,
            "timestamp": time.time(),
        }

    # --- middlewares ----------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        try:
            return await handler(request)
        except ApiError as err:
            return web.json_response(err.body(), status=err.status, headers=err.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            error = ApiError(exc.status, exc.reason, code=f"http_{exc.status}", type_=kind)
            return web.json_response(error.body(), status=error.status)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token.strip() not in self.tokens:
                raise ApiError(
                    401,
                    "A valid bearer token is required: pair with this worker first",
                    code="invalid_token",
                    type_="authentication_error",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    async def _json(self, request: web.Request, schema: str) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as err:
            raise ApiError(400, "Body is not JSON", code="invalid_json") from err
        if not isinstance(body, dict):
            raise ApiError(400, "Body must be a JSON object", code="invalid_json")
        error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(body))
        if error is not None:
            param = ".".join(str(p) for p in error.absolute_path) or None
            raise ApiError(400, error.message, param=param)
        return body

    # --- endpoints --------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "version": self.version, "api_version": self.api_version}
        )

    async def pair_challenge(self, request: web.Request) -> web.Response:
        if self.pairing_code is None:
            raise ApiError(
                403,
                "No pairing code is active: run 'hearth-worker pair' on the worker",
                code="no_code",
                type_="permission_error",
            )
        return web.json_response(
            {
                "protocol": pairing.PROTOCOL,
                "salt": self._pairing_salt.hex(),
                "kdf": {
                    "name": "scrypt",
                    "n": pairing.SCRYPT_N,
                    "r": pairing.SCRYPT_R,
                    "p": pairing.SCRYPT_P,
                },
                "tls": True,
            }
        )

    async def pair(self, request: web.Request) -> web.Response:
        """The worker's side of the pairing proof, with the worker's own functions."""
        body = await self._json(request, "PairRequest")
        code = self.pairing_code
        if code is None or bytes.fromhex(body["salt"]) != self._pairing_salt:
            raise ApiError(403, "No such pairing code", code="no_code", type_="permission_error")
        nonce = bytes.fromhex(body["client_nonce"])
        loop = asyncio.get_running_loop()
        verifier = await loop.run_in_executor(None, pairing.code_verifier, code, self._pairing_salt)
        key = await loop.run_in_executor(
            None, pairing.session_key, verifier, self.certificate.fingerprint, nonce
        )
        expected = pairing.client_proof(key, self.certificate.fingerprint, nonce)
        if not secrets.compare_digest(expected, bytes.fromhex(body["proof"])):
            raise ApiError(403, "Wrong pairing code", code="wrong_code", type_="permission_error")
        self.pairing_code = None
        token = f"fake-token-{secrets.token_hex(8)}"
        self.tokens.add(token)
        proof = pairing.worker_proof(key, self.certificate.fingerprint, nonce, token, self.node_id)
        return web.json_response(
            {
                "token": token,
                "token_id": f"tok-{secrets.token_hex(4)}",
                "node_id": self.node_id,
                "proof": proof.hex(),
            }
        )

    async def revoke_own_token(self, request: web.Request) -> web.Response:
        _, _, token = request.headers["Authorization"].partition(" ")
        self.tokens.discard(token.strip())
        return web.Response(status=204)

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info_json())

    async def capacity(self, request: web.Request) -> web.Response:
        return web.json_response(self.capacity_json())

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": 1_700_000_000,
                        "owned_by": "hearth",
                        # as the worker's Manifest.public(): no guidance or sampling here
                        "hearth": {k: self.model_json()[k] for k in MANIFEST_KEYS},
                    }
                ],
            }
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request, "ChatCompletionRequest")
        if body["model"] != self.model:
            raise ApiError(
                404,
                f"Unknown chat model {body['model']!r}",
                code="model_not_found",
                type_="not_found_error",
                param="model",
            )
        self.chat_bodies.append(body)
        self.running += 1
        try:
            if body.get("stream"):
                return await self._stream(request, body)
            return web.json_response(
                {
                    "id": f"chatcmpl-{secrets.token_hex(12)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": self.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": self.answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": self._usage(),
                }
            )
        finally:
            self.running -= 1
            self.requests_served += 1

    def _usage(self) -> dict[str, Any]:
        completion = len(self.answer.split())
        return {
            "prompt_tokens": 42,
            "completion_tokens": completion,
            "total_tokens": 42 + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
        }

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        head = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return _sse({**head, "choices": [choice]})

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(chunk({"role": "assistant", "content": ""}))
        words = self.answer.split(" ")
        for i, word in enumerate(words):
            await response.write(chunk({"content": word if i == 0 else f" {word}"}))
            if i == 0 and not self._release.is_set():
                self.answering.set()
                await self._release.wait()
        await response.write(chunk({}, "stop"))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await response.write(_sse({**head, "choices": [], "usage": self._usage()}))
        await response.write(_sse("[DONE]"))
        await asyncio.sleep(self.end_delay_s)
        await response.write_eof()
        return response
