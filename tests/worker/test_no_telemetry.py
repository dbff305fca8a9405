"""A worker writes nothing outside its state dir: no onnxruntime telemetry either.

onnxruntime and onnxruntime-genai (Linux wheels included) keep a device id and
an event database under ~/.cache/Microsoft/DeveloperTools and upload them when
they can; `hearth_worker` switches that off before the libraries load.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from worker_process import start_worker


def _id(path: Path) -> str:
    return str(json.loads((path / "hearth-model.json").read_text())["name"])


async def test_worker_writes_nothing_to_home_or_tmp(
    http: aiohttp.ClientSession, tiny_chat_model: Path, embedding_model: Path, tmp_path: Path
) -> None:
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    worker = start_worker(
        [tiny_chat_model, embedding_model],
        tmp_path / "worker",
        env={"HOME": str(home), "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(home / ".cache")},
    )
    try:
        async with http.post(
            worker.url + "/v1/chat/completions",
            json={
                "model": _id(tiny_chat_model),
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 8,
            },
            headers=worker.headers,
        ) as resp:
            assert resp.status == 200
        async with http.post(
            worker.url + "/v1/embeddings",
            json={"model": _id(embedding_model), "input": ["hello"]},
            headers=worker.headers,
        ) as resp:
            assert resp.status == 200
    finally:
        assert worker.stop() == 0, worker.log()
    written = sorted(str(p.relative_to(tmp_path)) for p in (*home.rglob("*"), *scratch.rglob("*")))
    assert written == [], f"the worker wrote outside its state dir: {written}"
