"""Fixtures shared by all tests: models built locally, real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import model_fixtures
import pytest
from worker_process import WorkerProcess, start_worker


@pytest.fixture(scope="session")
def tiny_chat_model() -> Path:
    """A tiny random chat model, exported with scripts/export_model."""
    return model_fixtures.tiny_chat_model()


@pytest.fixture(scope="session")
def embedding_model() -> Path:
    """The real all-MiniLM-L6-v2, exported with scripts/export_model."""
    return model_fixtures.embedding_model()


@pytest.fixture(scope="session")
def shared_worker(
    tiny_chat_model: Path, embedding_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One real worker serving both models, with a token, for read-mostly tests."""
    worker = start_worker(
        [tiny_chat_model, embedding_model], tmp_path_factory.mktemp("shared-worker")
    )
    yield worker
    assert worker.stop() == 0, worker.log()


@pytest.fixture(scope="session")
def taught_chat_model() -> Path:
    """A tiny model trained to call HassTurnOn for "turn on the kitchen light"."""
    return model_fixtures.taught_chat_model()
