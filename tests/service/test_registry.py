"""ModelRegistry: loading, readiness and reasons, engines by name, and the bounded inference executor."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.observability import Metrics, request_id_var
from service.registry import ENSEMBLE, ModelRegistry, QueueFullError
from service.settings import Settings
from tests.service.support import build_model, expected_labels, tumour_scan


def registry_for(models_dir, **settings) -> ModelRegistry:
    settings.setdefault("providers", ["CPUExecutionProvider"])
    settings.setdefault("threads", 1)
    return ModelRegistry(Settings(models_dir=models_dir, **settings))


class TestLoad:
    def test_ready_with_default_resunet(self, models_dir):
        registry = registry_for(models_dir)
        assert (registry.ready, registry.reason) == (False, "the models are still loading")
        registry.load()
        assert registry.ready and registry.reason is None
        assert registry.names == ["resunet", "unet"]
        assert registry.default == "resunet"
        assert registry.choices == ["resunet", "unet", ENSEMBLE]
        assert registry.metrics.ready._value.get() == 1
        assert registry.metrics.models_loaded._value.get() == 2

    def test_configured_default(self, models_dir):
        registry = registry_for(models_dir, default_model="unet")
        registry.load()
        assert registry.ready and registry.default == "unet"

    def test_first_name_without_resunet(self, tmp_path):
        build_model(tmp_path, "zeta")
        build_model(tmp_path, "alpha")
        registry = registry_for(tmp_path)
        registry.load()
        assert registry.default == "alpha"

    def test_unknown_default_is_not_ready(self, models_dir):
        registry = registry_for(models_dir, default_model="vnet")
        registry.load()
        assert not registry.ready
        assert "'vnet'" in registry.reason and "resunet" in registry.reason and "unet" in registry.reason

    @pytest.mark.parametrize("folder, reason", [("missing", "does not exist"), ("empty", "holds no NAME.onnx")])
    def test_no_models_is_not_ready(self, tmp_path, folder, reason, caplog):
        (tmp_path / "empty").mkdir()
        registry = registry_for(tmp_path / folder)
        registry.load()  # never raises
        assert not registry.ready and reason in registry.reason
        assert registry.models == {} and registry.default is None and registry.choices == []
        assert any("NOT READY" in r.getMessage() and reason in r.getMessage() for r in caplog.records)

    def test_corrupt_model_is_not_ready(self, tmp_path):
        build_model(tmp_path, "unet")
        (tmp_path / "unet.onnx").write_bytes(b"not onnx")
        registry = registry_for(tmp_path)
        registry.load()
        assert not registry.ready and "sha256" in registry.reason


class TestEngines:
    def test_engine_per_name_and_ensemble(self, models_dir):
        registry = registry_for(models_dir)
        registry.load()
        unet = registry.engine("unet")
        assert unet is registry.engine("unet")  # cached
        assert [m.name for m in unet.models] == ["unet"]
        ensemble = registry.engine(ENSEMBLE)
        assert sorted(m.name for m in ensemble.models) == ["resunet", "unet"]
        assert ensemble.model_sha256.count("+") == 1
        assert (ensemble.segment(tumour_scan()).labels == expected_labels()).all()

    def test_ensemble_of_3d_and_2d(self, models_dir_2d):
        registry = registry_for(models_dir_2d)
        registry.load()
        assert len(registry.engine(ENSEMBLE).models) == 3
        assert (registry.engine("unet2d").segment(tumour_scan()).labels == expected_labels()).all()

    def test_unknown_name_lists_valid_ones(self, models_dir):
        registry = registry_for(models_dir)
        registry.load()
        with pytest.raises(KeyError, match="unknown model 'vnet'; valid names: resunet, unet, ensemble"):
            registry.engine("vnet")


class TestBoundedExecutor:
    """``run`` against a fake job that blocks until the test releases it."""

    @staticmethod
    def registry(max_concurrent=1, max_queue=1) -> ModelRegistry:
        return ModelRegistry(Settings(max_concurrent=max_concurrent, max_queue=max_queue), metrics=Metrics())

    @staticmethod
    async def until(predicate, timeout=5.0):
        for _ in range(int(timeout / 0.005)):
            if predicate():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("condition not reached")

    def test_runs_off_the_loop_with_context_and_times_the_model(self):
        registry = self.registry()

        def job(x):
            return x + 1, threading.current_thread().name, request_id_var.get()

        async def main():
            request_id_var.set("req-1")
            return await registry.run(job, 41, model="unet")

        value, thread, request_id = asyncio.run(main())
        assert value == 42 and thread.startswith("inference") and request_id == "req-1"
        assert registry.metrics.inference.labels("unet")._sum.get() > 0
        assert (registry.running, registry.waiting) == (0, 0)

    def test_full_queue_raises_and_counts(self):
        registry = self.registry(max_concurrent=1, max_queue=1)
        gate = threading.Event()

        async def main():
            first = asyncio.ensure_future(registry.run(gate.wait))
            await self.until(lambda: registry.running == 1)
            second = asyncio.ensure_future(registry.run(lambda: "second"))
            await self.until(lambda: registry.waiting == 1)
            assert registry.metrics.queue_depth._value.get() == 1
            with pytest.raises(QueueFullError, match="1 inference\\(s\\) running and 1 waiting"):
                await registry.run(lambda: "third")
            assert registry.metrics.rejected._value.get() == 1
            gate.set()
            assert await first is True and await second == "second"
            assert registry.metrics.queue_depth._value.get() == 0

        asyncio.run(main())

    def test_cancelled_waiter_leaves_the_queue(self):
        registry = self.registry(max_concurrent=1, max_queue=1)
        gate = threading.Event()

        async def main():
            first = asyncio.ensure_future(registry.run(gate.wait))
            await self.until(lambda: registry.running == 1)
            waiter = asyncio.ensure_future(registry.run(lambda: "never"))
            await self.until(lambda: registry.waiting == 1)
            waiter.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert registry.waiting == 0
            third = asyncio.ensure_future(registry.run(lambda: "third"))  # the freed place is usable
            await self.until(lambda: registry.waiting == 1)
            gate.set()
            assert await first is True and await third == "third"
            assert (registry.running, registry.waiting) == (0, 0)

        asyncio.run(main())

    def test_cancelled_runner_keeps_its_slot_until_the_thread_ends(self):
        registry = self.registry(max_concurrent=1, max_queue=1)
        gate = threading.Event()
        order: list[str] = []

        def slow():
            gate.wait()
            order.append("slow")

        def fast():
            order.append("fast")

        async def main():
            runner = asyncio.ensure_future(registry.run(slow))
            await self.until(lambda: registry.running == 1)
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
            assert registry.running == 1  # the thread still runs: its slot is still taken
            queued = asyncio.ensure_future(registry.run(fast))
            await asyncio.sleep(0.05)
            assert order == []  # waits for the slot, does not run beside the thread
            gate.set()
            await queued
            assert order == ["slow", "fast"]
            assert (registry.running, registry.waiting) == (0, 0)

        asyncio.run(main())

    def test_job_error_releases_the_slot(self):
        registry = self.registry(max_concurrent=1, max_queue=0)

        def boom():
            raise ValueError("bad input")

        async def main():
            with pytest.raises(ValueError, match="bad input"):
                await registry.run(boom)
            assert await registry.run(lambda: 1) == 1

        asyncio.run(main())

    def test_concurrency_limit_holds(self):
        registry = self.registry(max_concurrent=2, max_queue=10)
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
            await asyncio.gather(*(registry.run(job) for _ in range(8)))

        asyncio.run(main())
        assert peak[0] == 2
