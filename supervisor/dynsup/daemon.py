"""`dynsupd`: wire the rooms together and run in the foreground.

    dynsupd [--config FILE] [--socket PATH] [--state-dir DIR] [--log-format F]
            [--metrics HOST:PORT] [UNIT_DIR...]
    dynsupd --check [--json] [--config FILE] [UNIT_DIR...]

`--check` validates the units and prints what would run (`dynsup.plan`),
starting and binding nothing.

Exit codes: 0 after an orderly shutdown (SIGTERM/SIGINT, `dynsupctl shutdown`),
1 when another dynsupd already serves the socket, 2 when the configuration
or a unit file is invalid (nothing is started then).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus

from . import __version__
from .agent_api import ChunkBatch
from .backends import Backend, open_local_backend, open_ray_backend, ray_wanted
from .commands import Commands
from .config import ConfigError, DaemonConfig, RayConfig, load_config
from .control.paths import socket_path
from .control.protocol import CommandError
from .control.server import AccessPolicy, AlreadyRunning, ControlServer
from .dynamo import StackContext, expand_stack
from .dynamo.admission import admitted
from .dynamo.canary import watch_models
from .dynamo.drain import drain
from .dynamo.withdraw import withdraw_dead, withdraw_leftovers, withdraw_unit
from .engine import Engine, OutputHub, State, UnitStatus, UnknownUnit
from .engine.states import UP_OR_GAVE_UP
from .gpucheck import GpusFreedCheck
from .gpumem import open_probe
from .listen import parse_listen
from .logs import (
    JournalSender,
    JournalSettings,
    RateLimit,
    UnitOutputForwarder,
    configure_logging,
)
from .malloc import fix_mmap_threshold
from .plan import check_units
from .resources import ResourceMonitor
from .sdnotify import Notifier
from .statefile import DesiredState
from .units import UnitErrors, load_units
from .units.spec import ServiceSpec

log = structlog.get_logger("dynsup.daemon")

EXIT_OK = 0
EXIT_ALREADY_RUNNING = 1
EXIT_BAD_CONFIG = 2
# Logged and otherwise ignored: never the default action, which would end the
# daemon and orphan every unit.
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
# STATUS= lines per second at most, however fast units change.
STATUS_RATE = 10
# A background task that failed is restarted after this long (and logged).
_TASK_RESTART_DELAY = 1.0


@dataclass(frozen=True)
class Settings:
    """The daemon's settings after flags were laid over the file."""

    config: DaemonConfig
    unit_dirs: tuple[str, ...]
    socket: str
    state_dir: Path
    log_format: str
    metrics: str = ""  # HOST:PORT of GET /metrics; "" = off


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dynsupd", description="dynsup: a process supervisor for GPU inference stacks"
    )
    parser.add_argument("unit_dirs", nargs="*", metavar="UNIT_DIR", help="directories of units")
    parser.add_argument("--config", type=Path, help="daemon configuration (TOML)")
    parser.add_argument("--socket", help="control socket path")
    parser.add_argument("--state-dir", help="state directory")
    parser.add_argument("--log-format", choices=["auto", "console", "json"])
    parser.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve Prometheus metrics (GET /metrics) here"
    )
    parser.add_argument(
        "--check", action="store_true", help="validate, print what would run, start nothing"
    )
    parser.add_argument("--json", action="store_true", help="--check: the plan as JSON")
    parser.add_argument("--version", action="version", version=f"dynsupd {__version__}")
    return parser.parse_args(argv)


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/dynsup")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "dynsup"


def resolve_settings(args: argparse.Namespace) -> Settings:
    config = load_config(args.config)
    unit_dirs = tuple(args.unit_dirs) or config.units or ("/etc/dynsup/units",)
    # Absolute: children get paths under it (HOME, discovery, data dirs) and
    # some of them resolve relative paths against a directory of their own.
    state_dir = Path(args.state_dir or config.state_dir or default_state_dir()).resolve()
    return Settings(
        config=config,
        unit_dirs=unit_dirs,
        socket=socket_path(args.socket or config.socket or None),
        state_dir=state_dir,
        log_format=args.log_format or config.log_format,
        metrics=metrics_address(args.metrics, config),
    )


def metrics_address(flag: str | None, config: DaemonConfig) -> str:
    """--metrics over [metrics] listen; a malformed flag is a configuration error."""
    if flag is None:
        return config.metrics_listen
    try:
        parse_listen(flag)
    except ValueError as exc:
        raise ConfigError(f"--metrics: {exc}") from None
    return flag


def gpus_per_node(ray: RayConfig) -> int | None:
    """GPUs of one node, which decides when a model's TP group spans nodes."""
    if ray.gpus_per_node > 0:
        return ray.gpus_per_node
    if ray.num_gpus > 0 and not ray.address:
        return ray.num_gpus  # the embedded head is one node
    return None


def load_specs(
    settings: Settings,
    replicas: Mapping[str, int] | None = None,
    models: dict[str, str] | None = None,
    port_blocks: dict[str, int] | None = None,
    slots: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, ServiceSpec]:
    """Read the unit directories and expand model units into the stack's services.

    ``models``, when given, is filled with the model units found (name -> mode).
    ``port_blocks``: the models' port blocks as assigned before; replaced by
    the blocks assigned now. ``slots``: each pool's replica slots, as saved.
    """
    context = {"state_dir": str(settings.state_dir)}
    ray = settings.config.ray
    stack = StackContext(
        state_dir=str(settings.state_dir),
        gpus_per_node=gpus_per_node(ray),
        replicas=replicas or {},
        port_blocks=dict(port_blocks or {}),
        slots=dict(slots or {}),
    )

    def expand(services: dict[str, ServiceSpec], others: dict[str, list[Any]]) -> Any:
        if models is not None:
            models.clear()
            models.update({m.name: m.mode for m in others.get("ModelSpec", [])})
        return expand_stack(services, others, stack)

    specs = load_units([Path(d) for d in settings.unit_dirs], context=context, expand=expand)
    if port_blocks is not None:
        port_blocks.clear()
        port_blocks.update(stack.port_blocks_out)
    return specs


def output_consumer(
    hub: OutputHub, journal: UnitOutputForwarder | None
) -> Callable[[ChunkBatch], None]:
    """What to do with each batch of output the agents pump: probes, tail -f, and
    journald where the daemon forwards (Ray's remote agents)."""

    def consume(batch: ChunkBatch) -> None:
        if batch.lost:
            log.warning("output.lost", chunks=batch.lost)
        for chunk in batch.chunks:
            hub.publish(chunk)
            if journal is not None:
                journal.feed(chunk)

    return consume


def instance_name(state_dir: Path) -> str:
    """This daemon's name on a Ray cluster: stable across its restarts, distinct
    from another daemon's (another host, or another state directory)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def summary(snaps: Iterable[UnitStatus]) -> str:
    """One line for systemd's STATUS=: counts per state, worst first."""
    counts = Counter(s.state for s in snaps)
    order = [State.FATAL, State.BACKOFF, State.STARTING, State.PENDING, State.RUNNING]
    parts = [f"{counts[state]} {state.value.lower()}" for state in order if counts[state]]
    return ", ".join(parts) or "no units running"


async def report_to_systemd(engine: Engine, notifier: Notifier, wanted: set[str]) -> None:
    """STATUS= after changes, at most STATUS_RATE times a second; READY=1 once every
    unit wanted at start has settled.

    Settled means RUNNING, or given up (EXITED/FATAL): a unit that cannot
    start must not hold `systemctl start` until its timeout; STATUS says so.
    Each report reads one snapshot of every unit: with 1,000 units starting,
    one per change would cost the event loop more than the starts do.
    """
    ready_sent = False
    while True:
        snaps = engine.statistics()
        line = summary(snaps)
        settled = all(s.state in UP_OR_GAVE_UP for s in snaps if s.name in wanted)
        if not ready_sent and settled:
            notifier.ready(line)
            log.info("daemon.ready", status=line)
            ready_sent = True
        else:
            notifier.status(line)
        # No await since the snapshot: a change after it wakes this wait.
        await engine.changed.wait()
        await anyio.sleep(1 / STATUS_RATE)  # a burst of changes makes one report


def endpoints(specs: Mapping[str, ServiceSpec]) -> dict[str, str]:
    """The OpenAI URL each router unit (Dynamo's frontend) serves: unit -> URL."""
    return {
        unit: f"{url}/v1"
        for spec in specs.values()
        if spec.registry is not None
        for unit, url in spec.registry.routers
    }


async def announce_endpoints(engine: Engine) -> None:
    """Say where the OpenAI endpoint listens, each time its frontend is RUNNING."""
    with engine.subscribe() as changes:
        async for snap in changes:
            if snap.state is not State.RUNNING:
                continue
            try:
                # Only a unit that binds ports can be a router (cheap to ask first).
                ports = engine.spec(snap.name).ports
            except UnknownUnit:
                continue  # removed by an update since
            url = endpoints(engine.specs).get(snap.name) if ports else None
            if url is not None:
                log.info("daemon.endpoint", unit=snap.name, url=url)


async def keep_running(name: str, task: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run a background task of the daemon; if it fails, log why and run it again.

    The daemon's own helpers (output pump, systemd reports, journal flush)
    are failure boundaries too: a bug in one never takes the daemon down.
    """
    while True:
        try:
            await task(*args)
            return
        except Exception as exc:
            log.exception("daemon.task_failed", task=name, error=f"{type(exc).__name__}: {exc}")
        await anyio.sleep(_TASK_RESTART_DELAY)


def all_running(engine: Engine, names: list[str]) -> bool:
    """Every one of names that is loaded is RUNNING (the canary judges only then)."""
    loaded = [name for name in names if name in engine.specs]
    return all(s.state is State.RUNNING for s in engine.statistics(loaded))


async def flush_journal_on_exit(engine: Engine, journal: UnitOutputForwarder) -> None:
    """A process's last line without a newline reaches journald when the process ends.

    Only where the daemon forwards (Ray); a local agent flushes at the pipes' EOF.
    """
    ended = {State.BACKOFF, State.EXITED, State.FATAL, State.STOPPED}
    with engine.subscribe() as changes:
        async for snap in changes:
            if snap.state in ended:
                journal.flush(snap.name)


class Daemon:
    """The running daemon: owns the agent, the engine and the control server."""

    def __init__(self, settings: Settings, access: AccessPolicy) -> None:
        self.settings = settings
        self.access = access
        self.specs: dict[str, ServiceSpec] = {}
        self.shutdown_requested = anyio.Event()
        self.detach = False  # leave the units running under their agents (an upgrade)
        self.desired = DesiredState.load(settings.state_dir)
        self.models: dict[str, str] = {}
        self.exit_code = EXIT_OK

    def reread(
        self,
        replicas: Mapping[str, int] | None = None,
        slots: Mapping[str, tuple[int, ...]] | None = None,
    ) -> dict[str, ServiceSpec]:
        if replicas is None:
            replicas = self.desired.replicas
        if slots is None:
            slots = self.desired.slots
        blocks = dict(self.desired.port_blocks)
        specs = load_specs(self.settings, replicas, self.models, blocks, slots)
        self.desired.remember_port_blocks(blocks)
        return specs

    async def serve(self, sender: JournalSender | None, journal: JournalSettings) -> None:
        """``sender``: the daemon's own journald socket (None: no journald);
        ``journal``: where units' output goes, by whichever process forwards it."""
        settings = self.settings
        notifier = Notifier.from_env()
        hub = OutputHub()
        server = ControlServer(
            {},
            path=settings.socket,
            read_only_verbs=Commands.READ_ONLY,
            access=self.access,
        )
        # Bind first: a second daemon must refuse before it touches any unit.
        await server.bind()
        ray = settings.config.ray
        if ray_wanted(ray, self.specs):
            log.info("ray.on", address=ray.address or "embedded")
            backend_context = open_ray_backend(
                ray, settings.state_dir, instance_name(settings.state_dir)
            )
        else:
            # The local agent forwards its units' output itself, as it reads it.
            backend_context = open_local_backend(
                settings.config, settings.state_dir, journal if sender is not None else None
            )
        async with backend_context as backend:
            forwarder = None
            if sender is not None and not backend.agent_journals:
                # Remote agents (or an older agent process) send their output
                # here: the daemon forwards it.
                forwarder = UnitOutputForwarder(sender, rate_limit=journal.rate_limit)
            # No up-front GPU check: what a previous daemon left running is
            # adopted first, and a wanted unit that cannot be placed then goes
            # FATAL alone with the placer's reason (asked vs per node).
            await self._run(server, backend, hub, notifier, sender, forwarder)
        notifier.close()
        log.info("daemon.stopped")

    async def _run(
        self,
        server: ControlServer,
        backend: Backend,
        hub: OutputHub,
        notifier: Notifier,
        sender: JournalSender | None,
        journal: UnitOutputForwarder | None,
    ) -> None:
        desired = self.desired
        monitor = ResourceMonitor(gpus=open_probe)
        async with (
            Engine(
                placer=backend.placer,
                output=hub,
                after_exit=withdraw_dead,
                gpus_freed=GpusFreedCheck(),
                withdraw=withdraw_unit,
                drain=drain,
                admitted=admitted,
            ) as engine,
            anyio.create_task_group() as tg,
        ):
            engine.load(self.specs)
            commands = Commands(
                engine,
                backend.agent,
                hub,
                reread=self.reread,
                desired=desired,
                request_shutdown=self.request_shutdown,
                models=lambda: self.models,
                gpu_table=backend.gpu_table,
                check=backend.check,
                resources=monitor,
                can_detach=backend.can_detach,
            )
            handlers = commands.handlers()
            if self.settings.metrics:
                # prometheus_client costs ~60 ms of start-up: loaded only when asked for.
                from . import metrics

                follower = metrics.MetricsFollower()
                handlers = metrics.instrument(handlers, follower)
                tg.start_soon(keep_running, "metrics", follower.follow, engine)
                tg.start_soon(keep_running, "loop_lag", metrics.watch_loop_lag, follower)
                await tg.start(metrics.serve, self.settings.metrics, follower, monitor)
            server.handlers.update(handlers)
            await tg.start(server.serve)
            # The pump pulls only what the hub's consumers want, unless the
            # daemon forwards units' output to journald itself.
            interest = hub if journal is None else None
            consume = output_consumer(hub, journal)
            tg.start_soon(keep_running, "pump", backend.pump, consume, interest)
            if backend.watch is not None:
                tg.start_soon(keep_running, "backend_watch", backend.watch)
            if journal is not None:
                tg.start_soon(keep_running, "journal_flush", flush_journal_on_exit, engine, journal)
            if sender is not None:  # the daemon's own events, and units' output under Ray
                tg.start_soon(keep_running, "journal_backlog", sender.run_backlog)
            tg.start_soon(keep_running, "watchdog", notifier.run_watchdog)
            tg.start_soon(keep_running, "endpoints", announce_endpoints, engine)
            wanted = {n for n, spec in self.specs.items() if desired.wants(n, spec.autostart)}
            tg.start_soon(keep_running, "systemd", report_to_systemd, engine, notifier, wanted)
            tg.start_soon(
                keep_running,
                "canary",
                watch_models,
                lambda: engine.specs,
                partial(all_running, engine),
                commands.heal,
            )
            # Signals are caught before the first spawn: a SIGTERM from now on is
            # an orderly stop, never the default action that would orphan children.
            await tg.start(self._watch_signals, commands)
            log.info("daemon.started", units=len(self.specs), pid=os.getpid(), socket=server.path)
            if backend.adopt is not None:
                await backend.adopt(engine, self.specs, wanted)
            await withdraw_leftovers(self.specs.values())
            for name in self.specs:
                if name in wanted:
                    engine.start_nowait(name)  # adopted units are already supervised
            await self.shutdown_requested.wait()
            server.begin_shutdown()
            notifier.stopping()
            if self.detach:
                log.info("daemon.detaching")
                backend.detached = True
                await engine.detach_all()
            else:
                await engine.stop_all()
            tg.cancel_scope.cancel()

    def request_shutdown(self, detach: bool = False) -> None:
        self.detach = detach
        self.shutdown_requested.set()

    async def _watch_signals(
        self, commands: Commands, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGTERM/SIGINT: orderly stop. SIGHUP: `update`. SIGUSR1/2, SIGQUIT: logged."""
        watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *IGNORED_SIGNALS)
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(*watched) as signals:
                task_status.started()
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        log.info("daemon.stopping", signal=name)
                        self.shutdown_requested.set()
                    elif signum == signal.SIGHUP:
                        tg.start_soon(self._update_on_sighup, commands)
                    else:
                        log.info("daemon.signal_ignored", signal=name)

    @staticmethod
    async def _update_on_sighup(commands: Commands) -> None:
        """SIGHUP is `dynsupctl update --no-wait` (reread and apply), as for most
        daemons: logged once the plan is accepted; its rollout logs each step."""
        log.info("daemon.reload", signal="SIGHUP")
        try:
            result = await commands.update({"wait": False})
            assert isinstance(result, dict)  # without wait: the answer, no stream
        except CommandError as exc:
            log.error("daemon.reload_refused", code=exc.code, error=exc.message, errors=exc.details)
        except Exception as exc:
            log.exception("daemon.reload_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            log.info(
                "daemon.reloaded",
                added=result["added"],
                changed=sorted(result["changed"]),
                removed=result["removed"],
            )


def survive_signals_until_watched() -> None:
    """Until the event loop watches them, SIGHUP and the ignored signals do nothing.

    A Python handler, not SIG_IGN: an ignored disposition would be inherited
    by every unit across exec, a handler is reset there.
    """
    for signum in (signal.SIGHUP, *IGNORED_SIGNALS):
        signal.signal(signum, lambda *_: None)


def main(argv: list[str] | None = None) -> int:
    survive_signals_until_watched()
    fix_mmap_threshold(128 * 1024)  # see malloc.py
    args = parse_args(argv)
    try:
        settings = resolve_settings(args)
    except ConfigError as exc:
        print(f"dynsupd: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.check:
        return check_units(settings, as_json=args.json)
    config = settings.config
    journal = JournalSettings.from_env(
        RateLimit(config.journal_rate_limit_interval, config.journal_rate_limit_burst)
    )
    sender = JournalSender.open(journal.path)
    # Under systemd, stderr already goes to the journal (JOURNAL_STREAM is set):
    # sending events natively as well would store each one twice.
    own_events = None if os.environ.get("JOURNAL_STREAM") else sender
    configure_logging(settings.log_format, journal=own_events)
    if sender is None:
        log.warning("journal.unavailable", reason="no journald socket; unit output stays in memory")
    try:
        access = AccessPolicy.from_groups(
            settings.config.socket_group, settings.config.readonly_group
        )
    except ValueError as exc:
        print(f"dynsupd: {settings.config.source}: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    daemon = Daemon(settings, access)
    try:
        daemon.specs = daemon.reread()
    except UnitErrors as exc:
        print(f"dynsupd: invalid units, nothing started:\n{exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        anyio.run(daemon.serve, sender, journal)
    except AlreadyRunning as exc:
        print(f"dynsupd: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    return daemon.exit_code


if __name__ == "__main__":
    sys.exit(main())
