"""``QueryBatcher``: embeds the images of concurrent requests in one forward pass.

Each request hands its decoded image to :meth:`QueryBatcher.embed` and awaits its embedding.
One worker task takes the first waiting image, then keeps collecting until ``max_batch``
images or ``max_wait_s`` have passed, and runs the model once on all of them in the server's
single model thread (``executor``), so throughput grows with load while a lone request waits at
most ``max_wait_s`` extra. ``max_batch = 1`` embeds one image at a time (the benchmark's peer).
Written by hand: the few lines of asyncio this takes are smaller than any dependency that
offers it (e.g. a model server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np


class QueryBatcher:
    """Micro-batching of single-image embedding requests (module docstring)."""

    def __init__(self, embed_batch: Callable[[Sequence[Any]], np.ndarray], executor: Executor,
                 max_batch: int = 32, max_wait_s: float = 0.005):
        self.embed_batch, self.executor = embed_batch, executor
        self.max_batch, self.max_wait_s = max(1, int(max_batch)), float(max_wait_s)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0  # forward passes run (for /healthz and the benchmark)

    async def embed(self, image: Any) -> np.ndarray:
        """The embedding of one image, computed in a batch with the others waiting."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._work())
        done = asyncio.get_running_loop().create_future()
        await self._queue.put((image, done))
        return await done

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(left, 0)))
                except TimeoutError:
                    break
            images = [image for image, _ in batch]
            try:
                emb = await loop.run_in_executor(self.executor, self.embed_batch, images)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            self.batches += 1
            for row, (_, done) in zip(emb, batch):
                if not done.done():
                    done.set_result(row)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()


__all__ = ["QueryBatcher"]
