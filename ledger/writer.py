"""The group-commit writer: concurrent ledger operations share one transaction.

Callers submit an operation (an async function of a ``Tx``) and wait for its
result. A single flusher drains everything queued since the last commit into
one batch, runs it in one transaction and wakes each caller with its own
result only after the commit. Under load the batch grows by itself, so the
number of commits (and fsyncs) per call falls as traffic rises; when idle, a
lone call is committed at once, with no added wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from ledger.db import Op, Store


class BatchObserver(Protocol):
    def __call__(self, size: int, seconds: float, queue_depth: int) -> None: ...


class WriterOverloaded(Exception):
    """The write queue is full: the database is not keeping up; retry shortly."""


class GroupCommitWriter:
    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 512,
        observer: BatchObserver | None = None,
        concurrency: int = 1,
        max_queue: int = 0,
    ):
        self.store = store
        self.max_batch = max_batch
        self.observer = observer
        # With a server database, a batch spends most of its time waiting on
        # round trips; several flushers keep several batches in flight. SQLite
        # has one writer anyway, so one flusher.
        self.concurrency = max(1, concurrency)
        self._queue: list[tuple[Op, asyncio.Future[Any]]] = []
        # Past this many waiting operations a new one is refused at once (the caller
        # answers 503) instead of queueing without bound behind a slow database.
        self.max_queue = max_queue or 20 * max_batch
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._run(), name=f"ledger-writer-{i}")
                for i in range(self.concurrency)
            ]

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            await t

    async def submit(self, op: Op) -> Any:
        """Run ``op`` in the next batch; raises what the op raised."""
        if self._closing:
            raise RuntimeError("ledger writer is closed")
        if len(self._queue) >= self.max_queue:
            raise WriterOverloaded(f"{len(self._queue)} ledger operations already waiting")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        self._wakeup.set()
        # Shielded: a caller that is cancelled (client gone) must not cancel
        # the commit of work other callers share; its op still commits.
        result = await asyncio.shield(fut)
        if isinstance(result, BaseException):
            raise result
        return result

    def submit_nowait(self, op: Op) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        self._wakeup.set()
        return fut

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # One turn of the loop first: requests that are ready to submit get
            # into this batch instead of waiting for the next commit.
            await asyncio.sleep(0)
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            if not batch:  # another flusher took it during that turn
                continue
            started = time.perf_counter()
            try:
                results = await self.store.run_batch([op for op, _ in batch])
            except BaseException as exc:  # store down: every caller in the batch learns it
                results = [exc] * len(batch)
                if isinstance(exc, asyncio.CancelledError):
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(RuntimeError("ledger writer cancelled"))
                    raise
            elapsed = time.perf_counter() - started
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
            if self.observer is not None:
                self.observer(len(batch), elapsed, len(self._queue))


Observer = Callable[[int, float, int], None]
