"""Download a model from the Hugging Face hub (runs in .venv-export).

usage: hub_download.py REPO_ID DEST

Fetches configuration, tokenizer and weights (safetensors when the repository has
them, else PyTorch .bin), not ONNX/GGUF/TF/Flax copies.
"""

from __future__ import annotations

import sys
from pathlib import Path

from huggingface_hub import list_repo_files, snapshot_download


def main(repo_id: str, dest: Path) -> None:
    files = list_repo_files(repo_id)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    snapshot_download(
        repo_id,
        local_dir=dest,
        allow_patterns=["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", weights],
        ignore_patterns=["onnx/*", "*/onnx/*", "openvino/*"],
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    try:
        main(sys.argv[1], Path(sys.argv[2]))
    except Exception as err:  # one clear line instead of an HTTP client's traceback
        raise SystemExit(f"cannot download {sys.argv[1]}: {type(err).__name__}: {err}") from None
