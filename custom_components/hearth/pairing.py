"""The pairing proof (protocol hearth-pair-v1), the client's side: the code never crosses the wire.

addon/hearth_worker/pairing.py has the worker's side and the reasoning; both sides'
tests check their implementation against tests/pairing_vectors.json.
No Home Assistant imports (tests/integration/test_pure_modules.py).
"""

from __future__ import annotations

import hashlib
import hmac

PAIR_PROTOCOL = "hearth-pair-v1"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


def _fields(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(2, "big") + part for part in parts)


def normalize_code(code: str) -> str:
    """As the worker does: upper case, no dashes or blanks, O->0, I/L->1."""
    cleaned = "".join(ch for ch in code if ch not in "- \t")
    return cleaned.upper().translate(str.maketrans("OIL", "011"))


def pairing_key(code: str, salt: bytes, fingerprint: bytes, nonce: bytes) -> bytes:
    """The session key both sides derive (two scrypt runs: slow on purpose)."""
    verifier = hashlib.scrypt(
        normalize_code(code).encode("utf-8"),
        salt=_fields(f"{PAIR_PROTOCOL} code".encode(), salt),
        **_SCRYPT,
    )
    return hashlib.scrypt(
        verifier, salt=_fields(f"{PAIR_PROTOCOL} session".encode(), fingerprint, nonce), **_SCRYPT
    )


def client_proof(key: bytes, fingerprint: bytes, nonce: bytes) -> bytes:
    return hmac.digest(key, _fields(b"client", fingerprint, nonce), "sha256")


def worker_proof(key: bytes, fingerprint: bytes, nonce: bytes, token: str, node_id: str) -> bytes:
    token_hash = hashlib.sha256(token.encode("utf-8")).digest()
    message = _fields(b"worker", fingerprint, nonce, token_hash, node_id.encode("utf-8"))
    return hmac.digest(key, message, "sha256")
