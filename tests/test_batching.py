"""MicroBatcher: concurrent requests share embedder calls, each gets its own rows back."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from facegate.server.batching import MicroBatcher, plan_batch


def test_plan_batch_fills_up_to_the_limit_and_never_starves_a_big_request():
    assert plan_batch([1, 1, 1], 2) == 2
    assert plan_batch([2, 3, 1], 5) == 2
    assert plan_batch([40, 1], 32) == 1  # larger than a batch: runs alone
    assert plan_batch([1, 40], 32) == 1
    assert plan_batch([], 8) == 0


class RecordingEmbedder:
    """Row i of the result encodes crop i's fill value, so routing mistakes show."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        self.calls.append(len(crops))
        self.threads.add(threading.current_thread().name)
        if self.delay:
            threading.Event().wait(self.delay)
        values = crops[:, 0, 0, 0].astype(np.float32)
        return np.stack([values, -values], axis=1)


def crops_of(*values: int) -> np.ndarray:
    return np.stack([np.full((112, 112, 3), v, np.uint8) for v in values])


async def run_concurrently(batcher: MicroBatcher, requests: list[np.ndarray]) -> list[np.ndarray]:
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.embed(r) for r in requests))
    finally:
        await batcher.stop()


def test_concurrent_requests_are_batched_and_routed_back():
    embedder = RecordingEmbedder(delay=0.02)
    sizes: list[int] = []
    batcher = MicroBatcher(embedder, max_batch=8, max_wait_ms=20, on_batch=sizes.append)
    requests = [crops_of(i) for i in range(10)] + [crops_of(100, 101, 102)]
    results = asyncio.run(run_concurrently(batcher, requests))
    for request, result in zip(requests, results, strict=True):
        assert result.shape == (len(request), 2)
        np.testing.assert_array_equal(result[:, 0], request[:, 0, 0, 0])
    assert sum(embedder.calls) == 13
    assert len(embedder.calls) < len(requests)  # shared calls, not one per request
    assert max(embedder.calls) <= 8
    assert sizes == embedder.calls
    assert all(name.startswith("embedder") for name in embedder.threads)  # off the event loop


def test_disabled_batching_calls_once_per_request():
    embedder = RecordingEmbedder()
    batcher = MicroBatcher(embedder, max_batch=8, max_wait_ms=20, enabled=False)
    results = asyncio.run(run_concurrently(batcher, [crops_of(i) for i in range(5)]))
    assert embedder.calls == [1] * 5
    assert [r[0, 0] for r in results] == [0, 1, 2, 3, 4]


def test_a_lone_request_waits_at_most_max_wait():
    embedder = RecordingEmbedder()
    batcher = MicroBatcher(embedder, max_batch=64, max_wait_ms=5)

    async def timed() -> float:
        await batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.embed(crops_of(7))
        elapsed = loop.time() - start
        await batcher.stop()
        return elapsed

    assert asyncio.run(timed()) < 0.5
    assert embedder.calls == [1]


def test_embedder_failure_reaches_every_waiter_of_the_batch_and_the_next_batch_works():
    failures = {"left": 1}

    def flaky(crops: np.ndarray) -> np.ndarray:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("runtime fell over")
        return np.ones((len(crops), 4), np.float32)

    batcher = MicroBatcher(flaky, max_batch=8, max_wait_ms=20)

    async def scenario() -> tuple[list, np.ndarray]:
        await batcher.start()
        first = await asyncio.gather(
            *(batcher.embed(crops_of(i)) for i in range(3)), return_exceptions=True
        )
        second = await batcher.embed(crops_of(9))
        await batcher.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert second.shape == (1, 4)


def test_empty_request_is_refused():
    batcher = MicroBatcher(RecordingEmbedder())
    with pytest.raises(ValueError):
        asyncio.run(batcher.embed(np.zeros((0, 112, 112, 3), np.uint8)))
