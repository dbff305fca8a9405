"""The pairing proof's test vectors (pairing_vectors.json), as both sides' tests read them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FILE = Path(__file__).with_name("pairing_vectors.json")


@dataclass(frozen=True)
class Vector:
    """One exchange: what goes in (the code as typed, ...) and the bytes that come out."""

    code: str
    salt: bytes
    fingerprint: bytes  # empty: a plain-HTTP worker
    nonce: bytes
    token: str
    node_id: str
    key: bytes
    client_proof: bytes
    worker_proof: bytes


def load() -> list[Vector]:
    """Every vector in the file (there is at least one)."""
    vectors = []
    for vector in json.loads(FILE.read_text(encoding="utf-8"))["vectors"]:
        given, expected = vector["input"], vector["output"]
        vectors.append(
            Vector(
                code=given["code"],
                salt=bytes.fromhex(given["salt"]),
                fingerprint=bytes.fromhex(given["fingerprint"]),
                nonce=bytes.fromhex(given["nonce"]),
                token=given["token"],
                node_id=given["node_id"],
                key=bytes.fromhex(expected["key"]),
                client_proof=bytes.fromhex(expected["client_proof"]),
                worker_proof=bytes.fromhex(expected["worker_proof"]),
            )
        )
    assert vectors, f"{FILE} holds no vectors"
    return vectors
