"""Models served from a models directory, pulled and removed at run time through the API.

Real worker processes (``start_worker``) pulling from the fake hub (``tests/fakehub.py``,
``HF_ENDPOINT``); the registry's wait for running requests is checked in-process.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakehub import FakeHub
from hearth_worker.auth import AuthStore
from hearth_worker.capacity import RateTracker
from hearth_worker.catalog import load_catalog
from hearth_worker.pull import PARTIAL_DIR, installed_models, remove_model
from hearth_worker.registry import ModelRegistry
from test_api import CHAT, check_schema, model_id
from worker_process import WorkerProcess, start_worker

REPO = "acme/Tiny-chat-onnx"
FOLDER = "cpu_and_mobile/cpu-fp32-rtn"
SOURCE = f"{REPO}:{FOLDER}"
OTHER_REPO = "acme/Other-tiny-onnx"  # the same files, for a pull that is cancelled
PULL = "/v1/models/pull"
PHASES = ["queued", "resolving", "downloading", "verifying", "installing", "loading", "done"]
POLL_S = 0.1
POLL_LIMIT_S = 120.0
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def hub(tiny_chat_model: Path) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(REPO, {FOLDER: tiny_chat_model}, files={"README.md": b"# Tiny chat\n"})
        fake.add_repo(OTHER_REPO, {FOLDER: tiny_chat_model})
        fake.add_repo("acme/not-a-model", files={"README.md": b"# Notes\n"})
        yield fake


def hub_worker(
    hub: FakeHub, workdir: Path, models: list[Path] | None = None
) -> tuple[WorkerProcess, dict[str, str]]:
    """A worker pulling from `hub`, and the headers of an admin token for it."""
    worker = start_worker(
        models or [],
        workdir,
        extra=["--no-warmup"],
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(workdir / "hf-home")},
    )
    token, _ = AuthStore(worker.state_dir).create_token("admin tests", admin=True)
    return worker, {"Authorization": f"Bearer {token}"}


async def get_json(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, Any]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.json()


async def start_pull(
    http: aiohttp.ClientSession,
    worker: WorkerProcess,
    admin: dict[str, str],
    body: dict[str, Any],
    status: int = 202,
) -> dict[str, Any]:
    async with http.post(worker.url + PULL, json=body, headers=admin) as resp:
        job = await resp.json()
        assert resp.status == status, job
    check_schema(job, "PullJob")
    return dict(job)


async def wait_for_job(
    http: aiohttp.ClientSession,
    worker: WorkerProcess,
    admin: dict[str, str],
    job_id: str,
    until: Any = lambda job: job["status"] != "running",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the job until `until(job)`; returns it and every state seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + POLL_LIMIT_S
    while True:
        status, job = await get_json(http, f"{worker.url}{PULL}/{job_id}", admin)
        assert status == 200, job
        check_schema(job, "PullJob")
        seen.append(job)
        if until(job):
            return job, seen
        assert time.monotonic() < deadline, f"job never got there: {job}\n{worker.log()}"
        await asyncio.sleep(POLL_S)


async def served_ids(
    http: aiohttp.ClientSession, worker: WorkerProcess
) -> tuple[list[str], list[str], list[str]]:
    """The model ids /v1/models, /v1/info and /v1/capacity report."""
    _, models = await get_json(http, worker.url + "/v1/models", worker.headers)
    check_schema(models, "ModelList")
    _, info = await get_json(http, worker.url + "/v1/info", worker.headers)
    check_schema(info, "Info")
    _, capacity = await get_json(http, worker.url + "/v1/capacity", worker.headers)
    check_schema(capacity, "Capacity")
    return (
        sorted(m["id"] for m in models["data"]),
        sorted(m["id"] for m in info["models"]),
        sorted(capacity["models"]),
    )


def copy_model(model: Path, into: Path, name: str | None = None) -> Path:
    copy = into / (name or model.name)
    shutil.copytree(model, copy)
    return copy


# -- serving a models directory ------------------------------------------------------


async def test_worker_with_an_empty_models_dir_starts(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    worker = start_worker([], tmp_path, extra=["--no-warmup"])
    try:
        assert await served_ids(http, worker) == ([], [], [])
        assert worker.log().count("No model to serve yet") == 1, worker.log()
        async with http.post(
            worker.url + CHAT, json={"model": "any", "messages": HELLO}, headers=worker.headers
        ) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"
    finally:
        assert await worker.astop() == 0, worker.log()
    assert "Traceback" not in worker.log()


async def test_every_model_folder_in_the_models_dir_is_served(
    http: aiohttp.ClientSession, tiny_chat_model: Path, embedding_model: Path, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    copy_model(tiny_chat_model, models_dir, "chat")
    (models_dir / "junk").mkdir()
    (models_dir / "junk" / "notes.txt").write_text("not a model")
    broken = copy_model(tiny_chat_model, models_dir, "broken")
    (broken / "hearth-model.json").write_text("{")
    # Where pulls download: never served, never warned about.
    copy_model(embedding_model, models_dir / PARTIAL_DIR, "half")
    (models_dir / "README.txt").write_text("a file, not a folder")
    worker = start_worker(
        [embedding_model],
        tmp_path / "worker",
        extra=["--no-warmup", "--models-dir", str(models_dir)],
    )
    try:
        expected = sorted([model_id(tiny_chat_model), model_id(embedding_model)])
        assert await served_ids(http, worker) == (expected, expected, expected)
        log = worker.log()
        assert f"Skipping {models_dir / 'junk'}" in log, log
        assert f"Skipping {broken}" in log, log
        assert "half" not in log and "README" not in log, log
        assert "No model to serve yet" not in log
        assert not (worker.state_dir / "models").exists(), "--models-dir replaces the default"
    finally:
        assert await worker.astop() == 0, worker.log()


def test_two_model_folders_of_one_name_stop_the_start(
    tiny_chat_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="exited with 2") as failed:
        start_worker([tiny_chat_model, tiny_chat_model], tmp_path, extra=["--no-warmup"])
    assert f"Two models are named {model_id(tiny_chat_model)!r}" in str(failed.value)
    assert "Traceback" not in str(failed.value)


# -- pulling and removing through the API ---------------------------------------------


async def test_pull_through_the_api_then_chat_without_restart(
    http: aiohttp.ClientSession,
    hub: FakeHub,
    tiny_chat_model: Path,
    embedding_model: Path,
    tmp_path: Path,
) -> None:
    hub.slow(0.05)  # ~50 pieces of 64 KiB: the job is still running when asked again
    worker, admin = hub_worker(hub, tmp_path, [embedding_model])
    try:
        assert (await served_ids(http, worker))[0] == [model_id(embedding_model)]
        job = await start_pull(http, worker, admin, {"source": SOURCE})
        assert job["status"] == "running" and job["source"] == SOURCE
        assert job["id"].startswith("pull_") and job["model"] is None and job["error"] is None
        again = await start_pull(http, worker, admin, {"source": SOURCE}, status=200)
        assert again["id"] == job["id"], "a source being pulled answers its running job"

        hub.slow(0.0)
        done, seen = await wait_for_job(http, worker, admin, job["id"])
        assert done["status"] == "done", done
        assert done["error"] is None
        assert done["phase"] == "done"
        assert done["total_bytes"] > 3_000_000 and done["done_bytes"] == done["total_bytes"]
        progress = [state["done_bytes"] for state in seen]
        assert progress == sorted(progress), "progress never goes back"
        phases = [PHASES.index(state["phase"]) for state in seen]
        assert phases == sorted(phases), [state["phase"] for state in seen]
        model = done["model"]
        assert model is not None
        name = model["id"]
        assert model["hearth"]["kind"] == "chat"

        # Served at once, everywhere, without a restart.
        expected = sorted([name, model_id(embedding_model)])
        assert await served_ids(http, worker) == (expected, expected, expected)
        async with http.post(
            worker.url + CHAT,
            json={"model": name, "messages": HELLO, "max_tokens": 4},
            headers=worker.headers,  # any token may use it
        ) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
        assert answer["model"] == name
        assert answer["choices"][0]["message"]["content"]
        assert "Now serving" in worker.log()

        # A pull of an installed source is done at once, with the same model.
        repeat = await start_pull(http, worker, admin, {"source": SOURCE})
        repeat, _ = await wait_for_job(http, worker, admin, repeat["id"])
        assert repeat["status"] == "done" and repeat["model"]["id"] == name

        # DELETE: gone from the API and from the disk; chat on it is a 404.
        models_dir = worker.state_dir / "models"
        assert [m.name for m in installed_models(models_dir)] == [name]
        async with http.delete(f"{worker.url}/v1/models/{name}", headers=admin) as resp:
            deleted = await resp.json()
            assert resp.status == 200, deleted
        check_schema(deleted, "ModelDeleted")
        assert deleted == {"id": name, "deleted": True}
        assert installed_models(models_dir) == []
        assert [p.name for p in models_dir.iterdir() if p.name != PARTIAL_DIR] == []
        assert await served_ids(http, worker) == ([model_id(embedding_model)],) * 3
        async with http.post(
            worker.url + CHAT, json={"model": name, "messages": HELLO}, headers=worker.headers
        ) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"
        async with http.delete(f"{worker.url}/v1/models/{name}", headers=admin) as resp:
            assert resp.status == 404
            check_schema(await resp.json(), "Error")

        # The catalog tells which of its entries are installed (the hub serves the tiny
        # model under the first entry's source).
        entry = load_catalog()[0]
        repo, _, folder = entry.source.partition(":")
        hub.add_repo(repo, {folder: tiny_chat_model})
        job = await start_pull(http, worker, admin, {"source": entry.source})
        job, _ = await wait_for_job(http, worker, admin, job["id"])
        assert job["status"] == "done", job
        _, catalog = await get_json(http, worker.url + "/v1/catalog", worker.headers)
        check_schema(catalog, "Catalog")
        installed = {e["id"]: e["installed"] for e in catalog["data"]}
        assert installed == {e.id: e.id == entry.id for e in load_catalog()}

        # A --model folder is not the API's to remove.
        fixed = model_id(embedding_model)
        async with http.delete(f"{worker.url}/v1/models/{fixed}", headers=admin) as resp:
            error = await resp.json()
            assert resp.status == 409
        check_schema(error, "Error")
        assert error["error"]["code"] == "model_not_removable"
        assert (embedding_model / "hearth-model.json").is_file()
        assert fixed in (await served_ids(http, worker))[0]
    finally:
        assert await worker.astop() == 0, worker.log()
    log = worker.log()
    assert "Traceback" not in log and " ERROR " not in log, log


async def test_cancel_a_pull_through_the_api(
    http: aiohttp.ClientSession, hub: FakeHub, tmp_path: Path
) -> None:
    hub.slow(0.5)  # minutes for the whole file: it is cancelled long before
    worker, admin = hub_worker(hub, tmp_path)
    try:
        job = await start_pull(http, worker, admin, {"source": f"{OTHER_REPO}:{FOLDER}"})
        await wait_for_job(
            http, worker, admin, job["id"], until=lambda j: j["phase"] == "downloading"
        )
        async with http.delete(f"{worker.url}{PULL}/{job['id']}", headers=admin) as resp:
            assert resp.status == 200
            check_schema(await resp.json(), "PullJob")
        hub.slow(0.0)
        ended, _ = await wait_for_job(http, worker, admin, job["id"])
        assert ended["status"] == "cancelled", ended
        assert ended["error"]["code"] == "cancelled"
        assert ended["model"] is None
        models_dir = worker.state_dir / "models"
        assert installed_models(models_dir) == []
        assert [p.name for p in models_dir.iterdir()] == [PARTIAL_DIR], "only the partial stays"
        assert await served_ids(http, worker) == ([], [], [])
        # Cancelling an ended job changes nothing.
        async with http.delete(f"{worker.url}{PULL}/{job['id']}", headers=admin) as resp:
            assert (await resp.json())["status"] == "cancelled"
        for method in ("GET", "DELETE"):
            async with http.request(method, f"{worker.url}{PULL}/pull_nope", headers=admin) as resp:
                assert resp.status == 404
                error = await resp.json()
            check_schema(error, "Error")
            assert error["error"]["code"] == "job_not_found"
    finally:
        assert await worker.astop() == 0, worker.log()


async def test_failed_pulls_say_why(
    http: aiohttp.ClientSession, hub: FakeHub, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker, admin = hub_worker(hub, tmp_path, [tiny_chat_model])
    try:
        for source, code in (
            ("acme/nothing-here", "unknown_repo"),
            ("acme/not-a-model", "not_a_model"),
        ):
            job = await start_pull(http, worker, admin, {"source": source})
            failed, _ = await wait_for_job(http, worker, admin, job["id"])
            assert failed["status"] == "failed", failed
            assert failed["error"]["code"] == code, failed
            assert failed["error"]["message"] and failed["model"] is None

        # Pulled, but a --model folder has that name already: refused, nothing left.
        taken = model_id(tiny_chat_model)
        job = await start_pull(http, worker, admin, {"source": SOURCE, "name": taken})
        failed, _ = await wait_for_job(http, worker, admin, job["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "name_taken", failed
        assert installed_models(worker.state_dir / "models") == []
        assert await served_ids(http, worker) == ([taken],) * 3

        # Bodies that are no pull at all.
        for body, param in (
            ({}, "source"),
            ({"source": "not a repo"}, "source"),
            ({"source": "owner/name:../up"}, "source"),
            ({"source": SOURCE, "name": "a/b"}, "name"),
            ({"source": SOURCE, "name": " padded"}, "name"),
        ):
            async with http.post(worker.url + PULL, json=body, headers=admin) as resp:
                error = await resp.json()
                assert resp.status == 400, (body, error)
            check_schema(error, "Error")
            assert error["error"]["param"] == param
    finally:
        assert await worker.astop() == 0, worker.log()
    assert "Traceback" not in worker.log()


# -- the registry: a removal waits for the requests running on the model ---------------


@pytest.fixture
async def registry(tiny_chat_model: Path, tmp_path: Path) -> AsyncIterator[ModelRegistry]:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    copy_model(tiny_chat_model, models_dir, "tiny")
    served = ModelRegistry(
        fixed_dirs=[],
        models_dir=models_dir,
        rates=RateTracker(),
        warmup=False,
        remove_folder=remove_model,
    )
    await asyncio.get_running_loop().run_in_executor(None, served.load_all)
    yield served


async def test_removal_waits_for_running_requests(
    registry: ModelRegistry, tiny_chat_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = model_id(tiny_chat_model)
    folder = registry.manifests[name].path
    with registry.hold_chat(name) as model:
        assert model.id == name
        removal = asyncio.create_task(registry.remove_model(name))
        # Time enough to remove it (a removal that did not wait would be done by then).
        await asyncio.wait({removal}, timeout=2.0)
        assert not removal.done(), "the model was removed under a running request"
        assert f"Removing {name}: waiting for 1 running request(s) on it" in caplog.text
        assert name not in registry.chat_models, "new requests no longer find it"
        with pytest.raises(KeyError):
            registry.hold_chat(name)
        assert folder.is_dir()
    removed = await asyncio.wait_for(removal, 60)
    assert removed.name == name
    assert not folder.exists()
    assert registry.manifests == {}
