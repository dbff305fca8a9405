"""Adding and removing a worker's models from Home Assistant's options flow, against a
real worker that pulls from a fake Hugging Face Hub (tests/fakehub.py) on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_worker import FakeWorker
from fakehub import FakeHub
from hearth_worker.auth import AuthStore
from hearth_worker.catalog import load_catalog
from homeassistant.config_entries import OptionsFlow
from homeassistant.core import Event, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.common import MockConfigEntry
from worker_process import WorkerProcess, start_worker

from custom_components.hearth import config_flow
from custom_components.hearth.config_flow import catalog_choices
from custom_components.hearth.const import DOMAIN
from custom_components.hearth.household import Household
from custom_components.hearth.router import RouteRequest
from custom_components.hearth.worker_api import parse_catalog

from .conftest import entry_for, restart, setup_entry, worker_info

REPO = "acme/Tiny-chat-onnx"
FOLDER = "cpu_and_mobile/cpu-fp32-rtn"
SOURCE = f"{REPO}:{FOLDER}"
PULLED = "Tiny-chat-onnx-cpu-fp32"  # the display name the worker gives it
DATA = f"{FOLDER}/model.onnx.data"  # its large (LFS) file
# Home Assistant >= 2025.8 (not 2025.4) shows a percentage while a step is in progress.
HAS_PERCENTAGE = hasattr(OptionsFlow, "async_update_progress")
PROGRESS_EVENT = "data_entry_flow_progress_update"


@pytest.fixture
def hub(tiny_chat_model: Path) -> Iterator[FakeHub]:
    """The hub: the tiny chat model as a repository, a repository that holds no model,
    and every catalog source (so that a model picked from the list can be pulled)."""
    with FakeHub() as fake:
        fake.add_repo(REPO, {FOLDER: tiny_chat_model}, files={"README.md": b"# Tiny\n"})
        fake.add_repo(
            "acme/not-a-model",
            files={"README.md": b"# Notes\n", "weights/data.bin": b"\0" * 4096},
        )
        for entry in load_catalog():
            repo, _, subfolder = entry.source.partition(":")
            fake.add_repo(repo, {subfolder: tiny_chat_model})
        yield fake


@pytest.fixture
def model_worker(tiny_chat_model: Path, hub: FakeHub, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker started with the tiny chat model (`--model`: not removable), pulling from
    the fake hub, holding the admin token pairing gives Home Assistant."""
    worker = start_worker(
        [tiny_chat_model], tmp_path / "worker", extra=["--no-warmup"], env=hub_env(hub, tmp_path)
    )
    worker.token, _ = AuthStore(worker.state_dir).create_token("Home Assistant", admin=True)
    yield worker
    worker.stop()


def hub_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    """The worker pulls from the fake hub, never from the internet."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_flow, "PULL_POLL_INTERVAL", 0.05)


async def open_step(hass: HomeAssistant, entry_id: str, step: str) -> dict[str, Any]:
    result = await hass.config_entries.options.async_init(entry_id)
    assert result["type"] is FlowResultType.MENU
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": step}
    )
    return dict(result)


async def finish_progress(hass: HomeAssistant, result: dict[str, Any]) -> dict[str, Any]:
    """Wait for the progress step's task as the frontend does, then take the next step."""
    assert result["type"] is FlowResultType.SHOW_PROGRESS, result
    await hass.async_block_till_done(wait_background_tasks=True)
    return dict(await hass.config_entries.options.async_configure(result["flow_id"]))


def loaded_models(hass: HomeAssistant, worker: WorkerProcess) -> list[str]:
    """What the worker's device shows: its "Loaded models" sensor."""
    node_id = worker_info(worker)["node_id"]
    entity_id = er.async_get(hass).async_get_entity_id("sensor", DOMAIN, f"{node_id}_loaded_models")
    assert entity_id is not None
    state = hass.states.get(entity_id)
    assert state is not None
    return list(state.attributes["models"])


def served(worker: WorkerProcess) -> list[str]:
    return sorted(m["id"] for m in worker_info(worker)["models"])


async def test_add_a_model_by_hub_id(
    hass: HomeAssistant, model_worker: WorkerProcess, hub: FakeHub
) -> None:
    """Any hub id: a progress step while the worker downloads, then the model is on the
    worker's device, in the household's choices and in the router, with no restart."""
    entry = entry_for(model_worker, "Kitchen laptop")
    await setup_entry(hass, entry)
    household = Household.get(hass)
    handle = household.workers[entry.entry_id]
    assert loaded_models(hass, model_worker) == ["tiny-chat"]
    progress: list[float] = []

    def on_progress(event: Event) -> None:
        progress.append(float(event.data["progress"]))

    hass.bus.async_listen(PROGRESS_EVENT, on_progress)
    hub.slow(0.02)  # about a second for the 3.3 MB file: polls see it under way

    form = await open_step(hass, entry.entry_id, "add_model")
    assert form["type"] is FlowResultType.FORM
    assert form["step_id"] == "add_model"
    assert form["description_placeholders"] == {"name": "Kitchen laptop", "details": ""}
    result = await hass.config_entries.options.async_configure(
        form["flow_id"], {"source": f" {SOURCE} "}
    )
    assert result["step_id"] == "pull"
    assert result["progress_action"] == "pull"
    assert result["description_placeholders"] == {"name": "Kitchen laptop", "model": SOURCE}
    result = await finish_progress(hass, dict(result))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "model_added"
    assert result["description_placeholders"] == {"name": "Kitchen laptop", "model": PULLED}

    assert served(model_worker) == sorted(["tiny-chat", PULLED])
    assert PULLED in handle.coordinator.info.chat_models
    assert sorted(loaded_models(hass, model_worker)) == sorted(["tiny-chat", PULLED])
    candidates = household.candidates(RouteRequest(model=PULLED))
    assert [(c.worker_id, c.model) for c in candidates] == [(entry.entry_id, PULLED)]
    # The household form offers it as the preferred chat model.
    form = await open_step(hass, entry.entry_id, "household")
    chat_models = form["data_schema"].schema["chat_model"].config["options"]
    assert PULLED in chat_models
    if HAS_PERCENTAGE:
        assert progress, "no percentage was shown while the worker downloaded"
        assert all(0.0 <= p <= 1.0 for p in progress)
        assert progress == sorted(progress)
    else:
        assert progress == []
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_add_a_model_from_the_catalog(
    hass: HomeAssistant, model_worker: WorkerProcess
) -> None:
    """The list: the worker's catalog, only what fits it and it lacks, recommended
    first; picking an entry pulls its source."""
    entry = entry_for(model_worker)
    await setup_entry(hass, entry)
    client = Household.get(hass).workers[entry.entry_id].client
    form = await open_step(hass, entry.entry_id, "add_model")
    shown = form["data_schema"].schema["model"].config["options"]
    catalog = await client.catalog()
    by_id = {e.id: e for e in catalog}
    assert shown, f"nothing in the catalog fits this machine: {catalog}"
    assert all(by_id[o["value"]].fits and not by_id[o["value"]].installed for o in shown)
    recommended = [by_id[o["value"]].recommended for o in shown]
    assert recommended == sorted(recommended, reverse=True)  # recommended first
    assert [e.id for e in catalog_choices(catalog)] == [o["value"] for o in shown]

    picked = by_id[shown[0]["value"]]
    result = await hass.config_entries.options.async_configure(
        form["flow_id"], {"model": picked.id}
    )
    assert result["description_placeholders"]["model"] == picked.source
    result = await finish_progress(hass, dict(result))
    assert result["reason"] == "model_added", result
    added = result["description_placeholders"]["model"]
    assert added in served(model_worker)
    # Now installed: no longer offered.
    catalog = await client.catalog()
    assert next(e for e in catalog if e.id == picked.id).installed
    form = await open_step(hass, entry.entry_id, "add_model")
    options = form["data_schema"].schema.get("model")
    shown = [o["value"] for o in (options.config["options"] if options else [])]
    assert picked.id not in shown
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_a_failed_pull_says_why(
    hass: HomeAssistant, model_worker: WorkerProcess, hub: FakeHub
) -> None:
    """The add form comes back with the worker's reason, translated, and its words; the
    worker serves what it served before, and the form stays usable. A malformed hub id
    is refused before the worker is asked."""
    entry = entry_for(model_worker)
    await setup_entry(hass, entry)
    form = await open_step(hass, entry.entry_id, "add_model")
    flow_id = form["flow_id"]

    result = await hass.config_entries.options.async_configure(
        flow_id, {"source": "https://huggingface.co/acme/x"}
    )
    assert result["errors"] == {"source": "invalid_source"}
    result = await hass.config_entries.options.async_configure(flow_id, {})
    assert result["errors"] == {"base": "no_model_chosen"}
    assert not [path for _, path in hub.requests if "/api/models/" in path]

    hub.corrupt(REPO, DATA)
    for source, error in (
        ("acme/No-such-model", "unknown_repo"),
        (f"{REPO}:cpu_and_mobile/no-such-folder", "unknown_subfolder"),
        ("acme/not-a-model", "not_a_model"),
        (SOURCE, "corrupt"),
    ):
        result = await hass.config_entries.options.async_configure(flow_id, {"source": source})
        result = await finish_progress(hass, dict(result))
        assert result["type"] is FlowResultType.FORM
        assert result["step_id"] == "add_model"
        assert result["errors"] == {"base": error}, source
        assert result["description_placeholders"]["details"]  # the worker's own words
        assert served(model_worker) == ["tiny-chat"]

    # The network gone mid-file: said so; trying again resumes where it stopped.
    hub.corrupt(REPO, DATA, corrupt=False)
    hub.drop_after(REPO, DATA, 1_000_000)
    hub.drop_after(REPO, DATA, 0)  # then the connection breaks without progress
    result = await hass.config_entries.options.async_configure(flow_id, {"source": SOURCE})
    result = await finish_progress(hass, dict(result))
    assert result["errors"] == {"base": "network"}
    assert "model.onnx.data" in result["description_placeholders"]["details"]
    before = hub.served_bytes(REPO, DATA)
    result = await hass.config_entries.options.async_configure(flow_id, {"source": SOURCE})
    result = await finish_progress(hass, dict(result))
    assert result["reason"] == "model_added"
    assert served(model_worker) == sorted(["tiny-chat", PULLED])
    size = hub.repos[REPO].files[DATA].size
    assert hub.served_bytes(REPO, DATA) - before == size - 1_000_000  # only the rest
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_closing_the_dialog_cancels_the_download(
    hass: HomeAssistant, model_worker: WorkerProcess, hub: FakeHub
) -> None:
    """Closing the flow mid-pull (the dialog's X) cancels the worker's job: nothing is
    installed, and the hub stops being read."""
    entry = entry_for(model_worker)
    await setup_entry(hass, entry)
    client = Household.get(hass).workers[entry.entry_id].client
    hub.slow(0.5)  # about 25 s for the large file: it is still running when closed
    form = await open_step(hass, entry.entry_id, "add_model")
    result = await hass.config_entries.options.async_configure(form["flow_id"], {"source": SOURCE})
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    job_id = await started_job(hass, hub, result["flow_id"])
    hass.config_entries.options.async_abort(result["flow_id"])
    await hass.async_block_till_done(wait_background_tasks=True)
    job = await client.pull_job(job_id)
    async with asyncio.timeout(60):  # the worker's thread stops at its next piece
        while job.running:
            await asyncio.sleep(0.1)
            job = await client.pull_job(job_id)
    assert job.status == "cancelled"
    assert job.error_code == "cancelled"
    assert served(model_worker) == ["tiny-chat"]
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_a_download_stopped_on_the_worker_says_so(
    hass: HomeAssistant,
    model_worker: WorkerProcess,
    hub: FakeHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job cancelled by someone else, one the worker forgot (it restarted), and a
    worker gone for good end the progress step with their reason; the form is back
    for another try."""
    entry = entry_for(model_worker)
    await setup_entry(hass, entry)
    client = Household.get(hass).workers[entry.entry_id].client
    hub.slow(0.5)
    form = await open_step(hass, entry.entry_id, "add_model")
    result = await hass.config_entries.options.async_configure(form["flow_id"], {"source": SOURCE})
    await client.cancel_pull(await started_job(hass, hub, form["flow_id"]))
    result = await finish_progress(hass, dict(result))
    assert result["errors"] == {"base": "cancelled"}

    downloads = hub.downloads(REPO, DATA)
    result = await hass.config_entries.options.async_configure(form["flow_id"], {"source": SOURCE})
    await started_job(hass, hub, form["flow_id"], after=downloads)
    await hass.async_add_executor_job(restart, model_worker)
    result = await finish_progress(hass, dict(result))
    assert result["errors"] == {"base": "pull_lost"}
    assert "restart" in result["description_placeholders"]["details"]

    # Gone for good: given up after PULL_UNREACHABLE_FOR. A second dialog following the
    # same download (the worker gives it the same job), closed meanwhile, cannot cancel
    # it and says so in the log.
    downloads = hub.downloads(REPO, DATA)
    result = await hass.config_entries.options.async_configure(form["flow_id"], {"source": SOURCE})
    job_id = await started_job(hass, hub, form["flow_id"], after=downloads)
    other = await open_step(hass, entry.entry_id, "add_model")
    await hass.config_entries.options.async_configure(other["flow_id"], {"source": SOURCE})
    assert await started_job(hass, hub, other["flow_id"]) == job_id
    await model_worker.astop()
    hass.config_entries.options.async_abort(other["flow_id"])
    monkeypatch.setattr(config_flow, "PULL_UNREACHABLE_FOR", 0.5)  # from now on
    result = await finish_progress(hass, dict(result))
    assert result["errors"] == {"base": "pull_lost"}
    assert "cannot connect" in result["description_placeholders"]["details"]
    assert f"Could not cancel pulling {SOURCE}" in caplog.text
    hass.config_entries.options.async_abort(result["flow_id"])
    assert await hass.config_entries.async_unload(entry.entry_id)


async def started_job(
    hass: HomeAssistant, hub: FakeHub, flow_id: str, *, after: int = 0, timeout: float = 60.0
) -> str:
    """The flow's running pull job's id, once the worker reads the large file from the
    hub (more than `after` times)."""
    handler = hass.config_entries.options._progress[flow_id]
    async with asyncio.timeout(timeout):
        while hub.downloads(REPO, DATA) <= after:
            await asyncio.sleep(0.05)
    job = handler._job
    assert job is not None
    assert job.running
    return str(job.id)


async def test_remove_a_model(hass: HomeAssistant, model_worker: WorkerProcess) -> None:
    """A pulled model is removed and leaves the device and the router; the one the worker
    was started with is refused, with the reason."""
    entry = entry_for(model_worker)
    await setup_entry(hass, entry)
    household = Household.get(hass)
    form = await open_step(hass, entry.entry_id, "add_model")
    result = await hass.config_entries.options.async_configure(form["flow_id"], {"source": SOURCE})
    assert (await finish_progress(hass, dict(result)))["reason"] == "model_added"

    form = await open_step(hass, entry.entry_id, "remove_model")
    assert form["step_id"] == "remove_model"
    choices = [o["value"] for o in form["data_schema"].schema["model"].config["options"]]
    assert sorted(choices) == sorted(["tiny-chat", PULLED])
    result = await hass.config_entries.options.async_configure(
        form["flow_id"], {"model": "tiny-chat"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "model_not_removable"}
    assert "--model" in result["description_placeholders"]["details"]
    result = await hass.config_entries.options.async_configure(result["flow_id"], {"model": PULLED})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "model_removed"
    assert result["description_placeholders"]["model"] == PULLED
    assert served(model_worker) == ["tiny-chat"]
    assert household.workers[entry.entry_id].coordinator.info.chat_models == ["tiny-chat"]
    assert loaded_models(hass, model_worker) == ["tiny-chat"]
    assert [c.model for c in household.candidates(RouteRequest(model=PULLED))] == ["tiny-chat"]

    # Removed elsewhere while the form was open: what was asked for, so no error.
    form = await open_step(hass, entry.entry_id, "add_model")
    result = await hass.config_entries.options.async_configure(form["flow_id"], {"source": SOURCE})
    assert (await finish_progress(hass, dict(result)))["reason"] == "model_added"
    form = await open_step(hass, entry.entry_id, "remove_model")
    await household.workers[entry.entry_id].client.remove_model(PULLED)
    result = await hass.config_entries.options.async_configure(form["flow_id"], {"model": PULLED})
    assert result["reason"] == "model_removed"
    assert household.workers[entry.entry_id].coordinator.info.chat_models == ["tiny-chat"]
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_a_worker_without_the_model_routes(hass: HomeAssistant, tmp_path: Path) -> None:
    """An older worker (the fake one: no catalog, pull or removal routes) and then no
    worker at all: the forms say so and change nothing."""
    async with FakeWorker(tmp_path / "fake") as worker:
        entry = MockConfigEntry(
            domain=DOMAIN, title="Old worker", unique_id=worker.node_id, data=worker.entry_data()
        )
        await setup_entry(hass, entry)
        add = await open_step(hass, entry.entry_id, "add_model")
        assert [str(key) for key in add["data_schema"].schema] == ["source"]  # no list
        result = await hass.config_entries.options.async_configure(
            add["flow_id"], {"source": SOURCE}
        )
        assert result["errors"] == {"base": "pull_refused"}
        assert result["description_placeholders"]["details"]
        remove = await open_step(hass, entry.entry_id, "remove_model")
        result = await hass.config_entries.options.async_configure(
            remove["flow_id"], {"model": "fake-chat"}
        )
        assert result["errors"] == {"base": "remove_refused"}
        assert worker.count("DELETE /v1/models/fake-chat") == 1

        await worker.stop()
        result = await hass.config_entries.options.async_configure(
            remove["flow_id"], {"model": "fake-chat"}
        )
        assert result["errors"] == {"base": "cannot_connect"}
        result = await hass.config_entries.options.async_configure(
            add["flow_id"], {"source": SOURCE}
        )
        assert result["errors"] == {"base": "cannot_connect"}
        for flow_id in (add["flow_id"], remove["flow_id"]):
            hass.config_entries.options.async_abort(flow_id)
        assert await hass.config_entries.async_unload(entry.entry_id)


async def test_no_model_to_remove(hass: HomeAssistant, hub: FakeHub, tmp_path: Path) -> None:
    """A worker serving nothing yet (the add-on's first start) has nothing to remove."""
    worker = start_worker([], tmp_path / "empty", env=hub_env(hub, tmp_path))
    try:
        entry = entry_for(worker, "Empty worker")
        await setup_entry(hass, entry)
        result = await open_step(hass, entry.entry_id, "remove_model")
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "no_models"
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await worker.astop()


async def test_a_token_without_admin_rights_may_not_change_models(
    hass: HomeAssistant, model_worker: WorkerProcess
) -> None:
    """A token made with `hearth-worker tokens create` (no --admin) gets a clear error."""
    model_worker.token, _ = AuthStore(model_worker.state_dir).create_token("just chat")
    entry = entry_for(model_worker)
    await setup_entry(hass, entry)
    form = await open_step(hass, entry.entry_id, "add_model")
    result = await hass.config_entries.options.async_configure(form["flow_id"], {"source": SOURCE})
    assert result["errors"] == {"base": "admin_required"}
    hass.config_entries.options.async_abort(result["flow_id"])
    form = await open_step(hass, entry.entry_id, "remove_model")
    result = await hass.config_entries.options.async_configure(
        form["flow_id"], {"model": "tiny-chat"}
    )
    assert result["errors"] == {"base": "admin_required"}
    hass.config_entries.options.async_abort(result["flow_id"])
    assert await hass.config_entries.async_unload(entry.entry_id)


def test_catalog_answer_parses() -> None:
    """The client reads the catalog as the worker serves it (fields of MODELS_API.md)."""
    entries = parse_catalog(
        {
            "data": [
                {
                    **entry.to_json(),
                    "fits": True,
                    "recommended": False,
                    "installed": False,
                }
                for entry in load_catalog()
            ]
        }
    )
    assert {e.source for e in entries} == {e.source for e in load_catalog()}
    assert all(e.disk_bytes > 0 and e.name for e in entries)
