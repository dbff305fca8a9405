"""Read a model folder's `hearth-model.json` (written by scripts/export_model)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "hearth-model.json"
KINDS = ("chat", "embedding")


class ManifestError(ValueError):
    """A model folder is missing, incomplete or not one the worker can serve."""


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    kind: str
    runtime: str
    quantization: str
    context_length: int
    size_bytes: int
    files: list[dict[str, Any]]
    embedding: dict[str, Any] | None

    @property
    def dimensions(self) -> int | None:
        return int(self.embedding["dimensions"]) if self.embedding else None

    def public(self) -> dict[str, Any]:
        """What /v1/info and /v1/models tell about this model."""
        return {
            "id": self.name,
            "kind": self.kind,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "size_bytes": self.size_bytes,
            "dimensions": self.dimensions,
        }


def load_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise ManifestError(f"Model folder {model_dir} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ManifestError(
            f"{model_dir} has no {MANIFEST_NAME}: export the model with scripts/export_model"
        ) from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    try:
        manifest = Manifest(
            path=model_dir,
            name=str(data["name"]),
            kind=str(data["kind"]),
            runtime=str(data["runtime"]),
            quantization=str(data["quantization"]),
            context_length=int(data["context_length"]),
            size_bytes=int(data["size_bytes"]),
            files=list(data["files"]),
            embedding=data.get("embedding"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ManifestError(f"{path} is incomplete: {err!r}") from err
    if manifest.kind not in KINDS:
        raise ManifestError(f"{path}: unknown kind {manifest.kind!r}")
    if manifest.kind == "embedding" and not manifest.embedding:
        raise ManifestError(f"{path}: an embedding model needs the 'embedding' section")
    missing = [f["path"] for f in manifest.files if not (model_dir / f["path"]).is_file()]
    if missing:
        raise ManifestError(f"{model_dir} is missing files listed in its manifest: {missing}")
    return manifest
