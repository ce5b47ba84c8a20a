"""InferenceQueue: admission, the bounded executor, cancellation, and the job times it records."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.inference.queue import InferenceQueue, QueueFullError
from service.observability import Metrics, request_id_var


class TestBoundedExecutor:
    """``run`` against a fake job that blocks until the test releases it."""

    @staticmethod
    def queue(max_concurrent=1, max_queue=1) -> InferenceQueue:
        return InferenceQueue(max_concurrent, max_queue, metrics=Metrics())

    @staticmethod
    async def until(predicate, timeout=5.0):
        for _ in range(int(timeout / 0.005)):
            if predicate():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("condition not reached")

    def test_runs_off_the_loop_with_context_and_times_the_model(self):
        queue = self.queue()

        def job(x):
            return x + 1, threading.current_thread().name, request_id_var.get()

        async def main():
            request_id_var.set("req-1")
            return await queue.run(job, 41, model="unet")

        value, thread, request_id = asyncio.run(main())
        assert value == 42 and thread.startswith("inference") and request_id == "req-1"
        assert queue.metrics.inference.labels("unet")._sum.get() > 0
        assert (queue.running, queue.waiting) == (0, 0)

    def test_full_queue_raises_and_counts(self):
        queue = self.queue(max_concurrent=1, max_queue=1)
        gate = threading.Event()

        async def main():
            first = asyncio.ensure_future(queue.run(gate.wait))
            await self.until(lambda: queue.running == 1)
            second = asyncio.ensure_future(queue.run(lambda: "second"))
            await self.until(lambda: queue.waiting == 1)
            assert queue.metrics.queue_depth._value.get() == 1
            with pytest.raises(QueueFullError, match="1 inference\\(s\\) running and 1 waiting"):
                await queue.run(lambda: "third")
            assert queue.metrics.rejected._value.get() == 1
            gate.set()
            assert await first is True and await second == "second"
            assert queue.metrics.queue_depth._value.get() == 0

        asyncio.run(main())

    def test_cancelled_waiter_leaves_the_queue(self):
        queue = self.queue(max_concurrent=1, max_queue=1)
        gate = threading.Event()

        async def main():
            first = asyncio.ensure_future(queue.run(gate.wait))
            await self.until(lambda: queue.running == 1)
            waiter = asyncio.ensure_future(queue.run(lambda: "never"))
            await self.until(lambda: queue.waiting == 1)
            waiter.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert queue.waiting == 0
            third = asyncio.ensure_future(queue.run(lambda: "third"))  # the freed place is usable
            await self.until(lambda: queue.waiting == 1)
            gate.set()
            assert await first is True and await third == "third"
            assert (queue.running, queue.waiting) == (0, 0)

        asyncio.run(main())

    def test_cancelled_runner_keeps_its_slot_until_the_thread_ends(self):
        queue = self.queue(max_concurrent=1, max_queue=1)
        gate = threading.Event()
        order: list[str] = []

        def slow():
            gate.wait()
            order.append("slow")

        def fast():
            order.append("fast")

        async def main():
            runner = asyncio.ensure_future(queue.run(slow))
            await self.until(lambda: queue.running == 1)
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
            assert queue.running == 1  # the thread still runs: its slot is still taken
            queued = asyncio.ensure_future(queue.run(fast))
            await asyncio.sleep(0.05)
            assert order == []  # waits for the slot, does not run beside the thread
            gate.set()
            await queued
            assert order == ["slow", "fast"]
            assert (queue.running, queue.waiting) == (0, 0)

        asyncio.run(main())

    def test_job_error_releases_the_slot(self):
        queue = self.queue(max_concurrent=1, max_queue=0)

        def boom():
            raise ValueError("bad input")

        async def main():
            with pytest.raises(ValueError, match="bad input"):
                await queue.run(boom)
            assert await queue.run(lambda: 1) == 1

        asyncio.run(main())

    def test_concurrency_limit_holds(self):
        queue = self.queue(max_concurrent=2, max_queue=10)
        lock = threading.Lock()
        active, peak = [0], [0]

        def job():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.01)
            with lock:
                active[0] -= 1

        async def main():
            await asyncio.gather(*(queue.run(job) for _ in range(8)))

        asyncio.run(main())
        assert peak[0] == 2
