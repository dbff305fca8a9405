"""A worker's failed pull (the add-on's hub ids at start, or the API's) is a repair in
Home Assistant, until that source's pull is done or gone.

The worker's side (``serve --pull``, /v1/info's ``pulls`` with a real no_space failure) is
tested with real processes in tests/worker/test_pull_at_start.py; here the fake worker
(tests/fake_worker.py) reports the pulls, in the shape openapi.yaml gives them (checked),
and the coordinator polls only when a test asks. One test runs the whole way with a real
worker started with ``--pull`` against the fake hub.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fake_worker import FakeWorker, check_schema
from fakehub import FakeHub
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.translation import async_get_translations
from pytest_homeassistant_custom_component.common import MockConfigEntry
from worker_process import start_worker, tls_closed

from custom_components.hearth.const import DOMAIN
from custom_components.hearth.coordinator import pull_issue_id

from .conftest import entry_for, restart, setup_entry, setup_fake_entry

SOURCE = "microsoft/Phi-4-mini-instruct-onnx:cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
OTHER = "BAAI/bge-small-en-v1.5:onnx"
INFO = "GET /v1/info"


@pytest.fixture(autouse=True)
def polls_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("custom_components.hearth.coordinator.SCAN_INTERVAL", timedelta(hours=1))


def job(source: str, status: str, code: str | None = None, message: str = "") -> dict[str, Any]:
    pulled = {"running": 1_000, "done": 4_000, "failed": 0}.get(status, 0)
    return {
        "source": source,
        "status": status,
        "phase": {"done": "done", "failed": "resolving"}.get(status, "downloading"),
        "done_bytes": pulled,
        "total_bytes": 4_000 if status != "failed" else 0,
        "error": {"code": code, "message": message} if code else None,
    }


NO_SPACE = job(
    SOURCE,
    "failed",
    "no_space",
    f"{SOURCE} needs 4.9 GB more disk space and the models folder has 1.2 GB free",
)


async def poll(hass: HomeAssistant, entry: MockConfigEntry) -> None:
    await entry.runtime_data.coordinator.async_refresh()
    await hass.async_block_till_done()


def pull_issues(hass: HomeAssistant) -> dict[str, ir.IssueEntry]:
    return {
        issue_id: issue
        for (domain, issue_id), issue in ir.async_get(hass).issues.items()
        if domain == DOMAIN and issue_id.startswith("pull_failed_") and issue.active
    }


async def rendered(hass: HomeAssistant, issue: ir.IssueEntry) -> str:
    """The issue's description as Home Assistant shows it in English."""
    strings = await async_get_translations(hass, "en", "issues", [DOMAIN])
    text = strings[f"component.{DOMAIN}.issues.{issue.translation_key}.description"]
    assert issue.translation_placeholders is not None
    return text.format(**issue.translation_placeholders)


async def test_no_space_is_a_repair_until_the_pull_is_done(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    fake.pulls = [job(SOURCE, "running")]
    entry = await setup_fake_entry(hass, fake, "Kitchen worker")
    assert pull_issues(hass) == {}

    # The start-up pull fails for want of space: a repair naming the worker, the
    # source and the sizes. Read while it ran, so this poll sees it.
    fake.pulls = [NO_SPACE]
    check_schema({**fake.info_json()}, "Info")
    await poll(hass, entry)
    issue_id = pull_issue_id(entry.entry_id, SOURCE)
    assert list(pull_issues(hass)) == [issue_id]
    issue = pull_issues(hass)[issue_id]
    assert issue.translation_key == "pull_no_space"
    assert issue.severity == ir.IssueSeverity.ERROR
    assert not issue.is_fixable
    assert issue.translation_placeholders == {
        "name": "Kitchen worker",
        "source": SOURCE,
        "needed": "4.9 GB",
        "free": "1.2 GB",
    }
    text = await rendered(hass, issue)
    assert "Kitchen worker" in text and SOURCE in text
    assert "needs 4.9 GB more disk space and has 1.2 GB free" in text

    # Still failed at the next poll: one issue, the same.
    await poll(hass, entry)
    assert list(pull_issues(hass)) == [issue_id]

    # Pulled again (space freed) and done: the source's latest job wins, the repair goes.
    fake.pulls = [NO_SPACE, job(SOURCE, "running")]
    await poll(hass, entry)
    assert list(pull_issues(hass)) == [issue_id], "a retry still running keeps it"
    fake.pulls = [NO_SPACE, job(SOURCE, "done")]
    check_schema({**fake.info_json()}, "Info")
    await poll(hass, entry)
    assert pull_issues(hass) == {}


async def test_other_failures_are_one_generic_repair_each_until_gone(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    fake.pulls = [
        job(OTHER, "failed", "network", f"{OTHER}: the connection to the hub was lost"),
        NO_SPACE,
        job("acme/cancelled", "cancelled", "cancelled", "cancelled"),
    ]
    entry = await setup_fake_entry(hass, fake, "Kitchen worker")
    await poll(hass, entry)
    issues = pull_issues(hass)
    assert set(issues) == {
        pull_issue_id(entry.entry_id, OTHER),
        pull_issue_id(entry.entry_id, SOURCE),
    }, "a cancelled pull is no repair"
    generic = issues[pull_issue_id(entry.entry_id, OTHER)]
    assert generic.translation_key == "pull_failed"
    assert generic.severity == ir.IssueSeverity.WARNING
    assert generic.translation_placeholders == {
        "name": "Kitchen worker",
        "source": OTHER,
        "error": f"{OTHER}: the connection to the hub was lost",
        "code": "network",
    }
    text = await rendered(hass, generic)
    assert "the connection to the hub was lost (network)" in text

    # The worker restarted: its jobs are gone, and so are the repairs.
    fake.pulls = []
    await poll(hass, entry)
    assert pull_issues(hass) == {}

    # Unloading the entry takes an open one with it.
    fake.pulls = [NO_SPACE]
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    await poll(hass, entry)
    assert list(pull_issues(hass)) == [pull_issue_id(entry.entry_id, SOURCE)]
    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    assert pull_issues(hass) == {}


async def test_info_is_read_again_only_while_pulls_need_it(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    entry = await setup_fake_entry(hass, fake, "Kitchen worker")
    reads = fake.requests.count(INFO)
    await poll(hass, entry)
    await poll(hass, entry)
    assert fake.requests.count(INFO) == reads, "nothing pulls: the capacity poll only"

    # A pull through the API (or a model added): read until it is over.
    fake.pulls = [job(OTHER, "running")]
    await entry.runtime_data.coordinator.async_refresh_models()
    await hass.async_block_till_done()
    reads = fake.requests.count(INFO)
    await poll(hass, entry)
    assert fake.requests.count(INFO) == reads + 1
    fake.pulls = [job(OTHER, "done")]
    await poll(hass, entry)
    reads = fake.requests.count(INFO)
    await poll(hass, entry)
    assert fake.requests.count(INFO) == reads
    assert pull_issues(hass) == {}


# -- the whole way: a real worker whose start-up pull finds too little disk space ------

HUGE_REPO = "acme/Huge-chat-onnx"
HUGE = f"{HUGE_REPO}:cpu_and_mobile/cpu-fp32-rtn"


@pytest.fixture
def hub(tiny_chat_model: Path) -> Iterator[FakeHub]:
    """The tiny model as a repository whose biggest file the hub says is 1 PiB."""
    with FakeHub() as fake:
        repo = fake.add_repo(HUGE_REPO, {"cpu_and_mobile/cpu-fp32-rtn": tiny_chat_model})
        max(repo.files.values(), key=lambda f: f.size).size = 1 << 50
        yield fake


async def test_a_real_workers_start_up_pull_without_space_is_a_repair(
    hass: HomeAssistant, hub: FakeHub, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        [tiny_chat_model],
        tmp_path / "worker",
        extra=["--no-warmup", "--pull", HUGE],
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")},
    )
    try:
        entry = entry_for(worker, "Attic worker")
        await setup_entry(hass, entry)
        issue_id = pull_issue_id(entry.entry_id, HUGE)
        deadline = time.monotonic() + 60
        while issue_id not in pull_issues(hass):  # the pull may still be resolving
            assert time.monotonic() < deadline, worker.log()
            await asyncio.sleep(0.1)
            await poll(hass, entry)
        issue = pull_issues(hass)[issue_id]
        assert issue.translation_key == "pull_no_space"
        placeholders = issue.translation_placeholders
        assert placeholders is not None
        assert placeholders["name"] == "Attic worker" and placeholders["source"] == HUGE
        assert placeholders["needed"].endswith(" GB")
        assert float(placeholders["needed"].removesuffix(" GB")) > 1e6
        assert placeholders["free"].endswith(("GB", "MB", "kB", "bytes"))
        assert str(worker.state_dir) not in await rendered(hass, issue)
        # The worker serves what it has meanwhile.
        assert entry.runtime_data.coordinator.info.chat_models != []

        # Restarted without that pull (the add-on's option changed): the repair goes.
        await hass.async_add_executor_job(functools.partial(restart, worker, drop="--pull"))
        await poll(hass, entry)
        assert pull_issues(hass) == {}
        assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()
    finally:
        worker.stop()
    await tls_closed()
