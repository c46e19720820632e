"""GPU memory per unit and the check after a stop, with real processes.

This machine has no GPU: the only stand-in is `FakeNvml`, at the NVML
boundary (`GpuProbe`); it reports memory held by real processes while they
live, as the driver does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from dynsup.gpumem import GpuHolder, free_gpus
from dynsup.resources import Leader, ResourceMonitor

GIB = 1 << 30


class FakeNvml:
    """Stand-in for the driver: pid -> (gpu, bytes), for as long as the pid lives."""

    def __init__(self, held: dict[int, tuple[str, int]]) -> None:
        self.held = held

    def holders(self) -> list[GpuHolder]:
        return [GpuHolder(gpu, pid, used) for pid, (gpu, used) in self.held.items() if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def engine_core() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours that outlived its unit's stop (a crashed vLLM's EngineCore)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_gpu_memory_left_by_our_process_after_a_stop_is_freed_by_killing_it(
    engine_core: subprocess.Popen[bytes],
) -> None:
    stranger = 1  # init: not ours, on another GPU: left alone
    probe = FakeNvml({engine_core.pid: ("3", 2 * GIB), stranger: ("5", GIB)})
    left = free_gpus(probe, ["3"], unit="llama-0", timeout=30)
    assert left == []
    assert engine_core.wait(30) == -9


def test_gpu_memory_held_by_a_process_not_ours_is_reported_not_killed() -> None:
    probe = FakeNvml({1: ("0", GIB)})
    left = free_gpus(probe, ["0"], unit="llama-0", timeout=0.3)
    assert left == [GpuHolder("0", 1, GIB)]
    assert _alive(1)


def test_gpu_memory_of_a_unit_is_the_sum_over_its_processes(
    engine_core: subprocess.Popen[bytes],
) -> None:
    probe = FakeNvml({engine_core.pid: ("2", 3 * GIB), os.getpid(): ("2", GIB)})
    monitor = ResourceMonitor(gpus=lambda: probe)
    usage = monitor.sample({"w": Leader(engine_core.pid, None, ("2",))})["w"]
    assert usage.gpu_memory_bytes == 3 * GIB
    assert usage.gpu_memory == (("2", 3 * GIB),)
    # Without a unit holding GPUs, NVML is not even asked: null, not 0.
    plain = monitor.sample({"w": Leader(engine_core.pid)})["w"]
    assert plain.gpu_memory_bytes is None
