"""Pairing an AuthStore in the test's own process, through the proof a client sends.

The worker accepts only the pairing proof (``AuthStore.pair_with_proof``); this is
the client's half of it without a network, for tests of the store's rules.
"""

from __future__ import annotations

import functools

from hearth_worker import pairing
from hearth_worker.auth import AuthStore, TokenInfo
from hearth_worker.pairing import PairingError

NONCE = bytes(range(pairing.NONCE_BYTES))  # a fixed nonce: the key is cached per code


@functools.lru_cache(maxsize=64)
def _session_key(normalized_code: str, salt: str) -> bytes:
    """The client's session key for a plain-HTTP store (two scrypt runs, so cached)."""
    verifier = pairing.code_verifier(normalized_code, bytes.fromhex(salt))
    return pairing.session_key(verifier, b"", NONCE)


def pair_locally(
    store: AuthStore, code: str, *, client_id: str, client_name: str | None = None
) -> tuple[str, TokenInfo]:
    """Pair with ``code`` as a client would; raises PairingError as the worker refuses.

    Checks the worker's proof too, then returns the token and its info.
    """
    try:
        salt = store.pairing_salt()
    except PairingError:
        # No usable code: the store says why, rate limits first, as for any attempt.
        salt = "00" * pairing.SALT_BYTES
    key = _session_key(pairing.normalize_code(code), salt)
    token, info, proof = store.pair_with_proof(
        salt=salt,
        client_nonce=NONCE,
        proof=pairing.client_proof(key, b"", NONCE),
        fingerprint=b"",
        client_id=client_id,
        client_name=client_name,
    )
    assert proof == pairing.worker_proof(key, b"", NONCE, token, store.node_id)
    return token, info
