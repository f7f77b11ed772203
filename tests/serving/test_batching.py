"""BatchQueue: batches form when the model is free, one group at a time, oldest first."""

import asyncio

import pytest

from longcat_ray.serving.batching import BatchQueue


def test_requests_arriving_while_the_model_runs_share_the_next_batch():
    batches = []

    async def run(items):
        batches.append(list(items))
        await asyncio.sleep(0.2)  # the model is busy; meanwhile the other requests arrive one by one
        return [item * 10 for item in items]

    async def scenario():
        queue = BatchQueue(run, key=lambda item: item % 2, max_batch_size=3, wait_s=0.01)

        async def later(item, delay):
            await asyncio.sleep(delay)
            return await queue.submit(item)

        # 0 alone (the model was idle); 2, 1, 4, 6, 8 trickle in while it runs, 3 after them
        return await asyncio.gather(*(later(item, 0.03 * index) for index, item in enumerate([0, 2, 1, 4, 6, 8, 3])))

    results = asyncio.run(scenario())
    assert results == [0, 20, 10, 40, 60, 80, 30]
    # oldest first (2's group), whole up to 3; then 1's group with 3, which came later; then the rest of 2's
    assert batches == [[0], [2, 4, 6], [1, 3], [8]]


def test_a_failing_batch_fails_its_callers_and_the_queue_goes_on():
    async def run(items):
        if "bad" in items:
            raise RuntimeError("CUDA error: out of memory")
        return [item.upper() for item in items]

    async def scenario():
        queue = BatchQueue(run, key=lambda item: item == "bad", max_batch_size=4, wait_s=0.01)
        failed = asyncio.gather(queue.submit("bad"), return_exceptions=True)
        done = await failed
        return done, await queue.submit("good")

    (error,), good = asyncio.run(scenario())
    assert isinstance(error, RuntimeError) and good == "GOOD"


def test_a_cancelled_request_is_dropped_before_its_batch():
    seen = []

    async def run(items):
        seen.append(list(items))
        await asyncio.sleep(0.05)
        return items

    async def scenario():
        queue = BatchQueue(run, key=lambda item: 0, max_batch_size=4, wait_s=0.01)
        first = asyncio.create_task(queue.submit("a"))
        await asyncio.sleep(0.02)  # "a" runs; "b" and "c" wait, then "b"'s client goes away
        gone = asyncio.create_task(queue.submit("b"))
        kept = asyncio.create_task(queue.submit("c"))
        await asyncio.sleep(0.005)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await first, await kept

    assert asyncio.run(scenario()) == ("a", "c")
    assert seen == [["a"], ["c"]]
