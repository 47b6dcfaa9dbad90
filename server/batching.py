"""Micro-batching: concurrent requests share one embedder call.

A CPU or GPU embedder is much cheaper per crop on a batch of 16 than on 16 batches
of 1. The :class:`MicroBatcher` queues crops from concurrent requests, waits at most
``max_wait_ms`` for company (or until ``max_batch`` crops are queued), runs one
embedder call in its own worker thread, and hands each request its rows back. While
that call runs, new requests queue up, so under load batches grow by themselves; the
server's default wait is 0 (docs/server.md says what a wait cost), so an idle server
adds no latency.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

EmbedFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Pending:
    crops: np.ndarray
    future: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.perf_counter)


def plan_batch(sizes: list[int], max_batch: int) -> int:
    """How many of the queued requests (with these crop counts) go into the next batch.

    Always at least one, so a request larger than ``max_batch`` still runs (alone).
    """
    taken, total = 0, 0
    for size in sizes:
        if taken and total + size > max_batch:
            break
        taken += 1
        total += size
    return taken


class MicroBatcher:
    """Feed one embedder, from one worker thread, with batches gathered across requests.

    ``on_batch(size)`` is called after every embedder call (the metrics histogram).
    With ``enabled=False`` every request calls the embedder on its own, still off the
    event loop, which is the baseline the batching is measured against.
    """

    def __init__(
        self,
        embed: EmbedFn,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        enabled: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._embed = embed
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        self._queue: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("embedder stopped"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) of ``crops`` (N, 112, 112, 3), computed in some batch."""
        if len(crops) == 0:
            raise ValueError("no crops to embed")
        loop = asyncio.get_running_loop()
        if not self.enabled or self._task is None:
            result = await loop.run_in_executor(self._executor, self._embed, crops)
            self._report(len(crops))
            return result
        pending = _Pending(crops, loop.create_future())
        self._queue.append(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        return await pending.future

    def _report(self, size: int) -> None:
        if self._on_batch is not None:
            self._on_batch(size)

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company until the batch is full or the oldest request waited enough.
            deadline = self._queue[0].queued_at + self.max_wait
            while sum(len(p.crops) for p in self._queue) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            count = plan_batch([len(p.crops) for p in self._queue], self.max_batch)
            batch, self._queue = self._queue[:count], self._queue[count:]
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            crops = np.concatenate([p.crops for p in batch])
            try:
                embeddings = await loop.run_in_executor(self._executor, self._embed, crops)
            except Exception as exc:  # every waiter of this batch gets the failure
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self._report(len(crops))
            start = 0
            for p in batch:
                end = start + len(p.crops)
                if not p.future.done():
                    p.future.set_result(embeddings[start:end])
                start = end
