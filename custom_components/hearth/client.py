"""The HTTP and SSE client for one worker: requests, certificate pinning, streamed chats.

It knows nothing about Home Assistant (no Home Assistant imports:
tests/integration/test_pure_modules.py): it is given an aiohttp session (Home
Assistant's shared one), returns and raises the types of `worker_api`.

Transport (PRIVACY.md): HTTPS with the worker's certificate pinned by its SHA-256
fingerprint (`aiohttp.Fingerprint` on every request; a changed certificate raises
HearthCertificateError), plain HTTP only for an entry set up that way. The host is
resolved (`addresses.async_resolve`) and the request goes to the checked IP
address: by default only private, link-local and loopback addresses.

Connections are kept alive and reused: one pin object per certificate (`_pin`), so
the session's pool (keyed by it) hands the next request the TLS connection that was
checked against that pin when it was opened. A connection to a worker presenting
another certificate is never made, hence never reused.

Error messages name the worker's URL and address and say what went wrong in words
(`describe`), never an object's repr.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import secrets
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from .addresses import async_resolve
from .const import (
    BETWEEN_TOKENS_TIMEOUT,
    CONNECT_TIMEOUT,
    FIRST_TOKEN_TIMEOUT,
    STREAM_TOTAL_TIMEOUT,
)
from .const import REQUEST_TIMEOUT as REQUEST_SECONDS
from .pairing import PAIR_PROTOCOL, client_proof, pairing_key, worker_proof
from .worker_api import (
    Capacity,
    CatalogEntry,
    ChatDelta,
    HearthAdminRequiredError,
    HearthAuthError,
    HearthBusyError,
    HearthCertificateError,
    HearthConnectionError,
    HearthPairingError,
    HearthRequestError,
    HearthTimeoutError,
    PairResult,
    PullJob,
    SpeechModel,
    WorkerInfo,
    parse_capacity,
    parse_catalog,
    parse_info,
    parse_pull_job,
    parse_speech_models,
)

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=REQUEST_SECONDS, sock_connect=CONNECT_TIMEOUT)
# What Home Assistant's speech-to-text sends: 16 kHz, 16-bit, mono PCM (the worker's
# POST /v1/audio/transcriptions takes it streamed, as it is spoken).
L16_CONTENT_TYPE = "audio/L16; rate=16000; channels=1"
# Seconds a transcription may take from the request's start (the audio arrives while
# the person speaks: at most 30 s of it) to its text.
TRANSCRIBE_TIMEOUT = 60.0
# The household prefix key of a chat request (worker: server.PREFIX_HEADER).
PREFIX_HEADER = "X-Hearth-Prefix"


@dataclass(frozen=True, slots=True)
class StreamTimeouts:
    """How long a streamed chat may take (seconds); every wait is bounded.

    `first_token` runs from sending the request to the first text or tool call
    (connecting, queueing and prefill included), `between_tokens` between two
    deltas after that, `total` from sending the request to the last delta.
    """

    connect: float = CONNECT_TIMEOUT
    first_token: float = FIRST_TOKEN_TIMEOUT
    between_tokens: float = BETWEEN_TOKENS_TIMEOUT
    total: float = STREAM_TOTAL_TIMEOUT


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


def _segment(value: str) -> str:
    """One path segment of a URL, percent-encoded (model ids may hold any character)."""
    return urllib.parse.quote(value, safe="")


class _Pin(aiohttp.Fingerprint):
    """A certificate pin that reads well in logs and is equal to any pin of the same hash.

    aiohttp pools connections by (host, port, ssl, ...): equal pins share a pool.
    """

    def __repr__(self) -> str:
        return f"<pinned certificate sha256:{self.fingerprint.hex()[:16]}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Pin) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)


@functools.lru_cache(maxsize=64)
def _pin(fingerprint: str) -> _Pin:
    """The one pin object for a certificate (hex SHA-256)."""
    return _Pin(bytes.fromhex(fingerprint))


def describe(err: BaseException) -> str:
    """What went wrong talking to a worker, in words (no object reprs)."""
    if isinstance(err, aiohttp.ClientConnectorCertificateError):
        return f"TLS error from {err.host}:{err.port}: {err.certificate_error}"
    if isinstance(err, aiohttp.ClientConnectorError):
        os_error = err.os_error
        reason = os_error.strerror or str(os_error) or type(os_error).__name__
        return f"cannot connect to {err.host}:{err.port}: {reason}"
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return "the worker closed the connection"
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


_UNVERIFIED: ssl.SSLContext | None = None


def _unverified_context() -> ssl.SSLContext:
    """Reads a certificate before it is pinned (no CA store: nothing to load)."""
    global _UNVERIFIED  # noqa: PLW0603 - one context for the process
    if _UNVERIFIED is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _UNVERIFIED = context
    return _UNVERIFIED


class HearthClient:
    """Talks to one worker."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        host: str,
        port: int,
        token: str | None = None,
        *,
        fingerprint: str | None = None,
        plain_http: bool = False,
        allow_public: bool = False,
    ) -> None:
        self._session = session
        self.host = host
        self.port = port
        self.token = token
        self.fingerprint = fingerprint  # hex SHA-256 of the pinned certificate
        self.plain_http = plain_http
        self.allow_public = allow_public

    @property
    def scheme(self) -> str:
        return "http" if self.plain_http else "https"

    @property
    def base_url(self) -> str:
        """The worker's URL as configured (for people; requests go to the checked IP)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def _address(self) -> str:
        """The worker's IP address, checked against the address policy."""
        return await async_resolve(self.host, self.port, self.allow_public)

    async def _url(self, path: str) -> str:
        address = await self._address()
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}{path}"

    def _ssl(self, pinned: str | None = None) -> aiohttp.Fingerprint | bool:
        """The pinned certificate for a request (False: plain HTTP, nothing to verify).

        The same pin object every time, so that connections are reused (see above).
        """
        if self.plain_http:
            return False
        fingerprint = pinned or self.fingerprint
        if not fingerprint:
            raise HearthCertificateError("No certificate is pinned for this worker: pair again")
        return _pin(fingerprint)

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
        if response.status == 403 and code == "admin_required":
            raise HearthAdminRequiredError(response.status, code, message)
        if response.status < 500:
            raise HearthRequestError(response.status, code, message)
        raise HearthConnectionError(f"Worker error {response.status}: {message}")

    async def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        verify: aiohttp.Fingerprint | bool | None = None,
        answer: bool = True,
    ) -> dict[str, Any]:
        """One request; its JSON object answer (`answer=False`: none expected, {})."""
        url = await self._url(path)
        try:
            async with self._session.request(
                method,
                url,
                json=body,
                # An unpinned request (health) never carries the token.
                headers=self._headers() if verify is None else {},
                timeout=REQUEST_TIMEOUT,
                ssl=self._ssl() if verify is None else verify,
            ) as response:
                await self._raise_for_status(response)
                data = await response.json(content_type=None) if answer else {}
        except aiohttp.ServerFingerprintMismatch as err:
            raise HearthCertificateError(
                f"{self.base_url} presented another certificate than the one paired with"
            ) from err
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise HearthConnectionError(f"Cannot talk to {self.base_url}: {describe(err)}") from err
        if not isinstance(data, dict):
            raise HearthConnectionError(f"Unexpected answer from {self.base_url}")
        return data

    async def health(self) -> dict[str, Any]:
        """GET /v1/health (no token; the certificate is not checked: nothing secret)."""
        return await self._request("GET", "/v1/health", verify=False)

    async def peer_fingerprint(self) -> str:
        """Hex SHA-256 of the certificate the worker presents now (not yet trusted)."""
        address = await self._address()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, writer = await asyncio.open_connection(
                    address, self.port, ssl=_unverified_context(), server_hostname=""
                )
        except (OSError, TimeoutError, ssl.SSLError) as err:
            raise HearthConnectionError(f"Cannot talk to {self.base_url}: {describe(err)}") from err
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        finally:
            writer.close()
        if not der:
            raise HearthConnectionError(f"{self.base_url} presented no certificate")
        return hashlib.sha256(der).hexdigest()

    async def pair(self, code: str, client_name: str) -> PairResult:
        """Pair with the pairing proof: the code itself is never sent.

        Pins the certificate seen now for the whole exchange, proves knowledge of
        the code bound to it, and keeps the token only if the worker proves it
        knows the code too (else HearthPairingError `not_proven`).
        """
        fingerprint = None if self.plain_http else await self.peer_fingerprint()
        verify = self._ssl(fingerprint)
        seen = bytes.fromhex(fingerprint or "")
        challenge = await self._pair_call("GET", verify, None)
        if challenge.get("protocol") != PAIR_PROTOCOL:
            raise HearthConnectionError(f"Unknown pairing protocol {challenge.get('protocol')!r}")
        try:
            salt = bytes.fromhex(str(challenge["salt"]))
        except (KeyError, ValueError) as err:
            raise HearthConnectionError(f"Bad pairing challenge: {err!r}") from err
        nonce = secrets.token_bytes(16)
        key = await asyncio.get_running_loop().run_in_executor(
            None, pairing_key, code, salt, seen, nonce
        )
        answer = await self._pair_call(
            "POST",
            verify,
            {
                "salt": salt.hex(),
                "client_nonce": nonce.hex(),
                "proof": client_proof(key, seen, nonce).hex(),
                "client_name": client_name,
            },
        )
        try:
            result = PairResult(
                token=str(answer["token"]),
                token_id=str(answer["token_id"]),
                node_id=str(answer["node_id"]),
                fingerprint=fingerprint,
            )
            their_proof = bytes.fromhex(str(answer["proof"]))
        except (KeyError, ValueError) as err:
            raise HearthConnectionError(f"Bad pairing answer: {err!r}") from err
        expected = worker_proof(key, seen, nonce, result.token, result.node_id)
        if not hmac.compare_digest(their_proof, expected):
            raise HearthPairingError(
                "not_proven", "The worker did not prove it knows the code: not the right worker"
            )
        return result

    async def _pair_call(
        self, method: str, verify: aiohttp.Fingerprint | bool, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        url = await self._url("/v1/pair")
        try:
            async with self._session.request(
                method, url, json=body, timeout=REQUEST_TIMEOUT, ssl=verify
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
        except aiohttp.ServerFingerprintMismatch as err:
            raise HearthPairingError(
                "not_proven", "The worker's certificate changed while pairing"
            ) from err
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise HearthConnectionError(
                f"Cannot pair with {self.base_url}: {describe(err)}"
            ) from err
        if not isinstance(data, dict):
            raise HearthConnectionError(f"Unexpected answer from {self.base_url}")
        return data

    async def revoke_token(self) -> None:
        """DELETE /v1/tokens/self: the worker forgets the token this client holds.

        After it, every request with that token gets 401 (HearthAuthError).
        """
        await self._request("DELETE", "/v1/tokens/self", answer=False)

    async def info(self) -> WorkerInfo:
        """GET /v1/info."""
        return parse_info(await self._request("GET", "/v1/info"))

    async def capacity(self) -> Capacity:
        """GET /v1/capacity."""
        return parse_capacity(await self._request("GET", "/v1/capacity"))

    async def embeddings(self, model: str, inputs: list[str]) -> list[list[float]]:
        """POST /v1/embeddings: one vector per input, in input order."""
        data = await self._request("POST", "/v1/embeddings", {"model": model, "input": inputs})
        try:
            rows = sorted(data["data"], key=lambda row: int(row["index"]))
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError) as err:
            raise HearthConnectionError(f"Unexpected embeddings answer: {err}") from err
        if len(vectors) != len(inputs):
            raise HearthConnectionError("Embeddings answer has the wrong number of vectors")
        return vectors

    # --- models: pull, remove, catalog (admin scope, except the catalog) ---------

    async def pull_model(self, source: str, name: str | None = None) -> PullJob:
        """POST /v1/models/pull: start downloading `owner/name[:subfolder]`.

        Returns the job at once (a source already being pulled returns that job).
        Raises HearthAdminRequiredError for a token without the admin scope and
        HearthRequestError (400) for a malformed source.
        """
        body: dict[str, Any] = {"source": source}
        if name:
            body["name"] = name
        return parse_pull_job(await self._request("POST", "/v1/models/pull", body))

    async def pull_job(self, job_id: str) -> PullJob:
        """GET /v1/models/pull/{id}: the job's progress (404 once the worker forgot it)."""
        return parse_pull_job(await self._request("GET", f"/v1/models/pull/{_segment(job_id)}"))

    async def cancel_pull(self, job_id: str) -> PullJob:
        """DELETE /v1/models/pull/{id}: stop the download; nothing is installed."""
        return parse_pull_job(await self._request("DELETE", f"/v1/models/pull/{_segment(job_id)}"))

    async def remove_model(self, model_id: str) -> None:
        """DELETE /v1/models/{id}: the worker stops serving the model and deletes it.

        HearthRequestError 404 for an unknown model, 409 `model_not_removable` for one
        the worker was started with (`--model`).
        """
        await self._request("DELETE", f"/v1/models/{_segment(model_id)}")

    async def catalog(self) -> list[CatalogEntry]:
        """GET /v1/catalog: the catalog, each entry judged for this worker's machine."""
        return parse_catalog(await self._request("GET", "/v1/catalog"))

    # --- speech ---------------------------------------------------------------------

    async def speech_models(self) -> list[SpeechModel]:
        """GET /v1/models: the speech models (voices: kind "tts"; "stt") the worker serves."""
        return parse_speech_models(await self._request("GET", "/v1/models"))

    async def speech_stream(
        self,
        model: str,
        text: str,
        *,
        sample_rate: int,
        voice: str | None = None,
        timeouts: StreamTimeouts | None = None,
    ) -> AsyncGenerator[bytes]:
        """POST /v1/audio/speech: `text` spoken as raw 16-bit mono PCM at `sample_rate`.

        Returns once the worker has accepted the request (errors before that are
        raised here, so a caller can fail over); the returned iterator yields the
        audio as it arrives, in pieces of whole samples (even lengths). Waits are
        bounded as a chat's: `first_token` until the first audio, `between_tokens`
        between pieces, `total` in all (HearthTimeoutError).
        """
        limits = timeouts or StreamTimeouts()
        body: dict[str, Any] = {
            "model": model,
            "input": text,
            "response_format": "pcm",
            "sample_rate": sample_rate,
        }
        if voice:
            body["voice"] = voice
        started = asyncio.get_running_loop().time()
        response = await self._open_stream(
            "/v1/audio/speech",
            limits,
            started,
            json=body,
            headers=self._headers(),
        )
        return _timed(_iter_pcm(response), self.base_url, limits, started)

    async def speak(
        self,
        model: str,
        text: str,
        *,
        sample_rate: int,
        voice: str | None = None,
        timeouts: StreamTimeouts | None = None,
    ) -> bytes:
        """`text` spoken as one piece of raw PCM (see speech_stream): all of it, or an error."""
        chunks = await self.speech_stream(
            model, text, sample_rate=sample_rate, voice=voice, timeouts=timeouts
        )
        try:
            return b"".join([chunk async for chunk in chunks])
        finally:
            await chunks.aclose()

    async def transcribe_stream(
        self,
        model: str,
        audio: AsyncIterable[bytes],
        language: str | None = None,
        *,
        within_s: float = TRANSCRIBE_TIMEOUT,
    ) -> str:
        """POST /v1/audio/transcriptions: 16 kHz 16-bit mono PCM streamed in as it comes.

        The body is sent chunked while `audio` yields (`audio/L16`); `model` and
        `language` go as query parameters. Returns the text. The whole exchange is
        bounded by `within_s` seconds (HearthTimeoutError).
        """
        query = {"model": model, **({"language": language} if language else {})}
        path = "/v1/audio/transcriptions?" + urllib.parse.urlencode(query)
        headers = {**self._headers(), "Content-Type": L16_CONTENT_TYPE}
        try:
            async with asyncio.timeout(within_s):
                async with self._session.post(
                    await self._url(path),
                    data=_body(audio),
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                    ssl=self._ssl(),
                ) as response:
                    await self._raise_for_status(response)
                    data = await response.json(content_type=None)
        except TimeoutError as err:
            raise HearthTimeoutError(
                f"{self.base_url} did not transcribe the audio within {within_s:g} s"
            ) from err
        except aiohttp.ServerFingerprintMismatch as err:
            raise HearthCertificateError(
                f"{self.base_url} presented another certificate than the one paired with"
            ) from err
        except (aiohttp.ClientError, ValueError) as err:
            raise HearthConnectionError(f"Cannot talk to {self.base_url}: {describe(err)}") from err
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise HearthConnectionError(f"Unexpected transcription answer from {self.base_url}")
        return str(data["text"])

    async def _open_stream(
        self,
        path: str,
        limits: StreamTimeouts,
        started: float,
        **kwargs: Any,
    ) -> aiohttp.ClientResponse:
        """POST a request whose answer streams; its response once accepted (2xx)."""
        try:
            async with asyncio.timeout_at(started + min(limits.first_token, limits.total)):
                response = await self._session.post(
                    await self._url(path),
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=limits.connect),
                    ssl=self._ssl(),
                    **kwargs,
                )
                try:
                    await self._raise_for_status(response)
                except BaseException:
                    response.release()
                    raise
        except TimeoutError as err:
            raise HearthTimeoutError(
                f"{self.base_url} did not accept the request in time: {err or 'timeout'}"
            ) from err
        except aiohttp.ServerFingerprintMismatch as err:
            raise HearthCertificateError(
                f"{self.base_url} presented another certificate than the one paired with"
            ) from err
        except aiohttp.ClientError as err:
            raise HearthConnectionError(f"Cannot talk to {self.base_url}: {describe(err)}") from err
        return response

    async def chat_stream(
        self,
        body: Mapping[str, Any],
        timeouts: StreamTimeouts | None = None,
        prefix_key: str | None = None,
    ) -> AsyncGenerator[ChatDelta]:
        """Open a streamed chat completion.

        Returns once the worker has accepted the request (errors before that are
        raised here, so a caller can fail over to another worker); the returned
        iterator yields the answer's deltas: text deltas, then one last delta with
        the finish reason and the tool calls, assembled from their fragments. Every
        wait is bounded by `timeouts` (HearthTimeoutError); a stream that breaks
        off or ends before its end marker raises HearthConnectionError.
        `prefix_key` goes along as X-Hearth-Prefix (the household prefix's key).
        """
        limits = timeouts or StreamTimeouts()
        headers = self._headers()
        if prefix_key:
            headers[PREFIX_HEADER] = prefix_key
        started = asyncio.get_running_loop().time()
        response = await self._open_stream(
            "/v1/chat/completions",
            limits,
            started,
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
            headers=headers,
        )
        return _timed(_iter_sse(response), self.base_url, limits, started)


async def _body(audio: AsyncIterable[bytes]) -> AsyncGenerator[bytes]:
    """A request body sent chunked as `audio` yields (empty pieces left out)."""
    async for chunk in audio:
        if chunk:
            yield chunk


async def _iter_pcm(response: aiohttp.ClientResponse) -> AsyncGenerator[bytes]:
    """A streamed PCM answer in pieces of whole 16-bit samples, as it arrives."""
    carry = b""
    try:
        async for piece in response.content.iter_any():
            data = carry + piece
            even = len(data) - len(data) % 2
            carry = data[even:]
            if even:
                yield data[:even]
    except (aiohttp.ClientError, TimeoutError) as err:
        raise HearthConnectionError(f"Speech stream broke off: {describe(err)}") from err
    except asyncio.CancelledError:
        response.close()
        raise
    finally:
        response.release()
    if not response.content.is_eof():
        raise HearthConnectionError("Speech stream ended before the audio was complete")


async def _timed[T](
    deltas: AsyncGenerator[T],
    url: str,
    limits: StreamTimeouts,
    started: float,
) -> AsyncGenerator[T]:
    """Bound the waits of a chat stream: first delta, between deltas, in total."""
    loop = asyncio.get_running_loop()
    end = started + limits.total
    deadline = started + limits.first_token
    waiting_for = f"the first token within {limits.first_token:g} s"
    try:
        while True:
            try:
                async with asyncio.timeout_at(min(deadline, end)):
                    delta = await anext(deltas)
            except StopAsyncIteration:
                return
            except TimeoutError as err:
                if deadline >= end:
                    waiting_for = f"the whole answer within {limits.total:g} s"
                raise HearthTimeoutError(f"{url} did not send {waiting_for}") from err
            yield delta
            # The wait starts when the consumer asks for the next delta.
            deadline = loop.time() + limits.between_tokens
            waiting_for = f"the next token within {limits.between_tokens:g} s"
    finally:
        await deltas.aclose()


async def _iter_sse(response: aiohttp.ClientResponse) -> AsyncGenerator[ChatDelta]:
    """Parse `data:` events of an OpenAI chat stream into deltas.

    The body is read to its end, past `[DONE]`: aiohttp closes a connection released
    with unread body, and the end of a chunked body may come in a later packet than
    `[DONE]`, so stopping there would cost the next request a new TLS connection.
    """
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    prompt_tokens: int | None = None
    done = False
    try:
        async for raw_line in response.content:
            line = raw_line.decode("utf-8", errors="replace").strip()
            if done or not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                continue
            try:
                event = json.loads(payload)
            except ValueError as err:
                raise HearthConnectionError(f"Bad event in chat stream: {payload!r}") from err
            usage = event.get("usage") if isinstance(event, dict) else None
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                completion_tokens = usage["completion_tokens"]
                if isinstance(usage.get("prompt_tokens"), int):
                    prompt_tokens = usage["prompt_tokens"]
                details = usage.get("prompt_tokens_details")
                if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                    cached_tokens = details["cached_tokens"]
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
        raise HearthConnectionError(f"Chat stream broke off: {describe(err)}") from err
    except asyncio.CancelledError:
        response.close()
        raise
    finally:
        response.release()
    if not done and finish is None:
        raise HearthConnectionError("Chat stream ended before the answer was complete")
    yield ChatDelta(
        tool_calls=[calls[i] for i in sorted(calls)],
        finish_reason=finish,
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
        prompt_tokens=prompt_tokens,
    )
