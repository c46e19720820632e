"""Prometheus metrics: ``GET /metrics`` from `prometheus_client`, off the event loop.

Where the numbers come from:

* unit states, restarts, exits, start durations and probe failures are
  derived from the engine's `Feed` of state changes (`MetricsFollower`,
  on the event loop: a few dict updates per change, no I/O);
* CPU, memory and GPU memory come from a `ResourceMonitor` sample taken
  in the HTTP server's own thread at scrape time (cached briefly, so
  several scrapers share one ``/proc`` walk);
* the daemon's own: control requests by verb and result (`instrument`),
  event-loop lag (`watch_loop_lag`), and prometheus_client's process
  collector (the daemon's CPU, memory, fds).

The scrape thread never touches the engine: it reads a copy of the
follower's tallies taken under a lock. Labels are bounded: unit names,
states, exit reasons (codes and signal names), probe kinds, verbs.
Exit counts come from the stream of changes: should the follower ever lag
so far that the Feed resynchronises, the exits it skipped are not
counted (restarts still are: they are the engine's own count).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .engine import Engine, State, UnitStatus
from .listen import parse_listen
from .resources import Leader, ResourceMonitor

log = structlog.get_logger("dynsup.metrics")

# Model loads take minutes: the buckets reach half an hour.
START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# How old a resource sample a scrape may be served (several scrapers, one walk).
SCRAPE_MAX_AGE = 0.5
LAG_INTERVAL = 0.5
_STATES = [s.value for s in State]
_SIGNAL = re.compile(r"terminated by (SIG[A-Z0-9+]+)")
_CODE = re.compile(r"exit status (-?\d+)")


def exit_reason(snap: UnitStatus) -> str:
    """A bounded label for why a unit's leader ended (never a free-form message)."""
    reason = snap.reason
    if reason.startswith("not ready within"):
        return "not_ready"
    if reason.startswith("agent lost"):
        return "agent_lost"
    text = snap.exit_status or reason
    if match := _SIGNAL.match(text):
        return match.group(1)
    if match := _CODE.match(text):
        return f"exit_{match.group(1)}"
    return "other"


def is_own_exit(old: State | None, snap: UnitStatus) -> bool:
    """The leader ended by itself (or failed its readiness): not a stop we asked for."""
    return (
        snap.state is State.STOPPING
        and old in (State.STARTING, State.RUNNING)
        and snap.reason not in ("stop requested", "detaching")
    )


def probe_kind(engine: Engine, name: str) -> str:
    """The kind of the unit's [ready] probe; "start_seconds" without one."""
    spec = engine.specs.get(name)
    if spec is None or spec.ready is None:
        return "start_seconds"
    return spec.ready.kind.value


@dataclass
class _Tally:
    """What the metrics know of one unit, beyond its current snapshot."""

    snap: UnitStatus
    exits: dict[str, int] = field(default_factory=dict)
    probe_failures: dict[str, int] = field(default_factory=dict)
    last_start: float | None = None  # seconds from spawn to RUNNING, last time
    starting_since: float | None = None


class MetricsFollower:
    """Tallies from the engine's state changes; read from any thread through `copy()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._units: dict[str, _Tally] = {}
        self._requests: dict[tuple[str, str], int] = {}
        # One histogram for the daemon: per unit it would be 16 series each
        # (4,800 lines with 300 units, most of a scrape's time); the unit's
        # last start duration is a gauge of its own instead.
        self._start_buckets = [0] * len(START_BUCKETS)
        self._start_count = 0
        self._start_sum = 0.0
        self.loop_lag = 0.0

    async def follow(self, engine: Engine) -> None:
        """Forever: the present, then every change (a lagging feed resyncs itself)."""
        with engine.subscribe() as changes:
            self.reset(engine.statistics())
            while True:
                self._observe_from(engine, await changes.receive())
                # A burst: take what is queued, then drop units that went away.
                while True:
                    try:
                        self._observe_from(engine, changes.receive_nowait())
                    except anyio.WouldBlock:
                        break
                self.retain(engine.names())

    def _observe_from(self, engine: Engine, snap: UnitStatus) -> None:
        # The spec is looked up only where a probe may have failed: an exit.
        probe = probe_kind(engine, snap.name) if snap.state is State.STOPPING else "ready"
        self.observe(snap, probe)

    def reset(self, snaps: list[UnitStatus]) -> None:
        with self._lock:
            self._units = {s.name: _Tally(s) for s in snaps}

    def retain(self, names: list[str]) -> None:
        keep = set(names)
        if keep != self._units.keys():
            with self._lock:
                self._units = {n: t for n, t in self._units.items() if n in keep}

    def observe(self, snap: UnitStatus, probe: str = "ready") -> None:
        """One change; ``probe`` names the unit's readiness check, for a failure."""
        with self._lock:
            tally = self._units.get(snap.name)
            if tally is None:
                tally = self._units[snap.name] = _Tally(snap)
                old = None
            else:
                old = tally.snap.state
            tally.snap = snap
            if snap.state is State.STARTING and old is not State.STARTING:
                tally.starting_since = snap.since
            elif snap.state is State.RUNNING and tally.starting_since is not None:
                self._started(tally, max(0.0, snap.since - tally.starting_since))
            if snap.state is not State.STARTING:
                tally.starting_since = None
            if is_own_exit(old, snap):
                reason = exit_reason(snap)
                tally.exits[reason] = tally.exits.get(reason, 0) + 1
                if reason == "not_ready":
                    tally.probe_failures[probe] = tally.probe_failures.get(probe, 0) + 1

    def _started(self, tally: _Tally, seconds: float) -> None:
        tally.last_start = seconds
        self._start_count += 1
        self._start_sum += seconds
        for i, bound in enumerate(START_BUCKETS):
            if seconds <= bound:
                self._start_buckets[i] += 1

    def request_done(self, verb: str, result: str) -> None:
        with self._lock:
            key = (verb, result)
            self._requests[key] = self._requests.get(key, 0) + 1

    def copy(self) -> tuple[list[_Tally], dict[tuple[str, str], int], Metric]:
        """A consistent picture for one scrape (tallies are copied, not shared):
        the units, the control requests, the start histogram."""
        with self._lock:
            tallies = [
                _Tally(t.snap, dict(t.exits), dict(t.probe_failures), t.last_start)
                for t in self._units.values()
            ]
            starts = HistogramMetricFamily(
                "dynsup_unit_start_seconds", "Spawn to RUNNING, every unit and start"
            )
            buckets = [(str(b), n) for b, n in zip(START_BUCKETS, self._start_buckets, strict=True)]
            starts.add_metric([], [*buckets, ("+Inf", self._start_count)], self._start_sum)
            return tallies, dict(self._requests), starts


class UnitCollector(Collector):
    """Every metric of dynsup, built per scrape from the follower and a resource sample."""

    def __init__(self, follower: MetricsFollower, monitor: ResourceMonitor) -> None:
        self._follower = follower
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        tallies, requests, starts = self._follower.copy()
        leaders = {
            t.snap.name: Leader(t.snap.pid, t.snap.node, t.snap.gpus)
            for t in tallies
            if t.snap.pid is not None
        }
        try:
            usage = self._monitor.sample(leaders, max_age=SCRAPE_MAX_AGE)
        except Exception as exc:  # a scrape must answer even if /proc or NVML fails
            log.warning("metrics.sample_failed", error=f"{type(exc).__name__}: {exc}")
            usage = {}
        up = GaugeMetricFamily("dynsup_daemon_up", "1 while dynsupd serves metrics")
        up.add_metric([], 1)
        yield up
        lag = GaugeMetricFamily(
            "dynsup_event_loop_lag_seconds", "How late the event loop ran a timer, last look"
        )
        lag.add_metric([], self._follower.loop_lag)
        yield lag
        reqs = CounterMetricFamily(
            "dynsup_control_requests",
            "Control requests by verb and result",
            labels=["verb", "result"],
        )
        for (verb, result), count in sorted(requests.items()):
            reqs.add_metric([verb, result], count)
        yield reqs
        yield starts
        yield from self._unit_metrics(tallies, usage)

    def _unit_metrics(self, tallies: list[_Tally], usage: Mapping[str, Any]) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "dynsup_unit_state", "1 for the unit's current state", labels=["unit", "state"]
        )
        restarts = CounterMetricFamily(
            "dynsup_unit_restarts", "Restarts after an exit", labels=["unit"]
        )
        exits = CounterMetricFamily(
            "dynsup_unit_exits", "Exits not asked for, by reason", labels=["unit", "reason"]
        )
        probes = CounterMetricFamily(
            "dynsup_unit_probe_failures",
            "Readiness probes that gave up (not ready in time)",
            labels=["unit", "probe"],
        )
        last_start = GaugeMetricFamily(
            "dynsup_unit_last_start_seconds", "Spawn to RUNNING, the last start", labels=["unit"]
        )
        gpus = GaugeMetricFamily("dynsup_unit_gpus", "GPUs reserved for the unit", labels=["unit"])
        cpu = CounterMetricFamily(
            "dynsup_unit_cpu_seconds", "CPU time of the unit's processes", labels=["unit"]
        )
        memory = GaugeMetricFamily(
            "dynsup_unit_memory_bytes", "RSS of the unit's whole process group", labels=["unit"]
        )
        gpu_memory = GaugeMetricFamily(
            "dynsup_gpu_memory_used_bytes",
            "GPU memory held by the unit's processes (NVML)",
            labels=["node", "gpu", "unit"],
        )
        for tally in tallies:
            snap = tally.snap
            name = snap.name
            for value in _STATES:
                state.add_metric([name, value], 1 if snap.state.value == value else 0)
            restarts.add_metric([name], snap.restarts)
            for reason, count in sorted(tally.exits.items()):
                exits.add_metric([name, reason], count)
            for probe, count in sorted(tally.probe_failures.items()):
                probes.add_metric([name, probe], count)
            if tally.last_start is not None:
                last_start.add_metric([name], tally.last_start)
            gpus.add_metric([name], len(snap.gpus))
            used = usage.get(name)
            if used is not None:
                cpu.add_metric([name], used.cpu_seconds)
                memory.add_metric([name], used.rss_bytes)
                for gpu, held in used.gpu_memory:
                    gpu_memory.add_metric([snap.node or "", gpu, name], held)
        yield from (state, restarts, exits, probes, last_start, gpus, cpu, memory, gpu_memory)


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def instrument(handlers: Mapping[str, Handler], follower: MetricsFollower) -> dict[str, Handler]:
    """The same handlers, counting each request by verb and result ("ok" or an error code)."""

    def wrap(verb: str, handler: Handler) -> Handler:
        async def counted(args: dict[str, Any]) -> Any:
            try:
                outcome = await handler(args)
            except Exception as exc:  # a cancelled request (client gone) is not counted
                follower.request_done(verb, getattr(exc, "code", "INTERNAL"))
                raise
            follower.request_done(verb, "ok")
            return outcome

        return counted

    return {verb: wrap(verb, handler) for verb, handler in handlers.items()}


async def watch_loop_lag(follower: MetricsFollower, interval: float = LAG_INTERVAL) -> None:
    """How late a timer fires: the event loop's health, as the scrape sees it."""
    while True:
        began = anyio.current_time()
        await anyio.sleep(interval)
        follower.loop_lag = max(0.0, anyio.current_time() - began - interval)


class MetricsServer:
    """The /metrics HTTP server: prometheus_client's, in threads of its own."""

    def __init__(self, listen: str, follower: MetricsFollower, monitor: ResourceMonitor) -> None:
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(UnitCollector(follower, monitor))
        ProcessCollector(namespace="dynsup_daemon", registry=self.registry)
        self._server: WSGIServer | None = None

    def start(self) -> None:
        """Bind and serve; OSError when the address is taken."""
        self._server, _thread = start_http_server(self.port, self.host, registry=self.registry)
        self.port = self._server.server_port
        log.info("metrics.listening", address=f"{self.host}:{self.port}")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


async def serve(
    listen: str,
    follower: MetricsFollower,
    monitor: ResourceMonitor,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """GET /metrics until cancelled. An address in use costs the metrics, not the units."""
    server = MetricsServer(listen, follower, monitor)
    try:
        server.start()
    except OSError as exc:
        log.error("metrics.bind_failed", address=listen, error=str(exc))
        task_status.started()
        return
    task_status.started()
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.close)
