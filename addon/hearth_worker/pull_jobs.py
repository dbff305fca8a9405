"""Pulls started through the API (``POST /v1/models/pull``): jobs kept in memory.

Each job runs ``pull.pull_model`` in a thread of its own pool, with a
``threading.Event`` to cancel it and a progress callback that updates the job;
then the model is loaded into the registry (phase ``loading``) and served at once.
A Piper voice (kind ``tts``) is not the registry's: the speech host serves every voice
in the models directory, so it is served as soon as its folder is there.
A second pull of a source being pulled returns the running job. Jobs are lost when
the worker stops (a pull started again resumes what was downloaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pull, voices
from .manifest import MANIFEST_NAME, Manifest, ManifestError
from .registry import DuplicateModel, ModelRegistry

_LOGGER = logging.getLogger(__name__)

MAX_FINISHED_JOBS = 50  # finished jobs kept for GET, the oldest forgotten first
PARALLEL_PULLS = 2  # more wait (phase "queued") for a free thread
LOG_EVERY_S = 30.0  # a download's progress is logged every 10 % or this often


@dataclass
class PullJob:
    id: str
    source: str  # normalized: owner/name[:sub/folder]
    name: str | None
    status: str = "running"  # running | done | failed | cancelled
    phase: str = "queued"  # queued, then pull's phases, "loading", "done"
    done_bytes: int = 0
    total_bytes: int = 0
    manifest: Manifest | None = None
    voice: voices.Voice | None = None  # a Piper voice pulled (listed as /v1/models lists it)
    error: dict[str, str] | None = None
    started_at: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)
    clock: Callable[[], float] = time.monotonic  # progress log lines (tests inject one)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _logged_tenth: int = -1  # the last 10 % step logged while downloading
    _logged_at: float = 0.0

    @property
    def running(self) -> bool:
        return self.status == "running"

    def progress(self, report: pull.PullProgress) -> None:
        """pull_model's callback (from the pull's thread)."""
        with self._lock:
            self.phase = report.phase if report.phase != "done" else "loading"
            self.total_bytes = report.total_bytes
            self.done_bytes = report.done_bytes
            if report.phase == "downloading" and report.total_bytes > 0:
                self._log_download(report)

    def _log_download(self, report: pull.PullProgress) -> None:
        """A log line when the download starts, then every 10 % or LOG_EVERY_S seconds."""
        now = self.clock()
        tenth = min(10, report.done_bytes * 10 // report.total_bytes)
        if self._logged_tenth < 0:
            _LOGGER.info(
                "Pulling %s: downloading %s (%s here already)",
                self.source,
                _size(report.total_bytes),
                _size(report.done_bytes),
            )
        elif tenth > self._logged_tenth or now - self._logged_at >= LOG_EVERY_S:
            _LOGGER.info(
                "Pulling %s: %d %% (%s of %s)",
                self.source,
                report.done_bytes * 100 // report.total_bytes,
                _size(report.done_bytes),
                _size(report.total_bytes),
            )
        else:
            return
        self._logged_tenth = tenth
        self._logged_at = now

    def loading(self) -> None:
        with self._lock:
            self.phase = "loading"

    def succeed(self, manifest: Manifest, voice: voices.Voice | None = None) -> None:
        with self._lock:
            self.manifest = manifest
            self.voice = voice
            self.phase = "done"
            self.status = "done"

    def fail(self, code: str, message: str) -> None:
        with self._lock:
            self.status = "cancelled" if code == "cancelled" else "failed"
            self.error = {"code": code, "message": message}

    def to_json(self, describe: Callable[[Manifest], dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            model = None
            if self.voice is not None:  # as /v1/models lists a voice
                model = self.voice.model_json()
            elif self.manifest is not None:
                model = describe(self.manifest)
            return {
                "id": self.id,
                "source": self.source,
                "status": self.status,
                "phase": self.phase,
                "done_bytes": self.done_bytes,
                "total_bytes": self.total_bytes,
                "model": model,
                "error": dict(self.error) if self.error else None,
            }

    def summary(self, models_dir: Path | None) -> dict[str, Any]:
        """The job as /v1/info tells it to any token: no id, no model, no local path."""
        with self._lock:
            error = None
            if self.error:
                message = self.error["message"]
                if models_dir is not None:
                    message = message.replace(str(models_dir), "the models folder")
                error = {"code": self.error["code"], "message": message}
            return {
                "source": self.source,
                "status": self.status,
                "phase": self.phase,
                "done_bytes": self.done_bytes,
                "total_bytes": self.total_bytes,
                "error": error,
            }


class PullJobs:
    """The pull jobs of one worker."""

    def __init__(self, registry: ModelRegistry, *, endpoint: str | None = None) -> None:
        self._registry = registry
        self._endpoint = endpoint  # None: huggingface_hub's (HF_ENDPOINT in the environment)
        self._jobs: dict[str, PullJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def models_dir(self) -> Path | None:
        return self._registry.models_dir

    def get(self, job_id: str) -> PullJob | None:
        return self._jobs.get(job_id)

    def start(self, source: str, name: str | None = None) -> tuple[PullJob, bool]:
        """Start pulling ``source`` (ValueError when malformed); returns the job and
        whether it is new (False: that source was being pulled already)."""
        normalized = str(pull.parse_source(source))
        for job in self._jobs.values():
            if job.running and job.source == normalized:
                return job, False
        if self.models_dir is None:
            raise RuntimeError("this worker has no models directory")
        job = PullJob(id=f"pull_{secrets.token_hex(8)}", source=normalized, name=name)
        self._jobs[job.id] = job
        self._forget_old()
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"pull {normalized}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        _LOGGER.info("Pulling %s (job %s)", normalized, job.id)
        return job, True

    def summaries(self) -> list[dict[str, Any]]:
        """Every job kept (running and finished, oldest first), as /v1/info shows them."""
        return [job.summary(self.models_dir) for job in list(self._jobs.values())]

    def pull_missing(self, sources: Iterable[str]) -> list[PullJob]:
        """``serve --pull``: start a job for each source not installed in the models dir.

        An installed source is just served; a malformed one is logged and skipped.
        Call it once the worker serves, so the pulls run beside what it has."""
        if self.models_dir is None:
            raise RuntimeError("this worker has no models directory")
        jobs: list[PullJob] = []
        for source in sources:
            try:
                hub = pull.parse_source(source)
            except ValueError as err:
                _LOGGER.error("Not pulling %s: %s", source, err)
                continue
            if (self.models_dir / hub.folder_name / MANIFEST_NAME).is_file():
                _LOGGER.info("%s is installed (%s): serving it", hub, hub.folder_name)
                continue
            job, _ = self.start(str(hub))
            jobs.append(job)
        return jobs

    def cancel(self, job_id: str) -> PullJob | None:
        """Ask a job to stop; a job already loading its model finishes."""
        job = self._jobs.get(job_id)
        if job is not None and job.running:
            job.cancel.set()
        return job

    async def close(self) -> None:
        """Cancel the running pulls and wait until their threads have stopped."""
        for job in self._jobs.values():
            job.cancel.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _forget_old(self) -> None:
        finished = [job for job in self._jobs.values() if not job.running]
        for job in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[job.id]

    def _delete(self, folder: Path) -> None:
        """Delete a pulled folder that is not served (out of sight first, as pull does)."""
        assert self.models_dir is not None
        with contextlib.suppress(KeyError, OSError):
            pull.remove_model(self.models_dir, folder.name)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(PARALLEL_PULLS, thread_name_prefix="pull")
        return self._executor

    async def _run(self, job: PullJob) -> None:
        assert self.models_dir is not None
        loop = asyncio.get_running_loop()
        try:
            folder = await loop.run_in_executor(
                self._pool(),
                functools.partial(
                    pull.pull_model,
                    job.source,
                    self.models_dir,
                    name=job.name,
                    progress=job.progress,
                    cancel=job.cancel,
                    endpoint=self._endpoint,
                ),
            )
        except pull.PullError as err:
            _LOGGER.warning("Pulling %s failed: %s (%s)", job.source, err.message, err.code)
            job.fail(err.code, err.message)
            return
        except Exception as err:
            _LOGGER.exception("Pulling %s failed unexpectedly", job.source)
            job.fail("internal_error", f"Pulling {job.source} failed: {err}")
            return
        job.loading()
        await self._serve(job, folder)

    async def _serve(self, job: PullJob, folder: Path) -> None:
        """Load the pulled model (unless it is served already) and finish the job."""
        loop = asyncio.get_running_loop()
        try:
            manifest = await loop.run_in_executor(None, pull.read_model, folder)
        except ManifestError as err:
            job.fail("not_a_model", f"{job.source}: {err}")
            return
        if manifest.kind == voices.KIND:  # the speech host finds it in the models directory
            voice = await loop.run_in_executor(None, voices.read_voice, folder)
            if voice is None:
                job.fail("not_a_model", f"{job.source}: not a usable Piper voice")
                return
            job.succeed(manifest, voice)
            _LOGGER.info("Pulled %s: serving the voice %s (job %s)", job.source, voice.name, job.id)
            return
        served = self._registry.manifests.get(manifest.name)
        if served is None or served.path != folder:  # both are models_dir / folder name
            try:
                manifest = await self._registry.add_model(folder)
            except DuplicateModel as err:
                # Pulled, but its name is taken by a model served from elsewhere (--model).
                await loop.run_in_executor(None, self._delete, folder)
                job.fail("name_taken", f"{err} (pull it again with another name)")
                return
            except Exception as err:
                _LOGGER.warning("Pulled %s but could not load it: %s", job.source, err)
                await loop.run_in_executor(None, self._delete, folder)
                job.fail(
                    "load_failed",
                    f"{job.source} was downloaded but could not be loaded, so it was "
                    f"deleted again: {_first_line(err)}",
                )
                return
        job.succeed(manifest)
        _LOGGER.info(
            "Pulled %s (%s): serving %s (job %s)",
            job.source,
            _size(manifest.size_bytes or job.total_bytes),
            manifest.name,
            job.id,
        )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
