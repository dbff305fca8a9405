"""The pairing proof ``hearth-pair-v1``, the worker's side: the code never crosses the wire.

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

Here too: how a typed code is read (``normalize_code``), the error a refused or
unproven pairing raises (``PairingError``) and a reference client (``pair_remote``,
for scripts and tests; the integration has its own in
custom_components/hearth/client.py). Both sides' tests check their proofs against
tests/pairing_vectors.json.
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
from typing import Any, Literal

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

# Codes are Crockford base32 (auth.CODE_ALPHABET): the look-alikes a person may
# type for its digits are mapped back.
_CODE_LOOKALIKES = str.maketrans({"O": "0", "I": "1", "L": "1"})

# Why the worker refuses a pairing attempt (its error ``code`` on the wire).
PairingRefusal = Literal["no_code", "expired", "wrong_code", "rate_limited"]
_MESSAGES: dict[str, str] = {
    "no_code": "No pairing code is active; create one on the worker",
    "expired": "The pairing code has expired; create a new one on the worker",
    "wrong_code": "Wrong pairing code",
    "rate_limited": "Too many wrong pairing codes; try again later",
}


class PairingError(Exception):
    """A pairing attempt was refused, or not proven.

    ``reason``: why, as on the wire. The worker refuses with a ``PairingRefusal``
    (``retry_after``, in seconds, is set for ``rate_limited``). The reference
    client also raises ``not_proven`` (the worker did not prove it knows the code,
    or its certificate changed while pairing; the integration's
    ``HearthPairingError`` says the same), ``protocol`` (an unknown pairing
    protocol) and ``no_certificate``, or the worker's error code.
    """

    def __init__(
        self, reason: str, message: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message or _MESSAGES.get(reason, "Pairing refused"))
        self.reason = reason
        self.retry_after = retry_after


def normalize_code(code: str) -> str:
    """Upper-case, drop dashes and blanks, map Crockford look-alikes."""
    cleaned = "".join(ch for ch in code if ch not in "- \t")
    return cleaned.upper().translate(_CODE_LOOKALIKES)


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


@dataclass(frozen=True)
class PairResult:
    """What pairing returns: the token is shown only this once."""

    token: str
    token_id: str
    node_id: str
    fingerprint: bytes  # SHA-256 of the pinned certificate; empty for a plain-HTTP worker


def _unverified_context() -> ssl.SSLContext:
    """Reads a certificate before it is pinned: no CA, no host name (the pin is the check)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_fingerprint(host: str, port: int, timeout: float = 10.0) -> bytes:
    """SHA-256 of the certificate a TLS server presents (not verified: it gets pinned)."""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        _unverified_context().wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise PairingError("no_certificate", "The server presented no certificate")
    return hashlib.sha256(der).digest()


def _pinned_open(
    url: str, fingerprint: bytes, data: bytes | None, timeout: float
) -> tuple[int, dict[str, Any]]:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=_unverified_context()
        )
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        der = conn.sock.getpeercert(binary_form=True) or b""
        if not hmac.compare_digest(hashlib.sha256(der).digest(), fingerprint):
            conn.close()
            raise PairingError("not_proven", "The worker's certificate changed while pairing")
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
) -> PairResult:
    """Pair with the worker at ``base_url`` (``https://host:port``) by its code."""
    parts = urllib.parse.urlsplit(base_url)
    plain = parts.scheme == "http"
    fingerprint = b"" if plain else peer_fingerprint(parts.hostname or "", parts.port or 443)
    status, challenge = _pinned_open(base_url + "/v1/pair", fingerprint, None, timeout)
    if status != 200:
        error = challenge.get("error") or {}
        raise PairingError(str(error.get("code") or status), str(error.get("message") or ""))
    if challenge.get("protocol") != PROTOCOL:
        raise PairingError("protocol", f"Unknown pairing protocol {challenge.get('protocol')!r}")
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
        raise PairingError(str(error.get("code") or status), str(error.get("message") or ""))
    token, node_id = str(answer["token"]), str(answer["node_id"])
    expected = worker_proof(key, fingerprint, nonce, token, node_id)
    if not hmac.compare_digest(bytes.fromhex(str(answer.get("proof") or "")), expected):
        raise PairingError("not_proven", "The worker did not prove it knows the code")
    return PairResult(token, str(answer["token_id"]), node_id, fingerprint)
