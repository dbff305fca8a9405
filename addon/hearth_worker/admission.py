"""Admission control: a limit on concurrent generations and a bounded queue.

Beyond the queue a request is refused at once (the server answers 429 with
Retry-After) instead of waiting without bound. A slot is held until the work
in it has really stopped: a request whose client goes away keeps its slot until
its generation thread (or executor job) ends, so dropped requests cannot run
more work at once than ``max_running``; see ``run_to_end``.

``max_running`` is also the decode batch's size: a running generation holds at
most one slot of its model's batch (batch_decode.py), so at most ``max_running``
requests share a forward pass.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

_T = TypeVar("_T")


async def run_to_end(work: Awaitable[_T]) -> _T:  # noqa: UP047 - runs on Python 3.11
    """Await ``work`` until it has finished, even if the caller is cancelled meanwhile.

    For work that cannot be interrupted (a thread, an executor job): the caller
    (and the admission slot it holds) waits until the work has really ended, then
    the cancellation is raised.
    """
    future = asyncio.ensure_future(work)
    interrupted = False
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        if not future.cancelled():
            future.exception()  # retrieved: nobody is left to hear of it
        raise asyncio.CancelledError
    return future.result()


class Busy(Exception):
    """The queue is full; `retry_after` is an estimate in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"busy, retry after {retry_after} s")
        self.retry_after = retry_after


class Admission:
    def __init__(self, max_running: int, max_queued: int) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.running = 0
        self.queued = 0
        self._free = asyncio.Condition()
        self._mean_duration_s = 2.0

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue drained at the mean rate."""
        waits = (self.queued + 1) * self._mean_duration_s / self.max_running
        return max(1, math.ceil(waits))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.running >= self.max_running:
            if self.queued >= self.max_queued:
                raise Busy(self.retry_after())
            self.queued += 1
            try:
                async with self._free:
                    await self._free.wait_for(lambda: self.running < self.max_running)
                    self.running += 1
            finally:
                self.queued -= 1
        else:
            self.running += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            yield
        finally:
            self.running -= 1
            self._mean_duration_s = 0.8 * self._mean_duration_s + 0.2 * (loop.time() - started)
            async with self._free:
                self._free.notify_all()
