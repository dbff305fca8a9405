"""The worker's models and load, apart from HTTP (model.py): usable without the app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hearth_worker.chat_engine import GenerationResult
from hearth_worker.model import ModelHost
from hearth_worker.settings import WorkerSettings


def test_no_http_is_imported_with_the_models() -> None:
    code = (
        "import sys, hearth_worker.model; "
        "print([m for m in ('aiohttp', 'hearth_worker.server') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]"


def test_loaded_models_and_their_capacity(tiny_chat_model: Path, tmp_path: Path) -> None:
    name = json.loads((tiny_chat_model / "hearth-model.json").read_text())["name"]
    host = ModelHost(
        WorkerSettings(
            model_dirs=[tiny_chat_model],
            state_dir=tmp_path,
            warmup=False,
            max_running=2,
            max_queued=5,
            prompt_cache_mb=0,
        ),
        "node-1",
    )
    assert host.manifests == {}
    host.load()
    assert list(host.chat_models) == [name]
    assert host.embedding_models == {}
    snapshot = host.capacity_snapshot()
    assert snapshot["node_id"] == "node-1"
    assert (snapshot["running"], snapshot["queued"]) == (0, 0)
    assert (snapshot["max_running"], snapshot["max_queued"]) == (2, 5)
    assert snapshot["prompt_cache"] is None  # --prompt-cache-mb 0
    assert snapshot["models"] == {
        name: {
            "prefill_tok_s": None,
            "decode_tok_s": None,
            "requests_served": 0,
            "batch_peak_bytes": 0,  # no two requests decoded together yet
        }
    }
    # A finished generation counts; its first token's time belongs to prefill.
    host.record(
        name,
        GenerationResult(prompt_tokens=10, prefill_s=0.5, completion_tokens=5, decode_s=2.0),
    )
    rates = host.capacity_snapshot()["models"][name]
    assert rates["requests_served"] == 1
    assert rates["prefill_tok_s"] == 20.0
    assert rates["decode_tok_s"] == 2.0  # (5 - 1) tokens in 2 s
    info = host.model_info(host.manifests[name])
    assert (info["id"], info["kind"]) == (name, "chat")
    assert "sampling_defaults" in info
