"""`dynsupd`: wire the rooms together and run in the foreground.

    dynsupd [--config FILE] [--socket PATH] [--state-dir DIR] [--log-format F] [UNIT_DIR...]

Exit codes: 0 after an orderly shutdown (SIGTERM/SIGINT), 2 when the
configuration or a unit file is invalid (nothing is started then).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from . import __version__
from .agent import LocalAgent
from .config import ConfigError, DaemonConfig, load_config
from .engine import Engine, OutputHub
from .logs.structlog_setup import configure_logging
from .units import UnitErrors, load_units
from .units.spec import ServiceSpec

log = structlog.get_logger("dynsup.daemon")

EXIT_OK = 0
EXIT_BAD_CONFIG = 2


@dataclass(frozen=True)
class Settings:
    """The daemon's settings after flags were laid over the file."""

    config: DaemonConfig
    unit_dirs: tuple[str, ...]
    socket: str
    state_dir: Path
    log_format: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dynsupd", description="dynsup: a process supervisor for GPU inference stacks"
    )
    parser.add_argument("unit_dirs", nargs="*", metavar="UNIT_DIR", help="directories of units")
    parser.add_argument("--config", type=Path, help="daemon configuration (TOML)")
    parser.add_argument("--socket", help="control socket path")
    parser.add_argument("--state-dir", help="state directory")
    parser.add_argument("--log-format", choices=["auto", "console", "json"])
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
    state_dir = Path(args.state_dir or config.state_dir or default_state_dir())
    return Settings(
        config=config,
        unit_dirs=unit_dirs,
        socket=args.socket or config.socket,
        state_dir=state_dir,
        log_format=args.log_format or config.log_format,
    )


def load_specs(settings: Settings) -> dict[str, ServiceSpec]:
    context = {"state_dir": str(settings.state_dir)}
    return load_units([Path(d) for d in settings.unit_dirs], context=context)


async def pump_output(agent: LocalAgent, hub: OutputHub) -> None:
    """Move output chunks from the agent to their consumers, as they are printed."""
    cursor = 0
    while True:
        batch = await agent.next_chunks(cursor, timeout=30.0)
        if batch.lost:
            log.warning("output.lost", chunks=batch.lost)
        for chunk in batch.chunks:
            hub.publish(chunk)
        cursor = batch.cursor


async def serve(settings: Settings, specs: dict[str, ServiceSpec]) -> None:
    hub = OutputHub()
    async with LocalAgent() as agent, Engine(agent, hub) as engine, anyio.create_task_group() as tg:
        tg.start_soon(pump_output, agent, hub)
        engine.load(specs)
        log.info("daemon.started", units=len(specs), pid=os.getpid())
        engine.start_autostart()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("daemon.stopping", signal=signal.Signals(signum).name)
                break
        await engine.stop_all()
        tg.cancel_scope.cancel()
    log.info("daemon.stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = resolve_settings(args)
    except ConfigError as exc:
        print(f"dynsupd: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    configure_logging(settings.log_format)
    try:
        specs = load_specs(settings)
    except UnitErrors as exc:
        print(f"dynsupd: invalid units, nothing started:\n{exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    anyio.run(serve, settings, specs)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
