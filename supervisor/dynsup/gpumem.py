"""GPU memory through NVML: who holds memory on which GPU, and the check after a stop.

`GpuProbe` is the boundary: `NvmlProbe` asks the driver (``nvidia-ml-py``,
imported only when a unit asks for GPUs, so a CPU-only stack never loads
it); tests pass a stand-in here and nowhere else. `open_probe` answers
None where there is no NVML (no package, no driver, no GPU): GPU memory
then reads null, and the check after a stop is skipped.

The check after a stop (`free_gpus`): a crashed vLLM often leaves an
``EngineCore`` holding gigabytes. Before a unit's GPUs are used again,
every process still holding memory on them is named; one of ours (a
descendant of this daemon, or carrying a ``DYNSUP_TOKEN``) is killed, and
the check waits, bounded, for the memory to be released.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import structlog

from .process import TOKEN_VAR

log = structlog.get_logger("dynsup.gpumem")


@dataclass(frozen=True)
class GpuHolder:
    """A process holding memory on a GPU."""

    gpu: str  # the index, as CUDA_VISIBLE_DEVICES names it
    pid: int
    used_bytes: int


class GpuProbe(Protocol):
    def holders(self) -> list[GpuHolder]:
        """Every process holding memory on any GPU of this node (blocking)."""
        ...


class NvmlProbe:
    """GpuProbe over NVML. Thread-safe (NVML is); blocking: call off the event loop."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles = [
            (str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())
        ]

    def holders(self) -> list[GpuHolder]:
        nvml = self._nvml
        found = []
        for index, handle in self._handles:
            try:
                procs = [
                    *nvml.nvmlDeviceGetComputeRunningProcesses(handle),
                    *nvml.nvmlDeviceGetGraphicsRunningProcesses(handle),
                ]
            except nvml.NVMLError as exc:
                log.warning("gpu.query_failed", gpu=index, error=str(exc))
                continue
            for proc in procs:
                used = proc.usedGpuMemory  # None where the driver does not say
                found.append(GpuHolder(index, proc.pid, int(used or 0)))
        return found


_probe_lock = threading.Lock()
_probe: NvmlProbe | None = None
_probe_tried = False


def open_probe() -> NvmlProbe | None:
    """NVML once per process; None where it is not available."""
    global _probe, _probe_tried
    with _probe_lock:
        if not _probe_tried:
            _probe_tried = True
            try:
                import pynvml  # nvidia-ml-py: the [gpu] extra

                pynvml.nvmlInit()
                _probe = NvmlProbe(pynvml)
            except Exception as exc:  # no package, no driver, no device: no NVML
                log.info("gpu.nvml_unavailable", error=f"{type(exc).__name__}: {exc}")
        return _probe


def is_ours(pid: int, host_pid: int) -> bool:
    """A process this daemon started: a descendant of it, or one that carries a token."""
    try:
        proc = psutil.Process(pid)
        if any(parent.pid == host_pid for parent in proc.parents()):
            return True
        return TOKEN_VAR in proc.environ()
    except (psutil.Error, OSError):
        return False


def free_gpus(
    probe: GpuProbe,
    gpus: Iterable[str],
    *,
    unit: str,
    timeout: float = 10.0,
    host_pid: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> list[GpuHolder]:
    """Kill our processes still holding memory on gpus; wait until they let go.

    Blocking (NVML and /proc): run it in a worker thread. Returns the holders
    left when it gave up (none when the GPUs are free); each is logged, with
    whether it was ours.
    """
    wanted = {str(g) for g in gpus}
    host = os.getpid() if host_pid is None else host_pid
    killed: set[int] = set()
    deadline = clock() + timeout
    while True:
        left = [h for h in probe.holders() if h.gpu in wanted]
        if not left or clock() >= deadline:
            for holder in left:
                log.error(
                    "gpu.memory_still_held",
                    unit=unit,
                    gpu=holder.gpu,
                    holder_pid=holder.pid,
                    used_bytes=holder.used_bytes,
                    ours=holder.pid in killed,
                )
            return left
        for holder in left:
            if holder.pid in killed:
                continue
            ours = is_ours(holder.pid, host)
            log.warning(
                "gpu.memory_held_after_stop",
                unit=unit,
                gpu=holder.gpu,
                holder_pid=holder.pid,
                used_bytes=holder.used_bytes,
                ours=ours,
            )
            if ours:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(holder.pid, signal.SIGKILL)
                killed.add(holder.pid)
        # NVML has no event for "memory released": poll, briefly, with a deadline.
        pause(0.1)
