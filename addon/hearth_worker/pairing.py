"""The pairing proof (protocol ``hearth-pair-v1``): the code never crosses the wire.

The person types the code the worker shows into the client. Both sides then prove
they know it, bound to the TLS certificate fingerprint the *client* sees, before the
worker issues a token:

1. ``GET /v1/pair`` -> ``{"protocol": "hearth-pair-v1", "salt": hex}``: the salt of
   the current code (public).
2. The client picks a random nonce (16 bytes) and derives, with scrypt
   (N=2^15, r=8, p=1, 32 MiB, ~75 ms on one desktop core, each)::

       verifier = scrypt(code, "hearth-pair-v1 code" | salt)
       key      = scrypt(verifier, "hearth-pair-v1 session" | fingerprint | nonce)
       proof    = HMAC-SHA256(key, "client" | fingerprint | nonce)

   ``fingerprint`` is the SHA-256 of the certificate the client's TLS connection
   presented (empty for a ``--plain-http`` worker). ``|`` joins length-prefixed
   fields.
3. ``POST /v1/pair {salt, client_nonce, proof, client_name}`` over a connection
   pinned to that fingerprint. The worker keeps only ``verifier`` (never the code),
   recomputes ``key`` with *its own* fingerprint and checks the proof; a wrong proof
   counts as a wrong code (rate limits, code thrown away after 20).
4. Only then it issues the token and answers with its own proof
   ``HMAC-SHA256(key, "worker" | fingerprint | nonce | sha256(token) | node_id)``,
   which the client checks before it keeps the token and pins the fingerprint.

A man in the middle presents its own certificate, so the client's proof is bound to
the wrong fingerprint and the real worker refuses it; the middleman cannot answer
with a worker proof either. What it holds is one proof to attack offline: each guess
costs two scrypt runs (one of which depends on the client's fresh nonce, so nothing
can be computed ahead), over 32^8 = 2^40 codes, and the code dies after 15 minutes.
At 75 ms per run that is about 2.6 thousand core-years per code, or ~10^8 cores to
finish within the code's life.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import secrets
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

PROTOCOL = "hearth-pair-v1"
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 16
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
FINGERPRINT_BYTES = 32


def _fields(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(2, "big") + part for part in parts)


def _scrypt(password: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(
        password,
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=SCRYPT_MAXMEM,
        dklen=KEY_BYTES,
    )


def code_verifier(normalized_code: str, salt: bytes) -> bytes:
    """What the worker stores for a code: the code itself is never kept."""
    return _scrypt(normalized_code.encode("utf-8"), _fields(f"{PROTOCOL} code".encode(), salt))


def session_key(verifier: bytes, fingerprint: bytes, client_nonce: bytes) -> bytes:
    return _scrypt(verifier, _fields(f"{PROTOCOL} session".encode(), fingerprint, client_nonce))


def client_proof(key: bytes, fingerprint: bytes, client_nonce: bytes) -> bytes:
    return hmac.digest(key, _fields(b"client", fingerprint, client_nonce), "sha256")


def worker_proof(
    key: bytes, fingerprint: bytes, client_nonce: bytes, token: str, node_id: str
) -> bytes:
    token_hash = hashlib.sha256(token.encode("utf-8")).digest()
    message = _fields(b"worker", fingerprint, client_nonce, token_hash, node_id.encode("utf-8"))
    return hmac.digest(key, message, "sha256")


# -- a reference client (tests, scripts): the integration has its own in client.py ---------


class PairingFailed(Exception):
    """Pairing was refused (``reason``: the worker's error code) or not proven."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Paired:
    token: str
    token_id: str
    node_id: str
    fingerprint: bytes  # empty for a plain-HTTP worker


def peer_fingerprint(host: str, port: int, timeout: float = 10.0) -> bytes:
    """SHA-256 of the certificate a TLS server presents (not verified: it gets pinned)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise PairingFailed("no_certificate", "The server presented no certificate")
    return hashlib.sha256(der).digest()


def _pinned_open(
    url: str, fingerprint: bytes, data: bytes | None, timeout: float
) -> tuple[int, dict[str, Any]]:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if parts.scheme == "https":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context
        )
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        der = conn.sock.getpeercert(binary_form=True) or b""
        if not hmac.compare_digest(hashlib.sha256(der).digest(), fingerprint):
            conn.close()
            raise PairingFailed("fingerprint_changed", "The worker's certificate changed")
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST" if data is not None else "GET", parts.path, body=data, headers=headers)
        response = conn.getresponse()
        body = json.loads(response.read() or b"{}")
        return response.status, body if isinstance(body, dict) else {}
    finally:
        conn.close()


def pair_remote(
    base_url: str, code: str, client_name: str = "hearth client", timeout: float = 10.0
) -> Paired:
    """Pair with the worker at ``base_url`` (``https://host:port``) by its code."""
    from .auth import normalize_code  # noqa: PLC0415 - avoids an import cycle

    parts = urllib.parse.urlsplit(base_url)
    plain = parts.scheme == "http"
    fingerprint = b"" if plain else peer_fingerprint(parts.hostname or "", parts.port or 443)
    status, challenge = _pinned_open(base_url + "/v1/pair", fingerprint, None, timeout)
    if status != 200:
        error = challenge.get("error") or {}
        raise PairingFailed(str(error.get("code") or status), str(error.get("message") or ""))
    if challenge.get("protocol") != PROTOCOL:
        raise PairingFailed("protocol", f"Unknown pairing protocol {challenge.get('protocol')!r}")
    salt = bytes.fromhex(str(challenge["salt"]))
    nonce = secrets.token_bytes(NONCE_BYTES)
    key = session_key(code_verifier(normalize_code(code), salt), fingerprint, nonce)
    body = json.dumps(
        {
            "salt": salt.hex(),
            "client_nonce": nonce.hex(),
            "proof": client_proof(key, fingerprint, nonce).hex(),
            "client_name": client_name,
        }
    ).encode()
    status, answer = _pinned_open(base_url + "/v1/pair", fingerprint, body, timeout)
    if status != 200:
        error = answer.get("error") or {}
        raise PairingFailed(str(error.get("code") or status), str(error.get("message") or ""))
    token, node_id = str(answer["token"]), str(answer["node_id"])
    expected = worker_proof(key, fingerprint, nonce, token, node_id)
    if not hmac.compare_digest(bytes.fromhex(str(answer.get("proof") or "")), expected):
        raise PairingFailed("not_proven", "The worker did not prove it knows the code")
    return Paired(token, str(answer["token_id"]), node_id, fingerprint)
