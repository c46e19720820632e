"""GPU memory left after a crash is freed before the unit's GPUs are used again.

Real Ray (8 logical GPUs), real processes; the one stand-in is `FakeNvml`
at the NVML boundary (this machine has no GPU).
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from dynsup.gpucheck import GpusFreedCheck
from dynsup.placement import RayHandle
from tests.ray_fixtures import ray_embedded, ray_instance
from tests.test_gpumem import GIB, FakeNvml, engine_core
from tests.test_ray_placer import gpu_unit, namespace, open_stack, visible_devices, wait_running

__all__ = ["engine_core", "namespace", "ray_embedded", "ray_instance"]  # fixtures, by name

pytestmark = [pytest.mark.ray, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> object:
    return ("asyncio", {"debug": True})


async def test_gpu_memory_held_after_a_crash_is_freed_before_the_restart(
    ray_embedded: RayHandle,
    ray_instance: str,
    namespace: str,
    engine_core: subprocess.Popen[bytes],
) -> None:
    nvml = FakeNvml({})
    check = GpusFreedCheck(lambda: nvml, timeout=30)
    spec = gpu_unit("vllm", gpus=2)
    async with open_stack(ray_embedded, ray_instance, namespace, spec, gpus_freed=check) as (
        _rt,
        engine,
    ):
        engine.start_nowait("vllm")
        first = await wait_running(engine, "vllm")
        gpu = visible_devices(first).split(",")[1]
        # What a crashed vLLM leaves: its EngineCore, ours, still holding memory.
        nvml.held[engine_core.pid] = (gpu, 4 * GIB)
        os.kill(first, signal.SIGKILL)
        await wait_running(engine, "vllm", not_pid=first)
        assert engine_core.poll() == -signal.SIGKILL
        await engine.stop("vllm")
