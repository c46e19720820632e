"""The engine: desired versus actual state, one task per unit.

Each wanted unit has one lifecycle task in the engine's task group that
reads top to bottom: wait for requirements, spawn, wait ready (or exit),
wait exit, decide, back off, again. Stopping a unit is cancelling that
task's scope; the task's shielded `finally` stops the process group.
Every state change goes through `_set_state`, which checks the transition
table, logs one event and publishes a snapshot.

The engine knows nothing of Ray, Dynamo or sockets: processes are run by
an `Agent`, unit output for log probes comes from an `OutputHub`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..agent_api import Agent, AgentError, ExitStatus, PortBusy, Spawned, SpawnError, SpawnRequest
from ..probes import wait_ready
from ..units.spec import ProbeKind, ServiceSpec
from .output import LineSubscription, OutputHub
from .placement import Placement, PlacementFailed, Placer, SingleAgent
from .policy import StartLimiter, backoff_delay, healthy_after, should_restart
from .reload import ReloadPlan, diff_specs, fingerprint
from .states import State, check_transition

log = structlog.get_logger("dynsup.engine")

# An after-exit hook runs before the restart: it must not hold a crash loop up.
AFTER_EXIT_TIMEOUT = 3.0
AfterExit = Callable[[ServiceSpec], Awaitable[None]]


class UnknownUnit(KeyError):
    """No unit of that name is loaded."""


@dataclass(frozen=True)
class UnitStatus:
    """A snapshot of one unit, for `status` and for event subscribers."""

    name: str
    state: State
    description: str
    pid: int | None
    node: str | None
    started_at: float | None  # wall clock of the current process's spawn
    since: float  # wall clock of the last state change
    exit_status: str | None  # how the last process ended
    reason: str  # why the last transition happened
    restarts: int
    wanted: bool
    gpus: tuple[str, ...] = ()


@dataclass
class _Unit:
    spec: ServiceSpec
    state: State = State.STOPPED
    wanted: bool = False
    pid: int | None = None
    node: str | None = None
    started_at: float | None = None
    since: float = field(default_factory=time.time)
    exit_status: str | None = None
    reason: str = ""
    restarts: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope | None = None
    finished: anyio.Event | None = None
    process_alive: bool = False
    placement: Placement | None = None
    detaching: bool = False  # leave the process running for the next daemon

    @property
    def active(self) -> bool:
        return self.finished is not None and not self.finished.is_set()


@dataclass
class _ExitBox:
    exited: anyio.Event = field(default_factory=anyio.Event)
    status: ExitStatus | None = None


class Engine:
    """Supervises a set of units through one agent. Use as an async context manager."""

    def __init__(
        self,
        agent: Agent | None = None,
        output: OutputHub | None = None,
        *,
        placer: Placer | None = None,
        after_exit: AfterExit | None = None,
    ) -> None:
        """``after_exit`` runs once a unit's process is gone by itself or by a stop
        (not a detach), before any restart: clean-up only the supervisor can do
        for a process that died without doing it (Dynamo's discovery records)."""
        if placer is None:
            if agent is None:
                raise TypeError("an Engine needs an agent or a placer")
            placer = SingleAgent(agent)
        self._placer = placer
        self._after_exit_hook = after_exit
        self._output = output or OutputHub()
        self._units: dict[str, _Unit] = {}
        self._tg: TaskGroup | None = None
        self._subscribers: list[MemoryObjectSendStream[UnitStatus]] = []

    async def __aenter__(self) -> Engine:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.stop_all()
        assert self._tg is not None
        return await self._tg.__aexit__(exc_type, exc, tb)

    # -- loading -------------------------------------------------------------

    def load(self, specs: Mapping[str, ServiceSpec]) -> None:
        """Set the initial unit set (before anything runs)."""
        if self._units:
            raise RuntimeError("load() is for the initial set; use apply() to change it")
        self._units = {name: _Unit(spec) for name, spec in specs.items()}

    @property
    def specs(self) -> dict[str, ServiceSpec]:
        return {name: unit.spec for name, unit in self._units.items()}

    def names(self) -> list[str]:
        return list(self._units)

    # -- queries -------------------------------------------------------------

    def statistics(self, names: Iterable[str] | None = None) -> list[UnitStatus]:
        selected = list(self._units) if names is None else list(names)
        return [self._snapshot(self._get(name)) for name in selected]

    def subscribe(self, buffer: int = 1024) -> MemoryObjectReceiveStream[UnitStatus]:
        """Every state change from now on. A subscriber that falls behind loses events,
        never the engine's time: it can re-read statistics()."""
        send, receive = anyio.create_memory_object_stream[UnitStatus](buffer)
        self._subscribers.append(send)
        return receive

    async def wait_state(self, name: str, predicate: Callable[[UnitStatus], bool]) -> UnitStatus:
        """Wait until the unit's snapshot satisfies predicate."""
        unit = self._get(name)
        while True:
            snap = self._snapshot(unit)
            if predicate(snap):
                return snap
            await unit.changed.wait()

    # -- commands ------------------------------------------------------------

    def start_autostart(self) -> None:
        for name, unit in self._units.items():
            if unit.spec.autostart:
                self.start_nowait(name)

    def adopt(self, name: str, placement: Placement, spawned: Spawned) -> None:
        """Take over a process a previous daemon started (same spec): no respawn."""
        unit = self._get(name)
        if unit.active:
            raise RuntimeError(f"{name} is already supervised")
        self._launch(unit, adopted=(placement, spawned))

    def start_nowait(self, name: str) -> None:
        """Want the unit (and what it requires) running; returns at once."""
        for dep in self._requirements_closure(name):
            self._launch(self._get(dep))
        self._launch(self._get(name))

    async def stop(self, name: str) -> None:
        """Stop the unit, after the units that require it (they stop first)."""
        self._get(name)
        await self._stop_many({name, *self._dependents_closure(name)})

    async def stop_for_restart(self, name: str) -> list[str]:
        """Stop the unit and its running dependents; return those dependents."""
        dependents = sorted(self._dependents_closure(name))
        await self._stop_many({name, *dependents})
        return dependents

    async def stop_all(self) -> None:
        """Stop everything in reverse dependency order, independent units concurrently."""
        await self._stop_many(set(self._units))

    async def detach_all(self) -> None:
        """Stop supervising, leaving every process and reservation as it is.

        For a daemon upgrade with Ray agents: the next daemon adopts the
        processes (same spec, same pids, GPUs still held).
        """
        for unit in self._units.values():
            if unit.active and unit.scope is not None:
                unit.detaching = True
                unit.scope.cancel()
        for unit in self._units.values():
            if unit.finished is not None:
                await unit.finished.wait()

    async def send_signal(self, name: str, sig: str) -> None:
        unit = self._get(name)
        if not unit.process_alive or unit.placement is None:
            raise AgentError(f"{name} is not running")
        await unit.placement.agent.send_signal(name, sig)

    # -- reload --------------------------------------------------------------

    def plan(self, new_specs: Mapping[str, ServiceSpec]) -> ReloadPlan:
        return diff_specs(self.specs, new_specs)

    async def apply(self, new_specs: Mapping[str, ServiceSpec]) -> ReloadPlan:
        """Stop removed and changed units, then start added and changed ones.

        Unchanged units are not touched, not even their dependents' pids.
        """
        plan = self.plan(new_specs)
        was_wanted = {name for name, unit in self._units.items() if unit.wanted}
        await self._stop_many(set(plan.removed) | set(plan.changed))
        for name in plan.removed:
            del self._units[name]
        for name in plan.changed:
            self._units[name].spec = new_specs[name]
        for name in plan.added:
            self._units[name] = _Unit(new_specs[name])
        for name in sorted(plan.changed):
            if name in was_wanted:
                self.start_nowait(name)
        for name in sorted(plan.added):
            if new_specs[name].autostart:
                self.start_nowait(name)
        return plan

    # -- the lifecycle ---------------------------------------------------------

    def _launch(self, unit: _Unit, adopted: tuple[Placement, Spawned] | None = None) -> None:
        if unit.active:
            return
        assert self._tg is not None, "engine used outside its context"
        unit.wanted = True
        # PENDING at once, so a caller that waits for the start never sees the old state.
        self._set_state(unit, State.PENDING, reason="start requested")
        unit.scope = anyio.CancelScope()
        unit.finished = anyio.Event()
        self._tg.start_soon(self._lifecycle, unit, unit.scope, unit.finished, adopted)

    async def _lifecycle(
        self,
        unit: _Unit,
        scope: anyio.CancelScope,
        finished: anyio.Event,
        adopted: tuple[Placement, Spawned] | None,
    ) -> None:
        name = unit.spec.name
        # The task copied its starter's context (a control request's peer, say):
        # the unit's own events carry only the unit.
        structlog.contextvars.clear_contextvars()
        try:
            with structlog.contextvars.bound_contextvars(unit=name), scope:
                await self._run(unit, adopted)
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self._teardown(unit)
            finally:
                # Set even if teardown hit a bug, so stop_all never waits forever.
                finished.set()

    async def _run(self, unit: _Unit, adopted: tuple[Placement, Spawned] | None) -> None:
        spec = unit.spec
        if adopted is None:
            await self._wait_requirements(unit)
            try:
                unit.placement = await self._placer.place(spec)
            except PlacementFailed as exc:
                self._set_state(unit, State.FATAL, reason=str(exc))
                return
        limiter = StartLimiter(spec.start_limit_burst, spec.start_limit_interval)
        limiter.allow(anyio.current_time())  # the first start always goes ahead
        failures = 0
        while True:
            try:
                took_over = adopted is not None
                lines = None
                if adopted is not None:
                    unit.placement, spawned = adopted
                    adopted = None
                    self._took_over(unit, spawned)
                else:
                    # A log probe listens before the spawn: with a remote agent
                    # the first lines can arrive before spawn() returns.
                    lines = self._output.subscribe(spec.name, None) if _is_log_probe(spec) else None
                    try:
                        spawned = await self._spawn(unit)
                    except BaseException:
                        if lines is not None:
                            lines.close()
                        raise
                    if lines is not None:
                        lines.bind(spawned.pid)
            except PortBusy as exc:
                # Often the previous holder is still going away: a failed start.
                log.warning("unit.port_busy", error=str(exc))
                status, up_for = ExitStatus(code=None, signal=None, error=str(exc)), 0.0
            except SpawnError as exc:
                self._set_state(unit, State.FATAL, reason=str(exc))
                return
            else:
                status, up_for = await self._supervise(unit, spawned, took_over, lines)
                await self._after_exit(spec)
            if up_for >= healthy_after(spec):
                failures = 0
            if not should_restart(spec.restart, status, spec.success_exit_codes):
                self._set_state(unit, State.EXITED, reason=status.describe())
                return
            failures += 1
            delay = backoff_delay(spec, failures)
            # Decide now whether the next start would break the limit, so a
            # crash loop ends in FATAL at its last exit, not one delay later.
            if not limiter.allow(anyio.current_time() + delay):
                self._set_state(
                    unit,
                    State.FATAL,
                    reason=f"{status.describe()}; start limit: more than"
                    f" {spec.start_limit_burst} starts within {spec.start_limit_interval:g}s",
                )
                return
            unit.restarts += 1
            self._set_state(
                unit, State.BACKOFF, reason=f"{status.describe()}; restart in {delay:g}s"
            )
            await anyio.sleep(delay)

    async def _wait_requirements(self, unit: _Unit) -> None:
        for dep_name in unit.spec.requires:
            dep = self._units[dep_name]
            if dep.state is not State.RUNNING:
                unit.reason = f"waiting for {dep_name}"
                log.info("unit.waiting", requires=dep_name)
            while dep.state is not State.RUNNING:
                await dep.changed.wait()

    async def _spawn(self, unit: _Unit) -> Spawned:
        spec = unit.spec
        assert unit.placement is not None
        spawned = await unit.placement.agent.spawn(spawn_request(spec, unit.placement))
        unit.pid, unit.node, unit.started_at = spawned.pid, spawned.node, time.time()
        unit.process_alive = True
        self._set_state(unit, State.STARTING, reason="spawned")
        return spawned

    def _took_over(self, unit: _Unit, spawned: Spawned) -> None:
        unit.pid, unit.node, unit.started_at = spawned.pid, spawned.node, spawned.start_time
        unit.process_alive = True
        self._set_state(unit, State.STARTING, reason="adopted from a previous daemon")

    async def _supervise(
        self,
        unit: _Unit,
        spawned: Spawned,
        took_over: bool = False,
        lines: LineSubscription | None = None,
    ) -> tuple[ExitStatus, float]:
        """Wait ready (or exit first), then exit. Returns the status and time spent RUNNING."""
        spec = unit.spec
        box = _ExitBox()
        ready_at: float | None = None
        if took_over and _is_log_probe(spec):
            # The line it waits for was printed to the previous daemon's watch.
            spec = replace(spec, ready=None, start_seconds=0.0)
        if lines is not None and not _is_log_probe(spec):
            lines.close()
            lines = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_exit, unit, box)
            try:
                outcome = await self._wait_ready(spec, box, lines)
            finally:
                if lines is not None:
                    lines.close()
            if outcome == "ready":
                ready_at = anyio.current_time()
                self._set_state(unit, State.RUNNING, reason="ready")
            elif outcome == "timeout":
                timeout = spec.ready.timeout if spec.ready else spec.start_seconds
                unit.reason = f"not ready within {timeout:g}s"
                log.warning("unit.not_ready", pid=spawned.pid, timeout=timeout)
                await self._agent_of(unit).stop(spec.name, spec.stop_signal.name, spec.stop_timeout)
            await box.exited.wait()
        assert box.status is not None
        up_for = 0.0 if ready_at is None else anyio.current_time() - ready_at
        return box.status, up_for

    async def _watch_exit(self, unit: _Unit, box: _ExitBox) -> None:
        try:
            status = await self._agent_of(unit).wait_exit(unit.spec.name)
        except AgentError as exc:
            log.error("unit.agent_lost", error=str(exc))
            status = ExitStatus(code=None, signal="AGENT_LOST")
        unit.process_alive = False
        unit.exit_status = status.describe()
        box.status = status
        box.exited.set()

    async def _wait_ready(
        self, spec: ServiceSpec, box: _ExitBox, lines: LineSubscription | None
    ) -> str:
        """'ready', 'exited' (before ready) or 'timeout'."""
        async with anyio.create_task_group() as race:

            async def exited_first() -> None:
                await box.exited.wait()
                race.cancel_scope.cancel()

            race.start_soon(exited_first)
            if spec.ready is None:
                await anyio.sleep(spec.start_seconds)
                race.cancel_scope.cancel()
                return "ready" if not box.exited.is_set() else "exited"
            with anyio.move_on_after(spec.ready.timeout) as deadline:
                await wait_ready(spec.ready, lines.lines if lines is not None else None)
                race.cancel_scope.cancel()
                return "ready" if not box.exited.is_set() else "exited"
            race.cancel_scope.cancel()
            return "timeout" if deadline.cancelled_caught else "exited"
        return "exited"

    async def _teardown(self, unit: _Unit) -> None:
        """After the lifecycle ends, by itself or cancelled: nothing of it may run on."""
        spec = unit.spec
        # Detaching (a daemon upgrade) leaves the process and its reservation
        # to the next daemon; everything else ends here.
        detaching, unit.detaching = unit.detaching, False
        # STOPPING also when the process just exited and the exit is not yet
        # handled (the unit still reads STARTING or RUNNING).
        if unit.process_alive or unit.state in (State.STARTING, State.RUNNING):
            self._set_state(
                unit, State.STOPPING, reason="detaching" if detaching else "stop requested"
            )
        if unit.process_alive and not detaching:
            try:
                status = await self._agent_of(unit).stop(
                    spec.name, spec.stop_signal.name, spec.stop_timeout
                )
            except AgentError as exc:
                log.error("unit.stop_failed", error=str(exc))
                status = None
            unit.process_alive = False
            if status is not None:
                unit.exit_status = status.describe()
            await self._after_exit(spec)
        if unit.placement is not None and not detaching:
            try:
                await self._placer.release(spec)
            except PlacementFailed as exc:
                log.error("unit.release_failed", error=str(exc))
            unit.placement = None
        if unit.state not in (State.EXITED, State.FATAL, State.STOPPED):
            reason = "detached: left running" if detaching else "stopped"
            self._set_state(unit, State.STOPPED, reason=reason)

    async def _after_exit(self, spec: ServiceSpec) -> None:
        if self._after_exit_hook is None:
            return
        try:
            with anyio.fail_after(AFTER_EXIT_TIMEOUT):
                await self._after_exit_hook(spec)
        except Exception as exc:  # a failed clean-up never fails the unit
            log.warning("unit.after_exit_failed", error=str(exc) or type(exc).__name__)

    # -- stopping many -------------------------------------------------------

    async def _stop_many(self, names: set[str]) -> None:
        """Stop names; a unit is stopped only after its dependents within names are."""
        done = {name: anyio.Event() for name in names}

        async def stop_one(name: str) -> None:
            for dependent in self._dependents(name):
                if dependent in done:
                    await done[dependent].wait()
            unit = self._units[name]
            unit.wanted = False
            if unit.scope is not None:
                unit.scope.cancel()
            if unit.finished is not None:
                await unit.finished.wait()
            done[name].set()

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(stop_one, name)

    def _dependents(self, name: str) -> list[str]:
        return [n for n, u in self._units.items() if name in u.spec.requires]

    def _dependents_closure(self, name: str) -> set[str]:
        found: set[str] = set()
        todo = [name]
        while todo:
            for dependent in self._dependents(todo.pop()):
                if dependent not in found and self._units[dependent].active:
                    found.add(dependent)
                    todo.append(dependent)
        return found

    def _requirements_closure(self, name: str) -> list[str]:
        found: list[str] = []
        todo = list(self._get(name).spec.requires)
        while todo:
            dep = todo.pop()
            if dep not in found:
                found.append(dep)
                todo.extend(self._units[dep].spec.requires)
        return found

    # -- the one writer of state ---------------------------------------------

    def _set_state(self, unit: _Unit, state: State, *, reason: str) -> None:
        check_transition(unit.state, state)
        old = unit.state
        unit.state = state
        unit.reason = reason
        unit.since = time.time()
        log.info(
            "unit.state",
            unit=unit.spec.name,
            old=old.value,
            new=state.value,
            pid=unit.pid if unit.process_alive else None,
            exit_status=unit.exit_status,
            reason=reason,
        )
        changed, unit.changed = unit.changed, anyio.Event()
        changed.set()
        snapshot = self._snapshot(unit)
        for send in list(self._subscribers):
            try:
                send.send_nowait(snapshot)
            except anyio.WouldBlock:
                pass  # the subscriber lags; it loses this event, never blocks us
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(send)

    def _snapshot(self, unit: _Unit) -> UnitStatus:
        return UnitStatus(
            name=unit.spec.name,
            state=unit.state,
            description=unit.spec.description,
            pid=unit.pid if unit.process_alive else None,
            node=unit.node,
            started_at=unit.started_at,
            since=unit.since,
            exit_status=unit.exit_status,
            reason=unit.reason,
            restarts=unit.restarts,
            wanted=unit.wanted,
            gpus=unit.placement.gpus if unit.placement else (),
        )

    @staticmethod
    def _agent_of(unit: _Unit) -> Agent:
        assert unit.placement is not None, "a process runs only after placement"
        return unit.placement.agent

    def _get(self, name: str) -> _Unit:
        try:
            return self._units[name]
        except KeyError:
            raise UnknownUnit(name) from None


def spawn_request(spec: ServiceSpec, placement: Placement) -> SpawnRequest:
    """What the agent is asked to run for spec at its placement."""
    return SpawnRequest(
        name=spec.name,
        argv=spec.command,
        env={**spec.env, **placement.env},
        cwd=spec.working_directory,
        stop_signal=spec.stop_signal.name,
        stop_timeout=spec.stop_timeout,
        unset_env=spec.unset_env,
        ports=spec.ports,
        tag=fingerprint(spec),
        rank_args=spec.secondary_args,
    )


def _is_log_probe(spec: ServiceSpec) -> bool:
    return spec.ready is not None and spec.ready.kind is ProbeKind.LOG
