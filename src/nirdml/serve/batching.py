"""``QueryBatcher``: runs the jobs of concurrent requests as one batch (one forward pass, one
index search).

Each request hands its job (for ``nirdml serve``: a decoded image, its ``k`` and re-ranking) to
:meth:`QueryBatcher.submit` and awaits its result. One worker task takes the first waiting job
and everything already queued, then keeps collecting until ``max_batch`` jobs, ``max_wait_s``,
or a quarter of ``max_wait_s`` without a new job (the burst is over: a batch does not wait for
clients that are not there), and hands them all to ``handle_batch`` in the server's single
model thread (``executor``), so throughput grows with load. The wait applies under load only
(the previous batch held more than one job): at low load a request runs at once.
``handle_batch`` returns one result per job; a result that is an exception is raised to that
job's request only. ``max_batch = 1`` runs one job at a time (the benchmark's peer).
Written by hand: the few lines of asyncio this takes are smaller than any dependency that
offers it (e.g. a model server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any


class QueryBatcher:
    """Micro-batching of concurrent requests' jobs (module docstring)."""

    def __init__(self, handle_batch: Callable[[Sequence[Any]], Sequence[Any]],
                 executor: Executor, max_batch: int = 32, max_wait_s: float = 0.02):
        self.handle_batch, self.executor = handle_batch, executor
        self.max_batch, self.max_wait_s = max(1, int(max_batch)), float(max_wait_s)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0  # batches run (for /healthz and the benchmark)

    async def submit(self, job: Any) -> Any:
        """The result of ``job``, computed in a batch with the others waiting."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._work())
        done = asyncio.get_running_loop().create_future()
        await self._queue.put((job, done))
        return await done

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        last = 1  # jobs in the previous batch
        while True:
            batch = [await self._queue.get()]
            # under load (the previous batch had company) wait for the batch to fill; a lone
            # request at low load runs at once with whatever is already queued
            deadline = loop.time() + (self.max_wait_s if last > 1 else 0.0)
            while len(batch) < self.max_batch:
                if not self._queue.empty():  # what is already queued joins without waiting
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:  # a quarter of the wait without a new job: the burst is over
                    batch.append(await asyncio.wait_for(self._queue.get(),
                                                        min(left, self.max_wait_s / 4)))
                except TimeoutError:
                    break
            jobs, last = [job for job, _ in batch], len(batch)
            try:
                results = await loop.run_in_executor(self.executor, self.handle_batch, jobs)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            self.batches += 1
            for result, (_, done) in zip(results, batch, strict=True):
                if done.done():
                    continue
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()


__all__ = ["QueryBatcher"]
