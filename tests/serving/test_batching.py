"""BatchQueue: batches form when the model is free, one group at a time, oldest first. The model is a coroutine
held on an event, so what arrives while it runs is decided by the test, not by timing."""

import asyncio

import pytest

from longcat_ray.serving.batching import BatchQueue


class Model:
    """run(batch): records the batch; the first one waits until `free` is set."""

    def __init__(self, fail_on=None):
        self.batches, self.busy, self.free, self.fail_on = [], asyncio.Event(), asyncio.Event(), fail_on

    async def run(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.busy.set()
            await self.free.wait()
        if self.fail_on in items:
            raise RuntimeError("CUDA error: out of memory")
        return [item * 10 if isinstance(item, int) else item for item in items]


async def waiting(queue, count):
    while len(queue.pending) < count:
        await asyncio.sleep(0)


def test_requests_arriving_while_the_model_runs_share_the_next_batch():
    async def scenario():
        model = Model()
        queue = BatchQueue(model.run, key=lambda item: item % 2, max_batch_size=3, wait_s=0)
        first = asyncio.create_task(queue.submit(0))
        await model.busy.wait()  # 0 runs alone (the model was idle); the rest arrive meanwhile
        rest = [asyncio.create_task(queue.submit(item)) for item in [2, 1, 4, 6, 8, 3]]
        await waiting(queue, 6)
        model.free.set()
        return [await first] + [await task for task in rest], model.batches

    results, batches = asyncio.run(scenario())
    assert results == [0, 20, 10, 40, 60, 80, 30]
    # the oldest waiting request's group (2's), whole up to 3; then 1's group with 3, which came after 8; then 8
    assert batches == [[0], [2, 4, 6], [1, 3], [8]]


def test_a_failing_batch_fails_its_callers_and_the_queue_goes_on():
    async def scenario():
        model = Model(fail_on=5)
        model.free.set()
        queue = BatchQueue(model.run, key=lambda item: item == 5, max_batch_size=4, wait_s=0)
        (failed,) = await asyncio.gather(queue.submit(5), return_exceptions=True)
        return failed, await queue.submit(1)

    failed, good = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and good == 10


def test_a_cancelled_request_is_dropped_before_its_batch():
    async def scenario():
        model = Model()
        queue = BatchQueue(model.run, key=lambda item: 0, max_batch_size=4, wait_s=0)
        first = asyncio.create_task(queue.submit(1))
        await model.busy.wait()
        gone, kept = asyncio.create_task(queue.submit(2)), asyncio.create_task(queue.submit(3))
        await waiting(queue, 2)
        gone.cancel()  # its client went away while it waited
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.free.set()
        return await first, await kept, model.batches

    assert asyncio.run(scenario()) == (10, 30, [[1], [3]])
