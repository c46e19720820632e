"""Where the daemon's processes run: in-process, or under Ray agents (one per node).

This is the one place that chooses; Ray is imported only when a Ray
backend is opened, so a stack without GPU units (the demo) never pays
for it. Both backends give the daemon the same things: a placer for the
engine, an agent for the control verbs, a pump of output chunks, and a
GPU table (None without Ray).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog

from .agent import LocalAgent
from .agent_api import Agent, ChunkBatch
from .config import RayConfig
from .engine import Engine
from .engine.placement import Placement, PlacementFailed, Placer, SingleAgent
from .units.spec import ServiceSpec
from .warden import MARK_VAR, Warden

log = structlog.get_logger("dynsup.backend")

OnBatch = Callable[[ChunkBatch], None]


class OverCommitted(PlacementFailed):
    """The units ask for more GPUs than the cluster has; nothing was started."""


# Checks units about to start (added or changed), before anything is
# spawned; ``leaving`` names units whose GPUs are freed first (removed or
# changed). Raises `PlacementFailed` with what to do.
Check = Callable[[Mapping[str, ServiceSpec], Iterable[str]], Awaitable[None]]


def without_ray(spec: ServiceSpec) -> str:
    """Why a GPU unit cannot run on a daemon that runs without Ray."""
    return (
        f"unit {spec.name} asks for {spec.gpus} GPU{'s' if spec.gpus != 1 else ''}; this "
        "daemon runs without Ray: restart dynsupd (or set [ray] enabled = true)"
    )


class NoGpus(SingleAgent):
    """Every unit on the in-process agent; a GPU unit is refused, never run unreserved."""

    async def place(self, spec: ServiceSpec) -> Placement:
        if spec.gpus > 0:
            raise PlacementFailed(without_ray(spec))
        return await super().place(spec)


async def refuse_gpus(specs: Mapping[str, ServiceSpec], leaving: Iterable[str] = ()) -> None:
    refused = [without_ray(spec) for spec in specs.values() if spec.gpus > 0]
    if refused:
        raise PlacementFailed("; ".join(refused))


def ray_wanted(config: RayConfig, specs: Mapping[str, ServiceSpec]) -> bool:
    if config.enabled is True or config.enabled is False:
        return config.enabled
    return bool(config.address) or any(spec.gpus > 0 for spec in specs.values())


@dataclass
class Backend:
    placer: Placer
    agent: Agent  # for the control verbs: tail, signal
    pump: Callable[[OnBatch], Any]  # async: feeds output batches, forever
    gpu_table: Callable[[], Any] | None = None  # async, for `dynsupctl gpus`
    adopt: Callable[[Engine, Mapping[str, ServiceSpec], set[str]], Any] | None = None
    check: Check = refuse_gpus  # before units are added or changed
    # async, runs for the daemon's life: restarts an embedded Ray head that died
    watch: Callable[[], Awaitable[None]] | None = None


@asynccontextmanager
async def open_local() -> AsyncIterator[Backend]:
    # The units are session leaders: if the daemon dies without clean-up they
    # would run on as orphans, holding their ports. Its warden kills them.
    warden = Warden(f"local/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}")
    try:
        async with LocalAgent(env={MARK_VAR: warden.mark}, warden=warden) as agent:
            yield _local_backend(agent)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(warden.release)


def _local_backend(agent: LocalAgent) -> Backend:
    async def pump(on_batch: OnBatch) -> None:
        cursor = 0
        while True:
            batch = await agent.next_chunks(cursor, timeout=30.0)
            on_batch(batch)
            cursor = batch.cursor

    return Backend(placer=NoGpus(agent), agent=agent, pump=pump)


@asynccontextmanager
async def open_ray_backend(
    config: RayConfig, state_dir: Path, instance: str
) -> AsyncIterator[Backend]:
    from .placement.gcs import RayUnavailable
    from .placement.layout import PlacementError
    from .placement.runtime import open_ray_runtime

    num_gpus = config.num_gpus if config.num_gpus >= 0 else None
    async with open_ray_runtime(
        instance=instance, address=config.address, num_gpus=num_gpus, state_dir=state_dir
    ) as runtime:

        async def pump(on_batch: OnBatch) -> None:
            await runtime.pump_output(on_batch)

        async def gpu_table() -> Any:
            return runtime.gpu_table()

        async def check(specs: Mapping[str, ServiceSpec], leaving: Iterable[str] = ()) -> None:
            try:
                await runtime.placer.check_fits(specs.values(), besides=leaving)
            except RayUnavailable as exc:  # not an over-commit: each placement says why
                log.warning("gpu.check_failed", error=str(exc))
            except PlacementError as exc:
                raise OverCommitted(str(exc)) from exc
            except Exception as exc:  # Ray unreachable: the placement will say why
                log.warning("gpu.check_failed", error=str(exc) or type(exc).__name__)

        async def adopt(engine: Engine, specs: Mapping[str, ServiceSpec], wanted: set[str]) -> None:
            """Take over what a previous daemon left running; stop what no longer matches."""
            survivors = await runtime.survivors()
            # Same spec (the fingerprint given at spawn) and its GPUs still reserved.
            keep = {s.name for s in runtime.adoptable(survivors, specs) if s.name in wanted}
            requires = {name: spec.requires for name, spec in specs.items()}
            await runtime.stop_stale(survivors, keep, requires=requires)
            for survivor in survivors:
                if survivor.name in keep:
                    engine.adopt(survivor.name, survivor.placement, survivor.spawned)
                    log.info("unit.adopted", unit=survivor.name, pid=survivor.spawned.pid)

        yield Backend(
            placer=runtime.placer,
            agent=runtime.agent,
            pump=pump,
            gpu_table=gpu_table,
            adopt=adopt,
            check=check,
            watch=runtime.keep_head,
        )
