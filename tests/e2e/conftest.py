"""The stack scripts/develop starts (scripts/develop.py), on free ports, per test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from worker_process import free_port

from scripts import develop


@pytest.fixture(autouse=True)
def _sockets(socket_enabled: None) -> None:
    """These tests talk to real Home Assistant and worker processes on 127.0.0.1."""


def family(pid: int) -> list[psutil.Process]:
    """A process and its descendants now (none if it is gone)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    return []


@contextlib.contextmanager
def running(models: list[Path], tmp_path: Path) -> Iterator[develop.Stack]:
    """develop.running() on free ports; after it, no process it started is left (the
    worker's Piper processes included)."""
    with develop.running(
        tmp_path / "develop",
        models,
        http_port=free_port(),
        worker_port=free_port(),
    ) as started:
        processes: dict[str, list[psutil.Process]] = {
            name: family(p.pid) for name, p in started.processes.items()
        }
        yield started
        for name, p in started.processes.items():  # and those started since (Piper's)
            processes[name] = [*processes.get(name, []), *family(p.pid)]
    for name, group in processes.items():
        left = [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"{name} left processes behind: {left}"
    assert all(p.poll() is not None for p in started.processes.values())


@pytest.fixture
def stack(taught_chat_model: Path, tmp_path: Path) -> Iterator[develop.Stack]:
    """A real Home Assistant and worker, as scripts/develop runs them; all stopped after."""
    with running([taught_chat_model], tmp_path) as started:
        yield started


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
