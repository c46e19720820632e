"""The engine: desired versus actual state, one task per unit.

Each wanted unit has one lifecycle task in the engine's task group that
reads top to bottom: wait for requirements, place, then spawn, wait ready
(or exit), wait for the leader's exit (shown at once: STOPPING), wait for
its group to be gone, decide (`policy.decide`), back off, again. Stopping a
unit is cancelling that task's scope; the task's shielded `finally` stops
the process group. The task is the unit's failure boundary: an unexpected
error ends that unit FATAL, never the engine. Every state change goes
through `_set_state`, which checks the transition table, logs one event
and publishes a snapshot to every `Feed`.

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

from ..agent_api import (
    Agent,
    AgentError,
    ExitStatus,
    PortBusy,
    Spawned,
    SpawnError,
    SpawnRequest,
    StopFailed,
)
from ..broadcast import Feed, Pulse
from ..probes import check_live, wait_ready
from ..units.spec import LiveSpec, ProbeKind, ServiceSpec
from .output import LineSubscription, OutputHub
from .placement import Placement, PlacementFailed, Placer, SingleAgent
from .policy import Done, GiveUp, History, decide
from .reload import ReloadPlan, diff_specs, fingerprint
from .rollout import Rollout
from .states import UP_OR_GAVE_UP, State, check_transition

log = structlog.get_logger("dynsup.engine")

# An after-exit hook runs before the restart: it must not hold a crash loop up.
AFTER_EXIT_TIMEOUT = 3.0
# A drain lets in-flight work finish; Dynamo's own drain step is bounded the same.
DRAIN_TIMEOUT = 30.0
# A replaced unit of a rolling update is RUNNING; the router learns of it a moment later.
ADMIT_TIMEOUT = 30.0
# A hook gets the unit's spec: clean-up only the stack knows (Dynamo's discovery).
Hook = Callable[[ServiceSpec], Awaitable[None]]
AfterExit = Hook
# Once a GPU unit's group is gone, before its GPUs are used again (a restart
# or a release): a check that nothing still holds memory on them.
GpusFreed = Callable[["UnitStatus"], Awaitable[None]]


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
    blocked: bool = False  # settled because a requirement ended; starts when it is back


class RequirementFailed(Exception):
    """A unit's requirement ended for good: the unit cannot start (until it comes back)."""


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
    changed: Pulse = field(default_factory=Pulse)
    scope: anyio.CancelScope | None = None
    finished: anyio.Event | None = None
    process_alive: bool = False  # the leader runs
    group_alive: bool = False  # something of the last spawn may still run
    placement: Placement | None = None
    detaching: bool = False  # leave the process running for the next daemon
    # Settled because a requirement failed: started again when it is RUNNING again.
    blocked: bool = False
    # Why the lifecycle must end FATAL once torn down (a bug, say): the last word.
    failure: str | None = None

    @property
    def active(self) -> bool:
        return self.finished is not None and not self.finished.is_set()


@dataclass
class _Liveness:
    checks: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    failed: str | None = None  # why the unit was found not live


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
        after_exit: Hook | None = None,
        gpus_freed: GpusFreed | None = None,
        withdraw: Hook | None = None,
        drain: Hook | None = None,
        admitted: Hook | None = None,
    ) -> None:
        """``after_exit`` runs once a unit's leader is gone by itself or by a stop
        (not a detach), before any restart: clean-up only the supervisor can do
        for a process that died without doing it (Dynamo's discovery records).
        ``gpus_freed`` runs once a unit with GPUs has no process left, before
        they are used again; its errors are logged, never the unit's.
        ``withdraw`` runs before a unit that failed its liveness probe is killed
        (it is hung: it cannot withdraw itself). ``drain`` runs before a requested
        stop of a live unit (withdraw, then let in-flight work finish), bounded
        by DRAIN_TIMEOUT. ``admitted`` returns once a unit takes traffic (its router
        knows it): a rolling update waits for it before the next replica."""
        if placer is None:
            if agent is None:
                raise TypeError("an Engine needs an agent or a placer")
            placer = SingleAgent(agent)
        self._placer = placer
        self._after_exit_hook = after_exit
        self._gpus_freed_hook = gpus_freed
        self._withdraw_hook = withdraw
        self._drain_hook = drain
        self._admitted_hook = admitted
        self._output = output or OutputHub()
        self._units: dict[str, _Unit] = {}
        self._tg: TaskGroup | None = None
        self._feeds: list[Feed[UnitStatus]] = []
        self._rollout: Rollout | None = None  # the last `begin_apply`'s
        self.changed = Pulse()  # fires on every state change of any unit

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
            self._abandon_rollout()
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

    def spec(self, name: str) -> ServiceSpec:
        return self._get(name).spec

    def names(self) -> list[str]:
        return list(self._units)

    # -- queries -------------------------------------------------------------

    def statistics(self, names: Iterable[str] | None = None) -> list[UnitStatus]:
        selected = list(self._units) if names is None else list(names)
        return [self._snapshot(self._get(name)) for name in selected]

    def subscribe(self, buffer: int = 1024) -> Feed[UnitStatus]:
        """Every state change from now on, in order. Take `statistics()` first (no
        await in between) for the present; a subscriber that falls behind is
        given the present again (every unit's snapshot), never a stale picture."""
        feed = Feed(self.statistics, buffer, self._feeds.remove)
        self._feeds.append(feed)
        return feed

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
        self._abandon_rollout()
        for unit in self._units.values():
            if unit.active and unit.scope is not None:
                unit.detaching = True
                unit.scope.cancel()
        for unit in self._units.values():
            if unit.finished is not None:
                await unit.finished.wait()

    def _abandon_rollout(self) -> None:
        """The daemon stops: a rollout in progress starts nothing more."""
        if self._rollout is not None:
            self._rollout.scope.cancel()

    async def send_signal(self, name: str, sig: str) -> None:
        unit = self._get(name)
        if not unit.process_alive or unit.placement is None:
            raise AgentError(f"{name} is not running")
        await unit.placement.agent.send_signal(name, sig)

    # -- reload --------------------------------------------------------------

    def plan(self, new_specs: Mapping[str, ServiceSpec]) -> ReloadPlan:
        return diff_specs(self.specs, new_specs)

    async def apply(self, new_specs: Mapping[str, ServiceSpec]) -> ReloadPlan:
        """`begin_apply`, then wait until the change has settled."""
        rollout = self.begin_apply(new_specs)
        await rollout.done.wait()
        return rollout.plan

    def begin_apply(self, new_specs: Mapping[str, ServiceSpec]) -> Rollout:
        """Start applying new_specs in the engine's task group; return its `Rollout`.

        Removed and changed units are stopped, then added and changed ones
        started. Unchanged units are not touched, not even their dependents'
        pids. Changed units of a group (a model's replicas) that are RUNNING
        are replaced one at a time (`_roll`), so the group keeps serving. The
        rollout is done once every unit it started is RUNNING (and admitted,
        for a group's) or has failed. The caller applies one change at a time
        and waits for the last to be done first (`rollout_settled`).
        """
        if self._rollout is not None and not self._rollout.done.is_set():
            raise RuntimeError("a rollout is in progress: wait for rollout_settled() first")
        assert self._tg is not None, "engine used outside its context"
        rollout = Rollout(self.plan(new_specs))
        self._rollout = rollout
        self._tg.start_soon(self._apply, rollout, dict(new_specs))
        return rollout

    async def rollout_settled(self) -> None:
        """Return once the last rollout (if any) is done."""
        if self._rollout is not None:
            await self._rollout.done.wait()

    async def _apply(self, rollout: Rollout, new_specs: Mapping[str, ServiceSpec]) -> None:
        """The rollout's own task: a failure in here fails the rollout, never the engine."""
        try:
            with rollout.scope:
                await self._carry_out(rollout, new_specs)
            if rollout.scope.cancel_called:
                rollout.fail("*", "the daemon is stopping: rollout abandoned")
        except Exception as exc:
            log.exception("rollout.crashed", error=_describe(exc))
            rollout.fail("*", f"internal error: {_describe(exc)}")
        finally:
            rollout.finish()

    async def _carry_out(self, rollout: Rollout, new_specs: Mapping[str, ServiceSpec]) -> None:
        plan = rollout.plan
        was_wanted = {name for name, unit in self._units.items() if unit.wanted}
        rolling = {
            name
            for name in plan.changed
            if new_specs[name].group and self._units[name].state is State.RUNNING
        }
        # A rolling group that gains and loses members at once surges: what it
        # gains starts first, what it loses is drained last (`_roll`).
        groups = {new_specs[name].group for name in rolling}
        spares = {name for name in plan.added if new_specs[name].group in groups}
        leaving = {name for name in plan.removed if self._units[name].spec.group in groups}
        stopping = sorted((set(plan.removed) - leaving) | (set(plan.changed) - rolling))
        live = [name for name in stopping if self._units[name].active]
        for name in live:
            rollout.report(name, self._stop_word(self._units[name]))
        await self._stop_many(set(stopping))
        for name in live:
            rollout.report(name, "stopped")
        for name in sorted(set(plan.removed) - leaving):
            del self._units[name]
            rollout.report(name, "removed")
        for name in plan.added:
            self._units[name] = _Unit(new_specs[name])
        for name, unit in self._units.items():
            # Changed, or equal but for how it is watched (its probes: the new
            # watch from the next start). A rolling unit's spec changes at its turn.
            if name not in rolling and name not in leaving:
                unit.spec = new_specs[name]
        started = [n for n in sorted(set(plan.changed) - rolling) if n in was_wanted]
        started += [n for n in sorted(set(plan.added) - spares) if new_specs[n].autostart]
        for name in started:
            self.start_nowait(name)
        async with anyio.create_task_group() as tg:
            for name in started:
                tg.start_soon(self._come_up, name, rollout)
            tg.start_soon(self._roll, rolling, spares, leaving, new_specs, rollout)

    async def _roll(
        self,
        names: set[str],
        spares: set[str],
        leaving: set[str],
        new_specs: Mapping[str, ServiceSpec],
        rollout: Rollout,
    ) -> None:
        """Replace each group's units one after another (groups side by side): drain
        one, start its new spec, wait until it is RUNNING and admitted (taking
        traffic), then the next. A group with spares surges: each spare (a new
        member) starts and is admitted first, so while one old unit is replaced
        the group still has as many serving as before; its leaving members (gone
        from new_specs) are drained and removed last. A unit that fails to come
        up halts its group: the units not yet replaced, and those that were to
        leave, keep serving with their old spec (the next `update` finds them)."""
        groups: dict[str, list[str]] = {}
        for name in sorted(names):
            groups.setdefault(new_specs[name].group, []).append(name)

        async def roll_group(group: str, members: list[str]) -> None:
            added = sorted(n for n in spares if new_specs[n].group == group)
            gone = sorted(n for n in leaving if self._units[n].spec.group == group)
            if added and gone:
                order = "surge: each new replica on a spare slot first, then an old one drained"
            elif added:  # the count grows too: the new replicas first, then drain first
                order = "added replicas first, then drain first, one replica at a time"
            else:
                order = "drain first, one replica at a time"
            rollout.report(group, "rolling", order)
            steps = [*((n, True) for n in added), *((n, False) for n in members)]
            for index, (name, spare) in enumerate(steps):
                came_up = (
                    await self._come_up_new(name, rollout)
                    if spare
                    else await self._replace(name, new_specs[name], rollout)
                )
                if not came_up:
                    left = [n for n, is_spare in steps[index + 1 :] if not is_spare] + gone
                    log.error("unit.rolling_halted", unit=name, left=left)
                    for kept in left:
                        rollout.report(kept, "kept", f"old spec: the rollout halted at {name}")
                    return
            for name in gone:
                rollout.report(name, self._stop_word(self._units[name]))
                await self._stop_many({name})
                rollout.report(name, "stopped")
                del self._units[name]
                rollout.report(name, "removed")

        async with anyio.create_task_group() as tg:
            for group, members in groups.items():
                tg.start_soon(roll_group, group, members)

    async def _come_up_new(self, name: str, rollout: Rollout) -> bool:
        """A surge's spare: start it and wait until it is RUNNING and admitted."""
        self.start_nowait(name)
        return await self._come_up(name, rollout)

    async def heal(self, names: list[str], reason: str) -> None:
        """Restart names (drained, as any stop) with reason, and wait until each is
        RUNNING or has failed again: something outside the units saw them broken."""
        log.warning("unit.healing", units=names, reason=reason)
        await self._stop_many(set(names))
        for name in names:
            self._launch(self._get(name), reason=reason)
        for name in names:
            await self.wait_state(
                name, lambda s: s.state in UP_OR_GAVE_UP or s.state is State.BACKOFF
            )

    async def _replace(self, name: str, spec: ServiceSpec, rollout: Rollout) -> bool:
        rollout.report(name, self._stop_word(self._units[name]))
        await self._stop_many({name})
        rollout.report(name, "stopped")
        self._units[name].spec = spec
        self.start_nowait(name)
        if not await self._come_up(name, rollout):
            return False
        log.info("unit.replaced", unit=name)
        return True

    async def _come_up(self, name: str, rollout: Rollout) -> bool:
        """Report a unit the rollout started until it is RUNNING (and, in a group,
        admitted: taking traffic) or has failed. BACKOFF counts as failed: the new
        spec failed once; the restart policy goes on, the rollout does not."""
        snap = await self.wait_state(name, lambda s: s.state is not State.PENDING)
        if snap.pid is not None:
            rollout.report(name, "started", pid=snap.pid)
        snap = await self.wait_state(
            name, lambda s: s.state in UP_OR_GAVE_UP or s.state is State.BACKOFF
        )
        if snap.state is not State.RUNNING:
            rollout.fail(name, f"{snap.state.value}: {snap.reason}")
            return False
        rollout.report(name, "running", pid=snap.pid)
        spec = self._units[name].spec
        if spec.group and self._admitted_hook is not None:
            if await self._hook(self._admitted_hook, spec, ADMIT_TIMEOUT):
                rollout.report(name, "admitted")
            else:
                rollout.report(name, "not_admitted", f"not routed to within {ADMIT_TIMEOUT:g}s")
        return True

    def _stop_word(self, unit: _Unit) -> str:
        """What stopping a unit means: a live one with a drain hook drains first."""
        return "draining" if self._drain_hook is not None and unit.process_alive else "stopping"

    # -- the lifecycle ---------------------------------------------------------

    def _launch(
        self,
        unit: _Unit,
        adopted: tuple[Placement, Spawned] | None = None,
        reason: str = "start requested",
    ) -> None:
        if unit.active:
            return
        assert self._tg is not None, "engine used outside its context"
        unit.wanted = True
        unit.blocked = False
        if unit.state is State.STOPPING:
            # The last run's processes survived SIGKILL: nothing may start over them.
            self._set_state(unit, State.FATAL, reason=f"cannot start: {unit.reason}")
            return
        # PENDING at once, so a caller that waits for the start never sees the old state.
        self._set_state(unit, State.PENDING, reason=reason)
        unit.failure = None
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
        """The unit is the failure boundary: whatever goes wrong in here ends this
        unit (FATAL, with the reason and a traceback in the log), never the engine."""
        # The task copied its starter's context (a control request's peer, say):
        # the unit's own events carry only the unit.
        structlog.contextvars.clear_contextvars()
        with structlog.contextvars.bound_contextvars(unit=unit.spec.name):
            try:
                with scope:
                    await self._run(unit, adopted)
            except Exception as exc:
                log.exception("unit.crashed", error=_describe(exc))
                unit.failure = f"internal error: {_describe(exc)}"
            finally:
                try:
                    with anyio.CancelScope(shield=True):
                        await self._teardown(unit)
                except Exception as exc:
                    log.exception("unit.teardown_crashed", error=_describe(exc))
                    self._set_state(
                        unit, State.FATAL, reason=f"teardown failed: {_describe(exc)}", force=True
                    )
                finally:
                    # Set whatever happened, so stop_all never waits forever.
                    finished.set()

    async def _run(self, unit: _Unit, adopted: tuple[Placement, Spawned] | None) -> None:
        """Wait for requirements, place, then: start, supervise, decide, back off, again."""
        spec = unit.spec
        if adopted is None:
            try:
                await self._wait_requirements(unit)
                unit.placement = await self._placer.place(spec)
            except RequirementFailed as exc:
                unit.blocked = True
                self._set_state(unit, State.FATAL, reason=str(exc))
                return
            except PlacementFailed as exc:
                self._set_state(unit, State.FATAL, reason=str(exc))
                return
        history = History()
        while True:
            history = history.started(anyio.current_time(), spec.start_limit_interval)
            try:
                if adopted is not None:
                    status, up_for = await self._supervise(unit, *self._take_over(unit, adopted))
                    adopted = None
                else:
                    status, up_for = await self._supervise(unit, *await self._spawn(unit))
            except PortBusy as exc:
                # Often the previous holder is still going away: a failed start.
                log.warning("unit.port_busy", error=str(exc))
                status, up_for = ExitStatus(code=None, signal=None, error=str(exc)), 0.0
            except SpawnError as exc:
                self._set_state(unit, State.FATAL, reason=str(exc))
                return
            decision = decide(spec, status, up_for, history, anyio.current_time())
            if isinstance(decision, Done):
                self._set_state(unit, State.EXITED, reason=decision.reason)
                return
            if isinstance(decision, GiveUp):
                self._set_state(unit, State.FATAL, reason=decision.reason)
                return
            history = decision.history
            unit.restarts += 1
            self._set_state(unit, State.BACKOFF, reason=decision.reason)
            await anyio.sleep(decision.delay)

    async def _wait_requirements(self, unit: _Unit) -> None:
        """Until every requirement is RUNNING; RequirementFailed once one ended for good."""
        for dep_name in unit.spec.requires:
            dep = self._units[dep_name]
            while dep.state is not State.RUNNING:
                if _ended_for_good(dep):
                    raise RequirementFailed(
                        f"requirement {dep_name} {dep.state.value}: {dep.reason or 'not running'}"
                    )
                unit.reason = f"waiting for {dep_name}"
                log.info("unit.waiting", requires=dep_name, state=dep.state.value)
                await dep.changed.wait()

    async def _spawn(self, unit: _Unit) -> tuple[Spawned, LineSubscription | None]:
        spec = unit.spec
        assert unit.placement is not None
        # A log probe listens before the spawn: with a remote agent the first
        # lines can arrive before spawn() returns.
        lines = self._output.subscribe(spec.name, None) if _is_log_probe(spec) else None
        try:
            spawned = await unit.placement.agent.spawn(spawn_request(spec, unit.placement))
        except BaseException:
            if lines is not None:
                lines.close()
            raise
        if lines is not None:
            lines.bind(spawned.pid)
        unit.pid, unit.node, unit.started_at = spawned.pid, spawned.node, time.time()
        unit.process_alive = unit.group_alive = True
        self._set_state(unit, State.STARTING, reason="spawned")
        return spawned, lines

    def _take_over(
        self, unit: _Unit, adopted: tuple[Placement, Spawned]
    ) -> tuple[Spawned, LineSubscription | None]:
        unit.placement, spawned = adopted
        unit.pid, unit.node, unit.started_at = spawned.pid, spawned.node, spawned.start_time
        unit.process_alive = unit.group_alive = True
        self._set_state(unit, State.STARTING, reason="adopted from a previous daemon")
        return spawned, None

    async def _supervise(
        self, unit: _Unit, spawned: Spawned, lines: LineSubscription | None
    ) -> tuple[ExitStatus, float]:
        """Wait ready (or exit first), then exit; tear the rest of the group down.

        Returns how the run ended and how long it was RUNNING.
        """
        spec = unit.spec
        if lines is None and _is_log_probe(spec):
            # Adopted: the line it waits for was printed to the previous daemon's watch.
            spec = replace(spec, ready=None, start_seconds=0.0)
        agent = self._agent_of(unit)
        leader = _ExitBox()
        ready_at: float | None = None
        not_ready: str | None = None
        liveness = _Liveness()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_leader, unit, leader)
            try:
                outcome = await self._wait_ready(spec, leader, lines)
            finally:
                if lines is not None:
                    lines.close()
            if outcome == "ready":
                ready_at = anyio.current_time()
                self._set_state(unit, State.RUNNING, reason="ready")
                if spec.live is not None:
                    tg.start_soon(self._watch_live, unit, spec.live, liveness)
            elif outcome == "timeout":
                timeout = spec.ready.timeout if spec.ready else spec.start_seconds
                not_ready = f"not ready within {timeout:g}s"
                log.warning("unit.not_ready", pid=spawned.pid, timeout=timeout)
                await agent.stop(spec.name, spec.stop_signal.name, spec.stop_timeout)
            await leader.exited.wait()
            liveness.checks.cancel()  # a dead leader is not checked (acting on it finishes)
        assert leader.status is not None
        status = leader.status
        # The truth at once: the leader is gone, whatever of its group is left.
        unit.process_alive = False
        unit.exit_status = status.describe()
        if not_ready is not None:
            status = replace(status, error=f"{not_ready} ({status.describe()})")
        elif liveness.failed is not None:
            status = replace(status, error=f"{liveness.failed} ({status.describe()})")
        self._set_state(unit, State.STOPPING, reason=f"{status.describe()}; tearing down the group")
        await self._after_exit(spec)
        try:
            await agent.wait_exit(spec.name)
        except AgentError as exc:
            log.error("unit.agent_lost", error=str(exc))
        unit.group_alive = False
        await self._gpus_freed(unit)
        up_for = 0.0 if ready_at is None else anyio.current_time() - ready_at
        return status, up_for

    async def _watch_live(self, unit: _Unit, live: LiveSpec, liveness: _Liveness) -> None:
        """Check a RUNNING unit; after ``live.failures`` failed checks in a row,
        withdraw it (the withdraw hook) and kill its group: a hung process
        drains nothing, so it gets SIGKILL at once. The lifecycle then sees the
        exit and decides the restart, the reason starting "liveness: "."""
        with liveness.checks:
            await anyio.sleep(live.grace)
            failed = 0
            while failed < live.failures:
                if await check_live(live):
                    failed = 0
                else:
                    failed += 1
                    log.warning("unit.live_check_failed", failed=failed, of=live.failures)
                if failed < live.failures:
                    await anyio.sleep(live.interval)
        if liveness.checks.cancel_called:
            return
        liveness.failed = (
            f"liveness: {live.kind.value} {live.target} failed {failed} times in a row"
        )
        log.error("unit.not_live", reason=liveness.failed)
        with anyio.CancelScope(shield=True):
            await self._hook(self._withdraw_hook, unit.spec, AFTER_EXIT_TIMEOUT)
            try:
                await self._agent_of(unit).stop(unit.spec.name, "SIGKILL", unit.spec.stop_timeout)
            except AgentError as exc:  # the leader's watch reports what became of it
                log.error("unit.stop_failed", error=str(exc))

    async def _watch_leader(self, unit: _Unit, box: _ExitBox) -> None:
        try:
            status = await self._agent_of(unit).wait_leader_exit(unit.spec.name)
        except AgentError as exc:
            log.error("unit.agent_lost", error=str(exc))
            status = ExitStatus(code=None, signal=None, error=f"agent lost: {exc}")
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
        # STOPPING also when the leader just exited and the exit is not yet
        # handled (the unit still reads STARTING or RUNNING).
        if unit.group_alive or unit.state in (State.STARTING, State.RUNNING):
            self._set_state(
                unit, State.STOPPING, reason="detaching" if detaching else "stop requested"
            )
        if unit.group_alive and not detaching:
            leader_was_alive = unit.process_alive
            if leader_was_alive:
                # Withdrawn, in-flight work finished, and only then the stop signal.
                await self._hook(self._drain_hook, spec, DRAIN_TIMEOUT)
            try:
                status = await self._agent_of(unit).stop(
                    spec.name, spec.stop_signal.name, spec.stop_timeout
                )
            except StopFailed as exc:
                # Still holding what it held (ports, GPUs): the unit stays STOPPING,
                # its placement is kept, and a start is refused until it is gone.
                log.error("unit.stop_failed", error=str(exc))
                unit.reason = f"stop failed: {exc}"
                unit.changed.fire()
                return
            except AgentError as exc:
                log.error("unit.stop_failed", error=str(exc))
                status = None
            unit.process_alive = unit.group_alive = False
            if status is not None and leader_was_alive:
                unit.exit_status = status.describe()
            if leader_was_alive:
                await self._after_exit(spec)
            await self._gpus_freed(unit)
        if unit.placement is not None and not detaching:
            try:
                await self._placer.release(spec)
            except PlacementFailed as exc:
                log.error("unit.release_failed", error=str(exc))
            unit.placement = None
        if unit.failure is not None:
            self._set_state(unit, State.FATAL, reason=unit.failure)
        elif unit.state not in (State.EXITED, State.FATAL, State.STOPPED):
            reason = "detached: left running" if detaching else "stopped"
            self._set_state(unit, State.STOPPED, reason=reason)

    async def _after_exit(self, spec: ServiceSpec) -> None:
        await self._hook(self._after_exit_hook, spec, AFTER_EXIT_TIMEOUT)

    @staticmethod
    async def _hook(hook: Hook | None, spec: ServiceSpec, timeout: float) -> bool:
        """Run a clean-up hook, bounded; a failed or late clean-up never fails the unit.
        False when it failed or ran out of time."""
        if hook is None:
            return True
        try:
            with anyio.fail_after(timeout):
                await hook(spec)
        except Exception as exc:
            name = getattr(hook, "__name__", "?")
            log.warning("unit.hook_failed", hook=name, error=_describe(exc))
            return False
        return True

    async def _gpus_freed(self, unit: _Unit) -> None:
        if self._gpus_freed_hook is None or unit.placement is None or not unit.placement.gpus:
            return
        try:
            await self._gpus_freed_hook(self._snapshot(unit))
        except Exception as exc:  # a failed check never fails the unit
            log.warning("unit.gpu_check_failed", error=_describe(exc))

    # -- stopping many -------------------------------------------------------

    async def _stop_many(self, names: set[str]) -> None:
        """Stop names; a unit is stopped only after its dependents within names are."""
        done = {name: anyio.Event() for name in names}
        dependents = self._dependents_map()

        async def stop_one(name: str) -> None:
            for dependent in dependents.get(name, ()):
                if dependent in done:
                    await done[dependent].wait()
            unit = self._units[name]
            unit.wanted = False
            unit.blocked = False
            if unit.scope is not None:
                unit.scope.cancel()
            if unit.finished is not None:
                await unit.finished.wait()
            done[name].set()

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(stop_one, name)

    def _dependents_map(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name, unit in self._units.items():
            for dep in unit.spec.requires:
                found.setdefault(dep, []).append(name)
        return found

    def _dependents_closure(self, name: str) -> set[str]:
        dependents = self._dependents_map()
        found: set[str] = set()
        todo = [name]
        while todo:
            for dependent in dependents.get(todo.pop(), ()):
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

    def _set_state(self, unit: _Unit, state: State, *, reason: str, force: bool = False) -> None:
        """Check, record, log and publish one transition.

        A transition the table refuses is a bug: it raises inside the unit's
        lifecycle, whose boundary ends that unit FATAL (``force`` is for that
        last word only).
        """
        if not force:
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
        unit.changed.fire()
        self.changed.fire()
        snapshot = self._snapshot(unit)
        for feed in list(self._feeds):
            feed.publish(snapshot)
        if state is State.RUNNING:
            self._unblock_dependents(unit.spec.name)

    def _unblock_dependents(self, name: str) -> None:
        """A requirement is RUNNING again: its wanted dependents that gave up on it start."""
        # Called on every RUNNING: a scan for the blocked, not a dependents map built anew.
        back = [
            dependent
            for dependent, unit in self._units.items()
            if unit.blocked and unit.wanted and not unit.active and name in unit.spec.requires
        ]
        for dependent in back:
            log.info("unit.requirement_back", unit=dependent, requires=name)
            self.start_nowait(dependent)

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
            blocked=unit.blocked,
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


def _ended_for_good(unit: _Unit) -> bool:
    """Settled and not coming back without a new command."""
    if unit.active:
        return False
    return unit.state in (State.EXITED, State.FATAL) or (
        unit.state is State.STOPPED and not unit.wanted
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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
