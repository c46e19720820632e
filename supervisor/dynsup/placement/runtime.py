"""The daemon's one entry point to Ray: connect, place, adopt, report.

    async with open_ray_runtime(instance="main", address="", num_gpus=8,
                                state_dir=state_dir) as rt:
        survivors = await rt.survivors()          # what a previous daemon left running
        adopt = rt.adoptable(survivors, specs)    # unchanged spec, same GPUs
        await rt.stop_stale(survivors, keep={s.name for s in adopt}, requires=...)
        engine = Engine(placer=rt.placer, output=hub)   # then engine.adopt(...) each
        tg.start_soon(rt.pump_output, on_batch)   # output of every node's agent

``address=""`` starts (or re-joins) the embedded head (see ``head``);
anything else joins that cluster. The namespace is ``namespace_for(instance)``:
agents and placement groups of one daemon instance are found by name in it.

Leaving the context with no process left on any agent (an orderly
shutdown: the engine stopped everything) kills the agent actors, removes
what groups remain and stops an embedded head; leaving it with processes
still running (a daemon that is going away to be replaced) leaves
everything as it is, for the next daemon to adopt.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog

from ..agent_api import Agent, AgentError, ChunkBatch, ExitStatus, LogRead, Spawned, SpawnRequest
from ..engine.placement import Placement
from ..engine.reload import fingerprint
from ..units.spec import ServiceSpec
from .gang import GangAgent, rank_name
from .groups import find, list_groups, release
from .head import Head, ensure_head, start_head, stop_head, wait_head_exit
from .layout import PlacementError, parse_group_name
from .placer import RayPlacer
from .ray_cluster import RayHandle, current_node_id, namespace_for, open_ray
from .relocating import unwrap
from .remote import AgentPool, RemoteAgent, agents_of

log = structlog.get_logger("dynsup.placement")

_CLOSE_TIMEOUT = 60.0
_KEPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_RANK = re.compile(r"^(?P<unit>.+)-r(?P<rank>[1-9][0-9]*)$")


@dataclass(frozen=True)
class Survivor:
    """A process a previous daemon started that still runs: ``Engine.adopt`` takes it."""

    name: str
    placement: Placement
    spawned: Spawned  # rank 0's for a gang; ``spawned.tag`` is the spec's fingerprint


@dataclass
class EmbeddedHead:
    """The embedded head the runtime is joined to, and how to start it again."""

    state_dir: Path
    head: Head
    num_gpus: int | None
    num_cpus: int | None


class RayRuntime:
    """The placer, the agents and the adoption of one daemon instance on one connection."""

    def __init__(self, handle: RayHandle, instance: str, pool: AgentPool, placer: RayPlacer):
        self.handle = handle
        self.instance = instance
        self.pool = pool
        self.placer = placer
        self.agent: Agent = UnitRouter(placer, pool)
        self.idle = False  # set on leaving: nothing was left running
        self.embedded: EmbeddedHead | None = None  # None: a cluster the daemon joined
        # Where pumps start on agents that were running before this runtime
        # opened (a daemon restart); agents made later are read from their start.
        self.start_cursors: dict[str, int] = {}

    @property
    def local_agent(self) -> RemoteAgent:
        """The agent of the daemon's own node."""
        return self.pool.local

    def gpu_table(self) -> list[dict[str, Any]]:
        """Rows {"node", "node_id", "gpu", "unit", "replica", "rank"}; free GPUs have unit None."""
        return self.placer.gpu_table()

    # -- adoption ----------------------------------------------------------------

    async def survivors(self) -> list[Survivor]:
        """Every unit whose processes the namespace's agents still host.

        A gang is a survivor only when all its ranks run; its placement
        (and any unit's GPUs) is read again from its group, so the GPU
        table shows it once adopted. A survivor not adopted must be passed
        to ``stop_stale``.
        """
        hosted = await self._hosted()
        by_name = {s.name: (agent, s) for agent, s in hosted}
        groups = await self._group_units()
        found: list[Survivor] = []
        for name, (agent, spawned) in sorted(by_name.items()):
            if _rank_of(name, groups) is not None:
                continue  # a rank > 0: comes with its rank 0
            if name not in groups:
                found.append(Survivor(name, self.placer.attach_plain(name, agent), spawned))
                continue
            try:
                placement = await self.placer.attach(name)
            except (PlacementError, TimeoutError) as exc:
                # Its group is being rescheduled or gone: not adoptable as it is.
                log.warning("adopt.no_group", unit=name, error=str(exc) or type(exc).__name__)
                placement = None
            if placement is None or not _complete(placement, agent, spawned, by_name):
                self.placer.forget(name)
                log.warning("adopt.incomplete", unit=name)
                continue
            found.append(Survivor(name, placement, spawned))
        return found

    def adoptable(
        self, survivors: Iterable[Survivor], specs: Mapping[str, ServiceSpec]
    ) -> list[Survivor]:
        """The survivors the engine may adopt: the spec is unchanged and so are its GPUs.

        The tag is the fingerprint the engine gave at spawn; the GPU check
        catches a process whose group is gone (it would run on GPUs nobody
        reserved for it).
        """
        adopt = []
        for survivor in survivors:
            spec = specs.get(survivor.name)
            if spec is None or survivor.spawned.tag != fingerprint(spec):
                continue
            held = self.placer.held().get(survivor.name)
            gpus = held.reservation.layout.total_gpus if held is not None else 0
            if gpus == spec.gpus:
                adopt.append(survivor)
        return adopt

    async def stop_stale(
        self,
        survivors: Iterable[Survivor],
        keep: set[str],
        *,
        requires: Mapping[str, Iterable[str]] | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        """Stop every hosted process whose unit is not in keep, then remove their groups.

        A unit is stopped after the stale units that require it (``requires``:
        unit → its requirements, from the current specs; unknown units have
        none); a gang's ranks > 0 before its rank 0. Groups go last: their
        processes must be gone before their GPUs are handed to anyone.
        """
        del survivors  # every hosted process is looked at, incomplete gangs too
        groups = await self._group_units()
        stale: dict[str, list[tuple[RemoteAgent, Spawned]]] = {}
        for agent, spawned in await self._hosted():
            rank = _rank_of(spawned.name, groups)
            unit = spawned.name if rank is None else rank[0]
            if unit not in keep:
                stale.setdefault(unit, []).append((agent, spawned))
        wanted_by: dict[str, set[str]] = {unit: set() for unit in stale}
        for unit, reqs in (requires or {}).items():
            for req in reqs:
                if req in wanted_by and unit in stale:
                    wanted_by[req].add(unit)
        done = {unit: anyio.Event() for unit in stale}

        async def stop_unit(unit: str) -> None:
            for dependent in wanted_by[unit]:
                await done[dependent].wait()
            procs = stale[unit]
            # Rank 0 (the unit's own name) last.
            async with anyio.create_task_group() as tg:
                for agent, spawned in procs:
                    if spawned.name != unit:
                        tg.start_soon(_stop, agent, spawned.name, stop_timeout)
            for agent, spawned in procs:
                if spawned.name == unit:
                    await _stop(agent, spawned.name, stop_timeout)
            self.placer.forget(unit)
            log.info("adopt.stopped_stale", unit=unit, processes=len(procs))
            done[unit].set()

        async with anyio.create_task_group() as tg:
            for unit in stale:
                tg.start_soon(stop_unit, unit)
        for unit, group in groups.items():
            if unit not in keep:
                self.placer.forget(unit)
                reservation = await find(group)
                if reservation is not None:
                    await release(reservation)
                    log.info("adopt.removed_group", unit=unit)

    # -- output ------------------------------------------------------------------

    async def pump_output(
        self, on_batch: Callable[[ChunkBatch], None], *, replay: bool = False
    ) -> None:
        """Feed on_batch with the output of every node's agent, forever (cancel to stop).

        Agents that join later (a unit placed on a new node, a replaced
        agent) are followed from their start. Without replay, an agent that
        was already running when the runtime opened is followed from then:
        what it printed while no daemon ran is in its rings (``tail``) but
        not sent again (the previous daemon may have sent it).
        """
        async with anyio.create_task_group() as tg:
            followed: set[str] = set()
            while True:
                for agent in self.pool.all():
                    if agent.node_id not in followed:
                        followed.add(agent.node_id)
                        start = 0 if replay else self.start_cursors.get(agent.node_id, 0)
                        tg.start_soon(_pump, agent, on_batch, start)
                await self.pool.wait_added()

    # -- the embedded head ---------------------------------------------------------

    async def keep_head(self) -> None:
        """Restart the embedded head whenever it dies and rejoin it (forever; cancel to stop).

        Without GCS fault tolerance a new head is a new cluster: the
        agents, their processes and the placement groups went with the old
        one. Units learn it as a lost agent and restart by their policy;
        their spawns wait for the rejoin, then reserve their GPUs again.
        """
        if self.embedded is None:
            return  # a joined cluster is its operator's to restart
        while True:
            died = await wait_head_exit(self.embedded.head)
            if died == "gcs_server":
                # The raylet, the agents and the units run on without it; only
                # placing GPUs fails ("Ray unavailable"). A restart would end
                # every unit: wait for the raylet to go (or the next daemon).
                log.error("ray.gcs_died", address=self.embedded.head.address)
                died = await wait_head_exit(self.embedded.head, ("raylet",))
            log.error("ray.head_died", process=died, address=self.embedded.head.address)
            await self._restart_head(f"the Ray head died ({died} exited)")

    async def _restart_head(self, reason: str) -> None:
        assert self.embedded is not None
        began = anyio.current_time()
        self.placer.left()
        # Before Ray lets go of the old cluster: replies to calls in flight never come.
        self.pool.cut(reason)
        old = self.embedded
        # What is left of it (the other of gcs_server/raylet, agents, workers).
        await anyio.to_thread.run_sync(functools.partial(stop_head, old.state_dir, old.head))
        # The same token: Ray reads it once per process.
        head = await anyio.to_thread.run_sync(
            functools.partial(
                start_head,
                old.state_dir,
                num_gpus=old.num_gpus,
                num_cpus=old.num_cpus,
                token=old.head.token,
            )
        )
        old.head = head
        assert self.handle.rejoin is not None, "an embedded head is joined through open_ray"
        with keep_signal_handlers():
            self.handle = await anyio.to_thread.run_sync(self.handle.rejoin(head.address).result)
        self.pool.reset(await anyio.to_thread.run_sync(current_node_id))
        self.start_cursors.clear()
        self.placer.rejoined(self.handle)
        await self.pool.local.ensure()
        log.info(
            "ray.head_restarted",
            address=head.address,
            seconds=round(anyio.current_time() - began, 1),
        )

    # -- shutdown ----------------------------------------------------------------

    async def close(self) -> bool:
        """Tear the agents down if they host nothing; returns whether they did."""
        # Bounded: with the GCS gone, Ray's calls wait for it without end.
        with anyio.move_on_after(_CLOSE_TIMEOUT):
            try:
                return await self._close()
            except Exception as exc:  # Ray gone (head died, network): nothing to tear down
                log.error("ray.close_failed", error=str(exc))
                return False
        log.error("ray.close_failed", error=f"Ray did not answer within {_CLOSE_TIMEOUT:g} s")
        return False

    async def _close(self) -> bool:
        hosted = await self._hosted()
        if hosted:
            log.info("ray.left_running", processes=len(hosted))
            return False
        for agent in self.pool.all():
            try:
                await agent.shutdown()
            except AgentError as exc:
                log.warning("agent.shutdown_failed", node=agent.node_id, error=str(exc))
        for group in (await self._group_units()).values():
            reservation = await find(group)
            if reservation is not None:
                await release(reservation)
        self.idle = True
        return True

    # -- internals ---------------------------------------------------------------

    async def _hosted(self) -> list[tuple[RemoteAgent, Spawned]]:
        for agent in await agents_of(self.pool.namespace):
            self.pool.add(agent)
        hosted = []
        for agent in self.pool.all():
            try:
                if await agent.lookup() is None:
                    continue
                hosted += [(agent, s) for s in await agent.running()]
            except AgentError:
                continue  # died meanwhile: so did its processes
        return hosted

    async def _group_units(self) -> dict[str, str]:
        """unit → group name, for this instance's live groups."""
        units = {}
        for info in await list_groups(self.instance):
            parsed = parse_group_name(info.name)
            if parsed is not None:
                units[parsed[1]] = info.name
        return units


class UnitRouter:
    """An `Agent` that sends each call about a unit to the agent hosting it.

    For the control verbs (``tail``, ``signal``) that take one agent: a
    unit may run on any node, and a gang's output is its rank 0's.
    """

    def __init__(self, placer: RayPlacer, pool: AgentPool) -> None:
        self._placer = placer
        self._pool = pool

    async def spawn(self, request: SpawnRequest) -> Spawned:
        return await self._placer.agent_of(request.name).spawn(request)

    async def wait_leader_exit(self, name: str) -> ExitStatus:
        return await self._placer.agent_of(name).wait_leader_exit(name)

    async def wait_exit(self, name: str) -> ExitStatus:
        return await self._placer.agent_of(name).wait_exit(name)

    async def stop(self, name: str, stop_signal: str, timeout: float) -> ExitStatus | None:
        return await self._placer.agent_of(name).stop(name, stop_signal, timeout)

    async def send_signal(self, name: str, sig: str) -> None:
        await self._placer.agent_of(name).send_signal(name, sig)

    async def read_log(self, name: str, stream: str, offset: int, limit: int) -> LogRead:
        return await self._placer.agent_of(name).read_log(name, stream, offset, limit)

    async def tail_log(self, name: str, stream: str, lines: int) -> LogRead:
        return await self._placer.agent_of(name).tail_log(name, stream, lines)

    async def next_chunks(
        self, cursor: int, timeout: float, names: Collection[str] | None = None
    ) -> ChunkBatch:
        return await self._pool.local.next_chunks(cursor, timeout, names)

    async def running(self) -> list[Spawned]:
        found: list[Spawned] = []
        for agent in self._pool.all():
            try:
                found += await agent.running()
            except AgentError:
                continue
        return found


@asynccontextmanager
async def open_runtime(
    handle: RayHandle,
    instance: str,
    *,
    namespace: str | None = None,
    reserve_timeout: float = 60.0,
) -> AsyncIterator[RayRuntime]:
    """A runtime on an existing connection; agents live in namespace (default: the handle's)."""
    import ray

    pool = AgentPool(namespace or handle.namespace, ray.get_runtime_context().get_node_id())
    # The node units without GPUs run on; its raylet's death ends them all.
    log.info("ray.joined", address=handle.address, node=pool.local_node_id)
    placer = RayPlacer(handle, instance, pool, reserve_timeout=reserve_timeout)
    runtime = RayRuntime(handle, instance, pool, placer)
    for agent in await agents_of(pool.namespace):
        pool.add(agent)
        with contextlib.suppress(AgentError):
            runtime.start_cursors[agent.node_id] = await agent.cursor_now()
    await placer.refresh_nodes()
    # The local agent now: the first unit should not wait for an actor to start.
    await pool.local.ensure()
    try:
        yield runtime
    finally:
        with anyio.CancelScope(shield=True):
            await runtime.close()


@asynccontextmanager
async def open_ray_runtime(
    *,
    instance: str,
    address: str,
    num_gpus: int | None,
    state_dir: Path | str,
    num_cpus: int | None = None,
    reserve_timeout: float = 60.0,
) -> AsyncIterator[RayRuntime]:
    """Join Ray (``address``; ``""``: the embedded head of state_dir) and open the runtime.

    ``num_gpus``/``num_cpus``: what a newly started embedded head declares
    (None: Ray detects); a head found running keeps what it has.
    """
    state = Path(state_dir)
    head: Head | None = None
    started = False
    if address == "":
        head, started = await anyio.to_thread.run_sync(
            functools.partial(ensure_head, state, num_gpus=num_gpus, num_cpus=num_cpus)
        )
        log.info("ray.head", address=head.address, started=started)
        address = head.address
        # ray.init reads the token from the environment.
        os.environ.update(head.auth_env())
    runtime: RayRuntime | None = None
    try:
        async with (
            open_ray(address, num_gpus=None, namespace=namespace_for(instance)) as handle,
            open_runtime(handle, instance, reserve_timeout=reserve_timeout) as runtime,
        ):
            if head is not None:
                runtime.embedded = EmbeddedHead(state, head, num_gpus, num_cpus)
            yield runtime
    finally:
        # A head nobody uses is stopped; one that still hosts units waits for
        # the next daemon. A head we could not even join is ours to stop.
        unused = runtime.idle if runtime is not None else started
        if runtime is not None and runtime.embedded is not None:
            head = runtime.embedded.head  # restarted meanwhile, maybe
        if head is not None and unused:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(functools.partial(stop_head, state, head))


@contextlib.contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """Put the process's signal handlers back after Ray joins a cluster.

    ``ray.init`` installs Ray's own handler for SIGTERM (it logs a stack and
    dies); on a rejoin that replaces the daemon's orderly stop. Call on the
    main thread.
    """
    saved = {sig: signal.getsignal(sig) for sig in _KEPT_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


async def _pump(agent: RemoteAgent, on_batch: Callable[[ChunkBatch], None], cursor: int) -> None:
    while True:
        batch = await agent.next_chunks(cursor, 30.0)
        if batch.chunks or batch.lost:
            on_batch(batch)
        cursor = batch.cursor


async def _stop(agent: RemoteAgent, name: str, timeout: float) -> None:
    # Gone already, or its agent with it: nothing to stop.
    with contextlib.suppress(AgentError):
        await agent.stop(name, "SIGTERM", timeout)


def _rank_of(name: str, groups: Mapping[str, str]) -> tuple[str, int] | None:
    """(unit, rank) when name is rank > 0 of a unit holding a group."""
    match = _RANK.match(name)
    if match is None or match["unit"] not in groups:
        return None
    return match["unit"], int(match["rank"])


def _complete(
    placement: Placement,
    agent: RemoteAgent,
    spawned: Spawned,
    by_name: Mapping[str, tuple[RemoteAgent, Spawned]],
) -> bool:
    """Whether every rank of a survivor runs, with its tag, on its bundle's node."""
    gang = unwrap(placement.agent)
    if not isinstance(gang, GangAgent):
        return isinstance(gang, RemoteAgent) and gang.node_id == agent.node_id
    for k, rank in enumerate(gang.ranks):
        hosted = by_name.get(rank_name(spawned.name, k))
        if hosted is None or hosted[1].tag != spawned.tag:
            return False
        if not isinstance(rank.agent, RemoteAgent) or rank.agent.node_id != hosted[0].node_id:
            return False
    return True
