"""Where the daemon's processes run: in-process, or under Ray agents (one per node).

This is the one place that chooses; Ray is imported only when a Ray
backend is opened, so a stack without GPU units (the demo) never pays
for it. Both backends give the daemon the same things: a placer for the
engine, an agent for the control verbs, a pump of output chunks, and a
GPU table (None without Ray).

Without Ray the agent (in the daemon, or the agent process) forwards its
units' output to journald itself, and the daemon's pump pulls only the
output of the units it has consumers for (`OutputHub.names`): under a
flood that nobody follows, no byte of it reaches the daemon. Ray's remote
agents keep sending everything, which the daemon forwards to journald.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog

from .agent import LocalAgent
from .agent_api import Agent, AgentError, ChunkBatch
from .config import AGENT_MODES, DaemonConfig, RayConfig
from .engine import Engine, OutputHub
from .engine.placement import Placement, PlacementFailed, Placer, SingleAgent
from .engine.reload import fingerprint
from .logs.journald import JournalSettings
from .units.spec import ServiceSpec
from .warden import MARK_VAR, Warden

log = structlog.get_logger("dynsup.backend")

OnBatch = Callable[[ChunkBatch], None]
# How long a pump's long-poll waits for output before it asks again.
POLL_TIMEOUT = 30.0


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
class PumpStatistics:
    """What a pump received from its agent: the output the daemon touched."""

    batches: int = 0
    chunks: int = 0
    bytes: int = 0


@dataclass
class Backend:
    placer: Placer
    agent: Agent  # for the control verbs: tail, signal
    # async, forever: feeds output batches; given the hub, only the units it has
    # consumers for (None: everything, for a daemon that forwards to journald)
    pump: Callable[[OnBatch, OutputHub | None], Any]
    gpu_table: Callable[[], Any] | None = None  # async, for `dynsupctl gpus`
    adopt: Callable[[Engine, Mapping[str, ServiceSpec], set[str]], Any] | None = None
    check: Check = refuse_gpus  # before units are added or changed
    # async, runs for the daemon's life: restarts an embedded Ray head that died
    watch: Callable[[], Awaitable[None]] | None = None
    # The units outlive the daemon (Ray agents, the agent process): `shutdown
    # --detach` may leave them to the next daemon. Set `detached` to do so.
    can_detach: bool = False
    detached: bool = False
    # The agent forwards its units' output to journald (the daemon need not).
    agent_journals: bool = False
    pumped: PumpStatistics = field(default_factory=PumpStatistics)


AGENT_ENV = "DYNSUP_AGENT"  # "process" | "inprocess": over [daemon] agent (tests pin a mode)


def open_local_backend(
    config: DaemonConfig, state_dir: Path, journal: JournalSettings | None = None
) -> AsyncContextManager[Backend]:
    """Without Ray: the agent process (the default), or the agent inside the daemon.

    ``journal``: where the agent sends its units' output (None: nowhere).
    """
    mode = os.environ.get(AGENT_ENV, "").strip() or config.agent
    if mode not in AGENT_MODES:
        log.warning("agent.unknown_mode", mode=mode, using=config.agent)
        mode = config.agent
    if mode == "inprocess":
        return open_local(journal)
    return open_agent_backend(state_dir, config.agent_orphan_timeout, journal)


@asynccontextmanager
async def open_local(journal: JournalSettings | None = None) -> AsyncIterator[Backend]:
    # The units are session leaders: if the daemon dies without clean-up they
    # would run on as orphans, holding their ports. Its warden kills them.
    warden = Warden(f"local/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}")
    try:
        async with LocalAgent(env={MARK_VAR: warden.mark}, warden=warden) as agent:
            await agent.use_journal(journal)
            yield _local_backend(agent)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(warden.release)


@asynccontextmanager
async def open_agent_backend(
    state_dir: Path, orphan_timeout: float = 0.0, journal: JournalSettings | None = None
) -> AsyncIterator[Backend]:
    """The units under the agent process of the state directory (``agent = "process"``).

    They outlive the daemon: the next one adopts them from the same agent.
    Only an orderly stop that does not detach stops the agent itself.
    """
    from .agent_client import open_agent_process, shutdown_agent

    async with open_agent_process(state_dir, orphan_timeout, journal) as (client, found):
        backend = _local_backend(client, start=int(client.info.get("cursor", 0)))
        backend.can_detach = True
        # An older agent process (OLDEST_PROTOCOL) cannot: the daemon forwards.
        backend.agent_journals = client.output_in_agent  # an older agent cannot
        if found:
            backend.adopt = partial(adopt_local, client)
        yield backend
        if not backend.detached:
            with anyio.CancelScope(shield=True):
                await shutdown_agent(client)


async def adopt_local(
    agent: Agent, engine: Engine, specs: Mapping[str, ServiceSpec], wanted: set[str]
) -> None:
    """Take over what the agent still hosts for a previous daemon; stop what no longer matches.

    The same rule as with Ray: a wanted unit whose spec has the fingerprint
    it was spawned with (`Spawned.tag`) is adopted, pid and all; anything
    else is stopped, dependents before what they require, before any unit
    starts.
    """
    survivors = await agent.running()
    keep = {
        s.name
        for s in survivors
        if s.name in wanted and s.name in specs and s.tag == fingerprint(specs[s.name])
    }
    stale = {s.name for s in survivors if s.name not in keep}
    await stop_in_order(agent, stale, specs)
    for spawned in survivors:
        if spawned.name in keep:
            engine.adopt(spawned.name, Placement(agent=agent), spawned)
            log.info("unit.adopted", unit=spawned.name, pid=spawned.pid)


async def stop_in_order(agent: Agent, names: set[str], specs: Mapping[str, ServiceSpec]) -> None:
    """Stop the named hosted groups, each after the ones among them that require it."""
    done = {name: anyio.Event() for name in names}

    async def stop_one(name: str) -> None:
        for dependent, spec in specs.items():
            if dependent in done and name in spec.requires:
                await done[dependent].wait()
        spec = specs.get(name)
        stop_signal, timeout = (
            (spec.stop_signal.name, spec.stop_timeout) if spec else ("SIGTERM", 10.0)
        )
        log.info("unit.stale_stopped", unit=name)
        try:
            await agent.stop(name, stop_signal, timeout)
        except AgentError as exc:
            log.error("unit.stale_stop_failed", unit=name, error=str(exc))
        finally:
            done[name].set()

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(stop_one, name)


def _local_backend(agent: Agent, start: int = 0) -> Backend:
    stats = PumpStatistics()

    async def pump(on_batch: OnBatch, interest: OutputHub | None = None) -> None:
        await pump_local(agent, counted(on_batch, stats), interest, start)

    return Backend(placer=NoGpus(agent), agent=agent, pump=pump, agent_journals=True, pumped=stats)


def counted(on_batch: OnBatch, stats: PumpStatistics) -> OnBatch:
    def count(batch: ChunkBatch) -> None:
        stats.batches += 1
        stats.chunks += len(batch.chunks)
        stats.bytes += sum(len(chunk.data) for chunk in batch.chunks)
        on_batch(batch)

    return count


@dataclass
class _Poll:
    names: frozenset[str]
    scope: anyio.CancelScope


async def pump_local(
    agent: Agent, on_batch: OnBatch, interest: OutputHub | None, cursor: int
) -> None:
    """Feed on_batch with the agent's output, forever; with ``interest``, only
    the output of the units it names at each moment.

    When the names change (a log probe starts, a follower leaves), the
    long-poll is cancelled and asked again with the new names, from the same
    cursor: nothing a consumer subscribed before is skipped. A consumer that
    arrives later may receive chunks printed a little before it came (from
    the cursor on, at most the agent's chunk queue); each already drops what
    is not its own: a log probe the chunks of another pid, a follower the
    bytes before the offset it read first. With no names, the pump still
    asks (for nobody's chunks), so that its cursor moves on each timeout.
    """
    if interest is None:
        while True:
            batch = await agent.next_chunks(cursor, POLL_TIMEOUT)
            on_batch(batch)
            cursor = batch.cursor
    poll: _Poll | None = None

    async def cancel_on_change() -> None:
        while True:
            # Look, then wait, with no await in between: no change is missed.
            if poll is not None and interest.names() != poll.names:
                poll.scope.cancel()
            await interest.changed.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_change)
        while True:
            poll = _Poll(interest.names(), anyio.CancelScope())
            with poll.scope:
                batch = await agent.next_chunks(cursor, POLL_TIMEOUT, poll.names)
                on_batch(batch)
                cursor = batch.cursor


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

        async def pump(on_batch: OnBatch, interest: OutputHub | None = None) -> None:
            # Everything, whoever is interested: the daemon forwards it to journald.
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
            can_detach=True,
        )
