"""The engine's ``gpus_freed`` hook: after a GPU unit's group is gone, before its
GPUs are used again, nothing may still hold memory on them (`gpumem.free_gpus`).

Only GPUs of this machine can be asked (NVML is local): a unit placed on
another node is left to that node. Without NVML the check is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import anyio.to_thread
import structlog

from .engine import UnitStatus
from .gpumem import GpuProbe, free_gpus, open_probe
from .resources import local_node_names

log = structlog.get_logger("dynsup.gpucheck")

RELEASE_TIMEOUT = 10.0  # how long a holder may take to let go after SIGKILL


class GpusFreedCheck:
    def __init__(
        self,
        probe: Callable[[], GpuProbe | None] = open_probe,
        *,
        timeout: float = RELEASE_TIMEOUT,
    ) -> None:
        self._probe = probe
        self._timeout = timeout
        self._local = local_node_names()

    async def __call__(self, snap: UnitStatus) -> None:
        if not snap.gpus or (snap.node is not None and snap.node not in self._local):
            return
        # NVML's first call loads the driver library: blocking, off the loop.
        probe = await anyio.to_thread.run_sync(self._probe)
        if probe is None:
            return
        check = partial(free_gpus, probe, snap.gpus, unit=snap.name, timeout=self._timeout)
        left = await anyio.to_thread.run_sync(check)
        if left:
            log.error(
                "gpu.not_freed",
                unit=snap.name,
                gpus=list(snap.gpus),
                holders=[h.pid for h in left],
            )
