"""`serve --pull SOURCE`: models pulled at start-up while the worker serves what it has.

Real worker processes pulling from the fake hub (``tests/fakehub.py``, ``HF_ENDPOINT``),
as the add-on starts them for hub ids in its ``models`` option.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakehub import FakeHub
from hearth_worker.pull import PullProgress, installed_models
from hearth_worker.pull_jobs import PullJob
from test_api import check_schema, model_id
from test_models_api import FOLDER, REPO, SOURCE, get_json, served_ids
from worker_process import WorkerProcess, start_worker

POLL_S = 0.1
POLL_LIMIT_S = 120.0
HUGE = 1 << 50  # bytes: more than any test machine's disk


@pytest.fixture
def hub(tiny_chat_model: Path) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(REPO, {FOLDER: tiny_chat_model})
        fake.add_repo("acme/Huge-chat-onnx", {FOLDER: tiny_chat_model})
        yield fake


def pulling_worker(
    hub: FakeHub, workdir: Path, models: list[Path], sources: list[str]
) -> WorkerProcess:
    return start_worker(
        models,
        workdir,
        extra=["--no-warmup", *[arg for s in sources for arg in ("--pull", s)]],
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(workdir / "hf-home")},
    )


async def info(http: aiohttp.ClientSession, worker: WorkerProcess) -> dict[str, Any]:
    status, body = await get_json(http, worker.url + "/v1/info", worker.headers)
    assert status == 200, body
    check_schema(body, "Info")
    return dict(body)


async def wait_for_pulls(
    http: aiohttp.ClientSession, worker: WorkerProcess
) -> list[dict[str, Any]]:
    """Poll /v1/info until no pull runs; returns its pulls."""
    deadline = time.monotonic() + POLL_LIMIT_S
    while True:
        pulls: list[dict[str, Any]] = (await info(http, worker))["pulls"]
        if all(job["status"] != "running" for job in pulls):
            return pulls
        assert time.monotonic() < deadline, f"pulls still running: {pulls}\n{worker.log()}"
        await asyncio.sleep(POLL_S)


async def test_pull_at_start_beside_what_is_served(
    http: aiohttp.ClientSession, hub: FakeHub, embedding_model: Path, tmp_path: Path
) -> None:
    hub.slow(0.5)  # minutes for the whole file: still running when first asked
    worker = pulling_worker(hub, tmp_path / "first", [embedding_model], [SOURCE])
    try:
        # Serving its --model at once, the pull running beside it.
        fixed = model_id(embedding_model)
        assert await served_ids(http, worker) == ([fixed],) * 3
        pulls = (await info(http, worker))["pulls"]
        assert len(pulls) == 1, pulls
        assert pulls[0]["source"] == SOURCE and pulls[0]["status"] == "running", pulls
        assert pulls[0]["error"] is None
        assert "id" not in pulls[0] and "model" not in pulls[0], "any token reads /v1/info"

        hub.slow(0.0)
        pulls = await wait_for_pulls(http, worker)
        assert [(p["source"], p["status"], p["phase"]) for p in pulls] == [(SOURCE, "done", "done")]
        assert pulls[0]["total_bytes"] > 3_000_000
        assert pulls[0]["done_bytes"] == pulls[0]["total_bytes"]
        models_dir = worker.state_dir / "models"
        (pulled,) = [m.name for m in installed_models(models_dir)]
        expected = sorted([fixed, pulled])
        assert await served_ids(http, worker) == (expected, expected, expected)
    finally:
        assert await worker.astop() == 0, worker.log()
    log = worker.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert f"Pulling {SOURCE} (job pull_" in log, log
    assert re.search(rf"Pulling {re.escape(SOURCE)}: downloading \d+\.\d MB", log), log
    assert re.search(rf"Pulling {re.escape(SOURCE)}: 100 % \(", log), log
    assert re.search(rf"Pulled {re.escape(SOURCE)} \(\d+\.\d MB\): serving {pulled}", log), log

    # Started again with the same --pull: installed, so just served; no job, no download.
    downloads = len(hub.requests)
    again = pulling_worker(hub, tmp_path / "first", [], [SOURCE])
    try:
        assert await served_ids(http, again) == ([pulled],) * 3
        assert (await info(http, again))["pulls"] == []
    finally:
        assert await again.astop() == 0, again.log()
    assert f"{SOURCE} is installed" in again.log(), again.log()
    assert len(hub.requests) == downloads, "nothing asked of the hub"


async def test_pull_at_start_without_space_leaves_the_worker_serving(
    http: aiohttp.ClientSession, hub: FakeHub, embedding_model: Path, tmp_path: Path
) -> None:
    # The hub says a file is bigger than any disk: the worker's real free-space check refuses.
    huge_repo = hub.repos["acme/Huge-chat-onnx"]
    biggest = max(huge_repo.files.values(), key=lambda f: f.size)
    biggest.size = HUGE
    huge = f"acme/Huge-chat-onnx:{FOLDER}"
    worker = pulling_worker(hub, tmp_path, [embedding_model], [huge, "not a hub id"])
    try:
        pulls = await wait_for_pulls(http, worker)
        assert [(p["source"], p["status"]) for p in pulls] == [(huge, "failed")], pulls
        error = pulls[0]["error"]
        assert error["code"] == "no_space", error
        assert huge in error["message"] and "GB more disk space" in error["message"], error
        models_dir = worker.state_dir / "models"
        assert str(models_dir) not in error["message"], "no path in /v1/info"
        assert "the models folder has" in error["message"], error

        # Still serving what it has; nothing installed.
        assert await served_ids(http, worker) == ([model_id(embedding_model)],) * 3
        assert installed_models(models_dir) == []
    finally:
        assert await worker.astop() == 0, worker.log()
    log = worker.log()
    assert "Traceback" not in log, log
    assert re.search(
        rf"Pulling {re.escape(huge)} failed: .*needs [\d.]+ GB more disk space.*\(no_space\)", log
    ), log
    assert "Not pulling not a hub id: " in log, log


def test_download_progress_is_logged_every_tenth_or_30_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A line when the download starts, then at each new 10 % step, or after 30 s
    without one (a slow download); the clock is the test's."""
    now = [1000.0]
    job = PullJob(id="pull_test", source=SOURCE, name=None, clock=lambda: now[0])
    total = 1_000_000_000

    def report(done: int, phase: str = "downloading") -> None:
        job.progress(PullProgress(SOURCE, phase, total, done, "model.onnx"))

    caplog.set_level(logging.INFO, logger="hearth_worker.pull_jobs")
    report(0, "resolving")
    report(250_000_000)  # resumed: a quarter here already
    report(260_000_000)
    report(299_000_000)  # still the same 10 % step, within 30 s: no line
    report(300_000_000)  # a new step
    now[0] += 29.0
    report(301_000_000)
    now[0] += 1.0  # 30 s since the last line
    report(302_000_000)
    report(1_000_000_000)
    report(1_000_000_000, "verifying")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"Pulling {SOURCE}: downloading 1.0 GB (250.0 MB here already)",
        f"Pulling {SOURCE}: 30 % (300.0 MB of 1.0 GB)",
        f"Pulling {SOURCE}: 30 % (302.0 MB of 1.0 GB)",
        f"Pulling {SOURCE}: 100 % (1.0 GB of 1.0 GB)",
    ]
    assert (job.phase, job.done_bytes, job.total_bytes) == ("verifying", total, total)
