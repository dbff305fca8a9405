"""A worker keeps nothing: no prompt, answer or embedding input on disk or in its logs."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from worker_process import start_worker

PROMPT_MARKER = "grandmother's secret pancake recipe 7f3a9c"
EMBED_MARKER = "the spare key is under the blue flowerpot 51e2"


def _id(path: Path) -> str:
    return str(json.loads((path / "hearth-model.json").read_text())["name"])


async def test_worker_keeps_nothing(
    http: aiohttp.ClientSession, tiny_chat_model: Path, embedding_model: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    scratch = tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    worker = start_worker(
        [tiny_chat_model, embedding_model],
        tmp_path / "worker",
        env={"HOME": str(home), "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(home / ".cache")},
    )
    answers: list[str] = []
    try:
        for stream in (False, True):
            async with http.post(
                worker.url + "/v1/chat/completions",
                json={
                    "model": _id(tiny_chat_model),
                    "messages": [{"role": "user", "content": PROMPT_MARKER}],
                    "max_tokens": 40,
                    "stream": stream,
                },
                headers=worker.headers,
            ) as resp:
                assert resp.status == 200
                if not stream:
                    answers.append((await resp.json())["choices"][0]["message"]["content"])
                else:
                    await resp.read()
        async with http.post(
            worker.url + "/v1/embeddings",
            json={"model": _id(embedding_model), "input": [EMBED_MARKER]},
            headers=worker.headers,
        ) as resp:
            assert resp.status == 200
        # A rejected request must not echo its content into the logs either.
        async with http.post(
            worker.url + "/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": PROMPT_MARKER}]},
            headers=worker.headers,
        ) as resp:
            assert resp.status == 404
    finally:
        assert worker.stop() == 0, worker.log()
    secrets = [PROMPT_MARKER, EMBED_MARKER, *[a for a in answers if len(a) >= 12]]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert worker.log_path in files
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for secret in secrets:
            assert secret not in text, f"{path} holds request content"
    state_files = sorted(p.name for p in worker.state_dir.iterdir())
    assert set(state_files) <= {
        ".lock",
        "node.json",
        "pairing.json",
        "tokens.json",
        "tls-cert.pem",
        "tls-key.pem",
    }, state_files
    # Nothing outside the state dir and the log either: no onnxruntime telemetry
    # (a device id and event databases under ~/.cache, switched off by hearth_worker).
    written = sorted(str(p.relative_to(tmp_path)) for p in (*home.rglob("*"), *scratch.rglob("*")))
    assert written == [], f"the worker wrote outside its state dir: {written}"
