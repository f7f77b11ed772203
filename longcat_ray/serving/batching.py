"""Batches formed when the model is free, not as requests arrive.

Serve's `@serve.batch` forms a batch as soon as `batch_wait_timeout_s` has passed after its first request and
queues it for the model, then starts forming the next; a batch never grows while it waits. With 8 requests at once
on an H200 (768², 40 steps, each edit ~5.6 s) it ran batches of 2 one after another
(`benchmarks/results/serve_load_batched_h200.log`); on the CPU, 8 concurrent 1024² uploads entered the replica over
0.9 s and ran as batches of 1-2. Here a request waits in `pending` while the model runs; when the model is free,
the oldest request's group (the requests that can share one denoising batch) is taken whole, up to
`max_batch_size`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any


class BatchQueue:
    """`await queue.submit(item)` -> item's result from `run(batch)` (a list of results in the batch's order, or
    an Exception for an item that failed), calling `run` for one batch at a time. Items of one `key(item)` share a
    batch; the oldest waiting item's key goes next. When the model is idle, a new item waits `wait_s` for company."""

    def __init__(self, run: Callable[[list], Awaitable[list]], key: Callable[[Any], Hashable], max_batch_size: int,
                 wait_s: float):
        self.run, self.key, self.max_batch_size, self.wait_s = run, key, max_batch_size, wait_s
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None  # running while anything is pending

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self.drain())
        return await future

    async def drain(self) -> None:
        """Batches until nothing is pending (it ends without yielding after its last check, so an item submitted
        later always finds it done and starts the next one)."""
        await asyncio.sleep(self.wait_s)  # the model was idle: let simultaneous arrivals join the first
        while self.pending:
            await self.run_one(self.take())

    def take(self) -> list[tuple[Any, asyncio.Future]]:
        """The oldest live item's group, up to max_batch_size, out of `pending` (cancelled items dropped)."""
        self.pending = [(item, future) for item, future in self.pending if not future.cancelled()]
        if not self.pending:
            return []
        group = self.key(self.pending[0][0])
        batch = [entry for entry in self.pending if self.key(entry[0]) == group][: self.max_batch_size]
        taken = {id(entry) for entry in batch}
        self.pending = [entry for entry in self.pending if id(entry) not in taken]
        return batch

    async def run_one(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        if not batch:
            return
        try:
            results = await self.run([item for item, _ in batch])
        except Exception as err:  # noqa: BLE001 - every waiting caller hears it
            results = [err] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
