"""The daemon side of every `dynsupctl` verb: arguments in, plain JSON out.

Each public coroutine is a control-socket handler. Validation errors become
`CommandError`s with a protocol code; nothing here can take the daemon down.

Write verbs (start, stop, restart, update, scale, ...) are applied one at a
time, under one lock: two `update`s at once run one after the other. Read
verbs never take it. A start's wait for RUNNING happens after the lock is
released, so a slow start never holds up the next command. Reading the unit
directories (file parsing) runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import anyio
import anyio.to_thread
import structlog

from . import __version__
from .agent_api import Agent, AgentError, ServesFollowers
from .broadcast import Feed
from .control.protocol import (
    BAD_ARGUMENTS,
    BAD_CONFIG,
    BAD_NAME,
    FAILED,
    SHUTTING_DOWN,
    CommandError,
    LogData,
    arg,
    names_arg,
)
from .control.server import Handoff, Stream
from .dynamo.slots import pool_of, pool_slots, surge_slots
from .engine import Engine, OutputHub, ReloadPlan, Rollout, State, UnitStatus, UnknownUnit
from .engine.output import ChunkFollower
from .engine.placement import PlacementFailed
from .engine.states import SETTLED_STATES
from .resources import Leader, ResourceMonitor, Usage
from .signals import parse_signal
from .statefile import DesiredState, StateWriteError
from .units import UnitErrors
from .units.spec import ServiceSpec
from .watch import follow_units, state_events

log = structlog.get_logger("dynsup.commands")

PROTOCOL_VERSION = 1
STREAMS = ("stdout", "stderr")
_MAX_TAIL_LINES = 100_000
_TAIL_READ = 1 << 20

# Reads the unit directories again (with replica overrides for model units);
# raises UnitErrors when any file is invalid.
SpecSource = Callable[..., Mapping[str, ServiceSpec]]
# Model units of the directories: name -> mode ("aggregated" | "disaggregated").
ModelSource = Callable[[], Mapping[str, str]]
# The units a write verb is about to start, and those whose resources it frees
# first: raises PlacementFailed when they cannot all be placed (the backend's).
StartCheck = Callable[[Mapping[str, ServiceSpec], Iterable[str]], Awaitable[None]]


def unit_info(snap: UnitStatus, last_line: str | None, gpus: list[str]) -> dict[str, Any]:
    uptime = None
    if snap.state is State.RUNNING and snap.started_at is not None:
        uptime = max(0.0, time.time() - snap.started_at)
    return {
        "name": snap.name,
        "state": snap.state.value,
        "description": snap.description,
        "pid": snap.pid,
        "node": snap.node,
        "gpus": gpus,
        "uptime": uptime,
        "since": snap.since,
        "exit_status": snap.exit_status,
        "reason": snap.reason,
        "restarts": snap.restarts,
        "last_line": last_line,  # the last stderr line (`status -v`)
        "wanted": snap.wanted,
        "blocked": snap.blocked,
    }


def resource_fields(usage: Usage | None) -> dict[str, Any]:
    """What `status` shows of a unit's cost; None where it was not measured."""
    if usage is None:
        return {"cpu_percent": None, "rss_bytes": None, "gpu_memory_bytes": None, "processes": 0}
    return {
        "cpu_percent": None if usage.cpu_percent is None else round(usage.cpu_percent, 1),
        "rss_bytes": usage.rss_bytes,
        "gpu_memory_bytes": usage.gpu_memory_bytes,
        "processes": usage.processes,
    }


def rollout_result(rollout: Rollout, extra: Mapping[str, Any]) -> dict[str, Any]:
    """What update and scale answer: the plan, and how far its rollout got."""
    return {
        **plan_result(rollout.plan),
        "applied": True,
        "settled": rollout.done.is_set(),
        "progress": [step.as_json() for step in rollout.steps],
        "failed": [{"unit": u, "reason": r} for u, r in rollout.failed.items()],
        **extra,
    }


def plan_result(plan: ReloadPlan) -> dict[str, Any]:
    return {
        "added": list(plan.added),
        "changed": {name: list(fields) for name, fields in plan.changed.items()},
        "removed": list(plan.removed),
    }


class Commands:
    def __init__(
        self,
        engine: Engine,
        agent: Agent,
        hub: OutputHub,
        *,
        reread: SpecSource,
        desired: DesiredState,
        request_shutdown: Callable[[bool], None],
        models: ModelSource | None = None,
        gpu_table: Callable[[], Any] | None = None,
        check: StartCheck | None = None,
        resources: ResourceMonitor | None = None,
        can_detach: bool | None = None,
    ) -> None:
        self._engine = engine
        # Units that outlive the daemon (Ray agents, the agent process); default: with Ray.
        self._can_detach = gpu_table is not None if can_detach is None else can_detach
        self._agent = agent
        self._hub = hub
        self._reread = reread
        self._desired = desired
        self._request_shutdown = request_shutdown
        self._models = models or (lambda: {})
        self._gpu_table = gpu_table
        self._check = check
        self._resources = resources or ResourceMonitor()
        self._shutting_down = False
        self._writing = anyio.Lock()  # write verbs, one at a time

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "status": self.status,
            "start": self.start,
            "stop": self.stop,
            "restart": self.restart,
            "signal": self.signal,
            "pid": self.pid,
            "tail": self.tail,
            "reread": self.reread,
            "update": self.update,
            "avail": self.avail,
            "shutdown": self.shutdown,
            "version": self.version,
            "scale": self.scale,
            "gpus": self.gpus,
            "events": self.events,
        }

    READ_ONLY = frozenset({"status", "pid", "tail", "reread", "avail", "version", "gpus", "events"})

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """The write lock, once the last rollout (an update or scale that returned
        early, `--no-wait`) is done: write verbs still apply one at a time."""
        async with self._writing:
            await self._engine.rollout_settled()
            yield

    # -- names ---------------------------------------------------------------

    def _select(self, args: Mapping[str, Any], *, empty_means_all: bool) -> list[str]:
        names = names_arg(args)
        known = self._engine.names()
        if not names:
            if empty_means_all:
                return known
            raise CommandError(BAD_ARGUMENTS, "name at least one unit, or 'all'")
        if "all" in names and "all" not in known:
            return known
        names = list(dict.fromkeys(names))  # each once, in the order given
        loaded = set(known)
        unknown = [n for n in names if n not in loaded]
        if unknown:
            shown = ", ".join(unknown[:20]) + (
                f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
            )
            raise CommandError(BAD_NAME, f"no such unit: {shown}", details=unknown[:1000])
        return names

    async def _info(self, name: str) -> dict[str, Any]:
        snap = self._engine.statistics([name])[0]
        return unit_info(snap, await self._last_line(name), list(snap.gpus))

    async def _last_line(self, name: str) -> str | None:
        try:
            read = await self._agent.tail_log(name, "stderr", 1)
        except AgentError:
            return None
        line = read.data.decode("utf-8", "replace").strip()
        return line[-200:] or None

    # -- read verbs ----------------------------------------------------------

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        names = self._select(args, empty_means_all=True)
        return await self._units(names)

    async def pid(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("name")
        if name is None:
            return {"pid": os.getpid()}
        if not isinstance(name, str):
            raise CommandError(BAD_ARGUMENTS, "'name' must be a unit name")
        try:
            snap = self._engine.statistics([name])[0]
        except UnknownUnit:
            raise CommandError(BAD_NAME, f"no such unit: {name}", details=[name]) from None
        return {"pid": snap.pid}

    async def avail(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            specs = dict(await self._read_specs())
        except CommandError:
            specs = {}
        loaded = self._engine.specs
        names = sorted(set(specs) | set(loaded))
        return {
            "units": [
                {
                    "name": name,
                    "in_use": name in loaded,
                    "autostart": (specs.get(name) or loaded[name]).autostart,
                    "kind": "service",
                }
                for name in names
            ]
        }

    async def version(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"version": __version__, "protocol": PROTOCOL_VERSION}

    async def events(self, args: dict[str, Any]) -> Stream:
        """Every unit's state (or the named ones'), then every change, until the client leaves."""
        names = self._select(args, empty_means_all=True)
        selected = set(names) if names_arg(args) else None
        feed = self._engine.subscribe()
        # No await since the subscription: the stream starts from this present.
        present = self._engine.statistics(names)
        return Stream(state_events(feed, present, selected))

    async def tail(self, args: dict[str, Any]) -> dict[str, Any] | Stream | Handoff:
        """The last lines of a unit's stream; with follow, then everything it prints.

        Without ``stream``: both streams (a Dynamo process writes everything to
        stderr). The past lines come as ``{"parts": [{"stream", "data"}, ...]}``
        (the ring buffers keep no times, so stdout's and stderr's past cannot
        be interleaved); what follows, as ``{"stream", "data", "missed"}`` in
        the order it was printed. With ``raw`` (follow of one unit), what
        follows is ``{"stream", "missed", "size"}`` and that many bytes after
        the line, as printed: no escaping in the daemon, no parsing in the
        client.

        With ``names`` (several units, or "all") and follow: one stream of every
        named unit's output, each event naming its unit (both streams unless
        ``stream`` is given).
        """
        if "names" in args:
            return await self._tail_many(args)
        name = args.get("name")
        stream = args.get("stream")
        lines = arg(args, "lines", int, 10)
        follow = arg(args, "follow", bool, False)
        raw = arg(args, "raw", bool, False)
        if not isinstance(name, str) or name not in self._engine.names():
            raise CommandError(BAD_NAME, f"no such unit: {name}", details=[str(name)])
        if stream is not None and stream not in STREAMS:
            raise CommandError(BAD_ARGUMENTS, "'stream' must be 'stdout' or 'stderr'")
        if not 0 <= lines <= _MAX_TAIL_LINES:
            raise CommandError(BAD_ARGUMENTS, f"'lines' must be 0..{_MAX_TAIL_LINES}")
        streams = STREAMS if stream is None else (stream,)
        # The agent on this host writes the follow from its rings itself: under a
        # flood, relaying it through the daemon cost more than reading the pipes.
        served = (
            follow and isinstance(self._agent, ServesFollowers) and self._agent.serves_followers
        )
        # Else follow before reading, so nothing printed in between is lost.
        follower = self._hub.follow(name) if follow and not served else None
        positions: dict[str, int] = {}
        parts = []
        try:
            for one in streams:
                read = await self._agent.tail_log(name, one, lines)
                positions[one] = read.end
                parts.append({"stream": one, "data": read.data.decode("utf-8", "replace")})
        except BaseException:
            if follower is not None:
                follower.close()
            raise
        first = {"data": parts[0]["data"], "missed": 0} if stream else {"parts": parts}
        if served:
            agent = cast(ServesFollowers, self._agent)
            return Handoff(
                first,
                lambda sock, request_id: agent.follow(
                    sock, request_id, name, positions, stream is None, raw
                ),
            )
        if follower is None:
            return first
        return Stream(self._follow(follower, positions, first, tagged=stream is None, raw=raw))

    async def _tail_many(self, args: dict[str, Any]) -> Stream:
        names = self._select(args, empty_means_all=False)
        stream = args.get("stream")
        lines = arg(args, "lines", int, 10)
        if stream is not None and stream not in STREAMS:
            raise CommandError(BAD_ARGUMENTS, "'stream' must be 'stdout' or 'stderr'")
        if not 0 <= lines <= _MAX_TAIL_LINES:
            raise CommandError(BAD_ARGUMENTS, f"'lines' must be 0..{_MAX_TAIL_LINES}")
        if not arg(args, "follow", bool, False):
            raise CommandError(BAD_ARGUMENTS, "several units are tailed with follow only")
        # Follow before reading, so nothing printed in between is lost.
        follower = self._hub.follow(*names)
        streams = STREAMS if stream is None else (stream,)
        return Stream(follow_units(self._agent, follower, streams, lines))

    @staticmethod
    async def _follow(
        follower: ChunkFollower,
        positions: dict[str, int],
        first: dict[str, Any],
        *,
        tagged: bool,
        raw: bool,
    ) -> AsyncIterator[dict[str, Any] | LogData]:
        """``first``, then each chunk of the followed streams past ``positions``;
        ``tagged`` events name their stream (more than one is followed)."""
        try:
            yield first
            async for chunk in follower.chunks():
                position = positions.get(chunk.stream)
                if position is None:
                    continue
                end = chunk.offset + len(chunk.data)
                if end <= position:
                    continue  # already sent with the first read
                missed = max(0, chunk.offset - position)
                data = chunk.data[max(0, position - chunk.offset) :]
                positions[chunk.stream] = end
                yield LogData(data, missed, chunk.stream if tagged else None, raw)
        finally:
            follower.close()

    # -- write verbs ---------------------------------------------------------

    async def _remember(self, names: Iterable[str], wanted: bool) -> None:
        """Save the units' desired state first: a command whose write fails changes nothing."""
        specs = self._engine.specs
        changes = [(name, wanted, specs[name].autostart) for name in names if name in specs]
        await self._save(self._desired.set_many, changes)

    @staticmethod
    async def _save(change: Callable[..., None], *args: Any) -> None:
        """Write state.toml in a worker thread (its fsyncs must not stall the event
        loop); a failed write refuses the command, and nothing was changed."""
        with _saving():
            await anyio.to_thread.run_sync(change, *args)

    async def start(self, args: dict[str, Any]) -> dict[str, Any] | Stream:
        return await self._start(args, restart=False)

    async def restart(self, args: dict[str, Any]) -> dict[str, Any] | Stream:
        return await self._start(args, restart=True)

    async def _start(self, args: dict[str, Any], *, restart: bool) -> dict[str, Any] | Stream:
        names = self._select(args, empty_means_all=False)
        wait = arg(args, "wait", bool, True)
        async with self._write():
            self._check_running()
            await self._remember(names, True)
            followers: list[str] = []
            if restart:

                async def stop_one(name: str) -> None:
                    followers.extend(await self._engine.stop_for_restart(name))

                async with anyio.create_task_group() as tg:
                    for name in names:
                        tg.start_soon(stop_one, name)
            # Subscribe before starting, so no transition is missed by the watcher.
            changes = self._engine.subscribe()
            for name in [*names, *followers]:
                self._engine.start_nowait(name)
            # The present, with no await since the subscription: the watcher
            # starts from it and follows changes (a resync if it falls behind).
            pending = {s.name for s in self._engine.statistics(names) if not _settled(s)}
        if not wait:
            changes.close()
            return await self._units(names)
        return Stream(self._watch_start(changes, pending), final=lambda: self._units(names))

    async def _watch_start(
        self, changes: Feed[UnitStatus], pending: set[str]
    ) -> AsyncIterator[dict[str, Any]]:
        """Progress snapshots while the units start, until each has settled."""
        with changes:
            watched = set(pending)
            if not pending:
                return  # already settled: nothing to watch
            async for snap in changes:
                if snap.name not in watched:
                    continue
                # Progress only (the final answer carries each unit's last line):
                # a tail read per event would cost an agent call per transition.
                yield unit_info(snap, None, list(snap.gpus))
                if _settled(snap):
                    pending.discard(snap.name)
                    if not pending:
                        return

    async def _units(self, names: list[str]) -> dict[str, Any]:
        usage = await self._usage(names)
        units = []
        for name in names:
            info = await self._info(name)
            units.append({**info, **resource_fields(usage.get(name))})
        return {"units": units}

    async def _usage(self, names: list[str]) -> dict[str, Usage]:
        """CPU, memory and GPU memory of the units' process trees (a /proc walk:
        in a worker thread). Fresh within a second: `top` and scrapers share it."""
        leaders = {
            s.name: Leader(s.pid, s.node, s.gpus)
            for s in self._engine.statistics(names)
            if s.pid is not None
        }
        if not leaders:
            return {}
        return await anyio.to_thread.run_sync(self._resources.sample, leaders, 1.0)

    async def stop(self, args: dict[str, Any]) -> dict[str, Any]:
        names = self._select(args, empty_means_all=False)
        async with self._write():
            await self._remember(names, False)
            selected = set(names)
            if selected == set(self._engine.names()):
                await self._engine.stop_all()
            else:
                async with anyio.create_task_group() as tg:
                    for name in names:
                        tg.start_soon(self._engine.stop, name)
        return await self._units(names)

    async def signal(self, args: dict[str, Any]) -> dict[str, Any]:
        names = self._select(args, empty_means_all=False)
        sig = args.get("signal")
        try:
            signum = parse_signal(sig)  # type: ignore[arg-type]
        except ValueError:
            raise CommandError(BAD_ARGUMENTS, f"not a signal: {sig!r}") from None
        signalled, not_running = [], []
        for name in names:
            try:
                await self._engine.send_signal(name, signum.name)
                signalled.append(name)
            except AgentError:
                not_running.append(name)
        return {"signalled": signalled, "not_running": not_running}

    async def reread(self, args: dict[str, Any]) -> dict[str, Any]:
        return plan_result(self._engine.plan(await self._read_specs()))

    async def update(self, args: dict[str, Any]) -> dict[str, Any] | Stream:
        """Apply the unit files. With ``wait`` (the default): a `Stream` of the
        rollout's steps, then the result once it has settled; without, the
        result once the plan is accepted and saved."""
        dry_run = arg(args, "dry_run", bool, False)
        wait = arg(args, "wait", bool, True)
        wanted = names_arg(args)
        if dry_run:
            dropped, kept = await self._scale_overrides(drop_stale=not wanted)
            return {
                **plan_result(self._engine.plan(await self._update_specs(wanted, kept))),
                "applied": False,
                "overrides_dropped": dropped,
            }
        async with self._write():
            self._check_running()
            # A whole update lets a changed `replicas` in a file win over `scale`.
            dropped, kept = await self._scale_overrides(drop_stale=not wanted)
            new_specs = await self._update_specs(wanted, replicas=kept)
            # Names given: only those move, so no pool's slots do.
            surging = {} if wanted else await self._surge_pools(new_specs)
            if surging:
                slots = {**self._desired.slots, **surging}
                new_specs = await self._update_specs(wanted, replicas=kept, slots=slots)
            await self._check_starts(new_specs)
            if surging:
                # Saved before the surge starts: a daemon restarted midway expands
                # the new names, adopts the new replicas and stops the old ones.
                await self._save(self._desired.set_slots, surging)
            await self._save(self._desired.forget_except, set(new_specs))
            if dropped:
                await self._save(self._desired.drop_replicas, [d["pool"] for d in dropped])
                for drop in dropped:
                    log.warning("scale.override_dropped", **drop)
            rollout = self._engine.begin_apply(new_specs)
        in_force = await self._overrides_in_force()
        for override in in_force:
            log.warning("scale.override_in_force", **override)
        extra = {"overrides_dropped": dropped, "overrides": in_force}
        return self._rollout_reply(rollout, wait, extra)

    def _rollout_reply(
        self, rollout: Rollout, wait: bool, extra: dict[str, Any]
    ) -> dict[str, Any] | Stream:
        """An update's or scale's answer: at once (no wait), or its steps as events
        (the stream `start` and `events` use), then the result once settled."""
        if not wait:
            return rollout_result(rollout, extra)

        async def steps() -> AsyncIterator[dict[str, Any]]:
            async for step in rollout.follow():
                yield step.as_json()

        return Stream(steps(), final=lambda: rollout_result(rollout, extra))

    async def _scale_overrides(self, *, drop_stale: bool) -> tuple[list[dict[str, Any]], Any]:
        """The `scale` overrides whose unit file changed since (to drop), and the
        counts to read the files with (None: every saved one)."""
        saved = dict(self._desired.replicas)
        if not drop_stale or not (self._desired.replicas_file.keys() & saved.keys()):
            return [], None
        in_file = await self._read_specs(replicas={})
        dropped, kept = [], {}
        for pool, count in saved.items():
            made_against = self._desired.replicas_file.get(pool)
            now = _pool_size(in_file, pool)
            if made_against is not None and now != made_against:
                dropped.append({"pool": pool, "replicas": count, "was": made_against, "file": now})
            else:
                kept[pool] = count
        return dropped, kept

    async def _overrides_in_force(self) -> list[dict[str, Any]]:
        """Each `scale` override that differs from its unit file's count."""
        saved = dict(self._desired.replicas)
        if not saved:
            return []
        in_file = await self._read_specs(replicas={})
        return [
            {"pool": pool, "replicas": count, "file": _pool_size(in_file, pool)}
            for pool, count in sorted(saved.items())
            if count != _pool_size(in_file, pool)
        ]

    async def _surge_pools(
        self, new_specs: Mapping[str, ServiceSpec]
    ) -> dict[str, tuple[int, ...]]:
        """The pools new_specs changes that roll by surge, with their new slots.

        A pool surges when its model allows it (`[model] surge`), every replica
        is RUNNING and changed, its count stays (a count that changes too rolls
        drain first, as a scale with a change), and
        one more replica fits beside them with nothing freed (always without
        GPUs; with GPUs, as the placement check says). Otherwise it rolls drain
        first, on its own slots.
        """
        plan = self._engine.plan(new_specs)
        current = self._engine.specs
        running = {s.name for s in self._engine.statistics() if s.state is State.RUNNING}
        pools: dict[str, list[tuple[int, str]]] = {}
        for name, spec in current.items():
            found = pool_of(name, spec.group) if spec.group else None
            if found is not None:
                pools.setdefault(found[0], []).append((found[1], name))
        surging: dict[str, tuple[int, ...]] = {}
        for pool, members in sorted(pools.items()):
            names = [name for _, name in members]
            slots = pool_slots(self._desired.slots.get(pool, ()), len(members))
            if (
                sorted(slots) != sorted(slot for slot, _ in members)
                or _pool_size(new_specs, pool) != len(members)  # a count change too: no
                or not all(n in plan.changed and n in running for n in names)
                or not all(new_specs[n].surge for n in names)
                or not await self._spare_fits(new_specs[names[0]], pool)
            ):
                continue
            surging[pool] = surge_slots(slots)
        return surging

    async def _spare_fits(self, spec: ServiceSpec, pool: str) -> bool:
        """Does one more replica like spec fit now, with nothing stopped first?"""
        if spec.gpus == 0:
            return True
        if self._check is None:
            return False
        try:
            await self._check({f"{spec.name}~spare": spec}, [])
        except PlacementFailed as exc:
            log.info("update.no_surge", pool=pool, reason=str(exc))
            return False
        return True

    async def _update_specs(
        self,
        wanted: list[str],
        replicas: Mapping[str, int] | None = None,
        slots: Mapping[str, tuple[int, ...]] | None = None,
    ) -> dict[str, ServiceSpec]:
        """The specs an update applies: the whole directory, validated as a whole;
        with names, only those move (each must be a unit loaded or in the files)."""
        overrides: dict[str, Any] = {"replicas": replicas}
        if slots is not None:
            overrides["slots"] = slots
        new_specs = dict(await self._read_specs(**overrides))
        if wanted:
            unknown = [n for n in wanted if n not in new_specs and n not in self._engine.specs]
            if unknown:
                raise CommandError(BAD_NAME, f"no such unit: {', '.join(unknown)}", details=unknown)
            # Only the named units move; the others keep their current spec.
            current = self._engine.specs
            for name in set(current) | set(new_specs):
                if name not in wanted:
                    if name in current:
                        new_specs[name] = current[name]
                    else:
                        new_specs.pop(name, None)
        return new_specs

    async def heal(self, names: list[str], reason: str) -> None:
        """Not a verb: the daemon's model canary restarts units, a write like the others."""
        async with self._write():
            if self._shutting_down:
                return
            await self._engine.heal([n for n in names if n in self._engine.specs], reason)

    async def scale(self, args: dict[str, Any]) -> dict[str, Any] | Stream:
        """`scale MODEL[:ROLE] N`: add or remove replicas, touching no other unit.
        With ``reset``: back to the unit file's count (the override is dropped).

        The file's count at the time is saved with the override: a later change
        of `replicas` in the file wins at the next `update`."""
        target = args.get("name")
        count = args.get("replicas")
        reset = arg(args, "reset", bool, False)
        wait = arg(args, "wait", bool, True)
        if not isinstance(target, str) or not target:
            raise CommandError(BAD_ARGUMENTS, "'name' must be MODEL or MODEL:ROLE")
        if reset and count is not None:
            raise CommandError(BAD_ARGUMENTS, "give 'replicas' or 'reset', not both")
        if not reset and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise CommandError(BAD_ARGUMENTS, "'replicas' must be an integer >= 0")
        model, _, role = target.partition(":")
        modes = self._models()
        if model not in modes:
            raise CommandError(BAD_NAME, f"no model unit named {model!r}", details=[model])
        disaggregated = modes[model] == "disaggregated"
        if disaggregated and role not in ("prefill", "decode"):
            raise CommandError(
                BAD_ARGUMENTS, f"{model} is disaggregated: scale {model}:prefill or :decode"
            )
        if not disaggregated and role:
            raise CommandError(BAD_ARGUMENTS, f"{model} is aggregated: scale {model} N")
        async with self._write():
            self._check_running()
            in_file = _pool_size(await self._read_specs(replicas={}), target)
            if count == in_file:
                reset = True  # what the file says: no override to keep
            replicas = {k: v for k, v in self._desired.replicas.items() if k != target}
            if not reset:
                replicas[target] = count
            new_specs = dict(await self._read_specs(replicas=replicas))
            prefix = f"{model}-{role}-" if role else f"{model}-"
            current = self._engine.specs
            # Only this pool's workers move: every other unit keeps its running spec.
            merged = {n: s for n, s in current.items() if not _worker_of(n, prefix)}
            merged.update({n: s for n, s in new_specs.items() if _worker_of(n, prefix)})
            await self._check_starts(merged)
            before = (self._desired.replicas.get(target), self._desired.replicas_file.get(target))
            saved = (None, None) if reset else (count, in_file)
            await self._save(self._desired.set_replicas, target, *saved)
            try:
                rollout = self._engine.begin_apply(merged)
            except BaseException:
                # Refused: the saved count must not outlive the refusal. If even
                # that write fails, the refusal is still what the client hears.
                with anyio.CancelScope(shield=True), contextlib.suppress(CommandError):
                    await self._save(self._desired.set_replicas, target, *before)
                raise
        extra = {"replicas": in_file if reset else count, "reset": reset}
        return self._rollout_reply(rollout, wait, extra)

    async def gpus(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._gpu_table is None:
            return {"ray": False, "gpus": []}
        return {"ray": True, "gpus": await self._gpu_table()}

    async def _check_starts(self, new_specs: Mapping[str, ServiceSpec]) -> None:
        """Refuse, before anything is stopped or spawned, units that cannot be placed.

        The units applying new_specs starts (added autostart units, changed
        wanted ones) are checked together: two that fit alone but not side by
        side are refused as one.
        """
        if self._check is None:
            return
        plan = self._engine.plan(new_specs)
        wanted = {s.name for s in self._engine.statistics() if s.wanted}
        starting = {n: new_specs[n] for n in plan.added if new_specs[n].autostart}
        starting.update({n: new_specs[n] for n in plan.changed if n in wanted})
        try:
            await self._check(starting, [*plan.removed, *plan.changed])
        except PlacementFailed as exc:
            raise CommandError(
                BAD_CONFIG, f"nothing applied: {exc}", details=sorted(starting)
            ) from None

    async def _read_specs(self, **overrides: Any) -> Mapping[str, ServiceSpec]:
        """The unit directories read again, in a worker thread (a 5 MB directory
        must not stall the other clients)."""
        try:
            with _saving():  # rereading saves the models' port blocks
                return await anyio.to_thread.run_sync(lambda: self._reread(**overrides))
        except UnitErrors as exc:
            errors = [str(e) for e in exc.errors]
            raise CommandError(
                BAD_CONFIG, f"{len(errors)} error(s) in the unit files", details=errors
            ) from None

    async def shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        detach = arg(args, "detach", bool, False)
        if detach and not self._can_detach:
            # In-process children would be orphans nobody can adopt.
            raise CommandError(
                BAD_ARGUMENTS,
                "--detach needs Ray agents or the agent process to keep the units running",
            )
        self._shutting_down = True
        self._request_shutdown(detach)
        return {"shutting_down": True, "detach": detach}

    def _check_running(self) -> None:
        if self._shutting_down:
            raise CommandError(SHUTTING_DOWN, "dynsupd is shutting down")


@contextlib.contextmanager
def _saving() -> Iterator[None]:
    """A failed write of state.toml refuses the command (nothing was changed)."""
    try:
        yield
    except StateWriteError as exc:
        raise CommandError(FAILED, f"{exc}; nothing was changed") from None


def _pool_size(specs: Mapping[str, ServiceSpec], pool: str) -> int:
    """How many replicas specs give a pool ("MODEL" or "MODEL:ROLE")."""
    model, _, role = pool.partition(":")
    prefix = f"{model}-{role}-" if role else f"{model}-"
    return sum(1 for name in specs if _worker_of(name, prefix))


def _worker_of(name: str, prefix: str) -> bool:
    """Is name a replica of the pool whose workers are named prefix + index?"""
    return name.startswith(prefix) and name[len(prefix) :].isdigit()


def _settled(snap: UnitStatus) -> bool:
    return snap.state in SETTLED_STATES
