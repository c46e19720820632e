"""`dynsupctl top`: a live table of every unit, over SSH too; `q` or Ctrl-C quits.

States come from the daemon's event stream (snapshot, then each change:
a crash shows at once); CPU, memory and GPU memory from a `status` every
`RESOURCES_EVERY` seconds on a second connection. Drawn with Rich, the
optional ``[tui]`` extra: `dynsupctl` itself never imports it.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .control.client import IDLE, Client
from .ctl import clean, format_bytes, format_cpu, format_uptime, trim

RESOURCES_EVERY = 2.0
TICK = 0.25  # how often keys are read and the clock redrawn while nothing happens
_STYLE = {
    "RUNNING": "green",
    "STARTING": "yellow",
    "PENDING": "yellow",
    "BACKOFF": "red",
    "STOPPING": "yellow",
    "FATAL": "bold red",
    "EXITED": "dim",
    "STOPPED": "dim",
}


class Board:
    """What top shows: the last word of the events and of `status` on each unit."""

    def __init__(self, clock: Any = time.time) -> None:
        self.units: dict[str, dict[str, Any]] = {}
        self.clock = clock
        self.resynced = 0

    def on_status(self, result: dict[str, Any]) -> None:
        now = self.clock()
        for info in result.get("units", []):
            unit = self.units.setdefault(info["name"], {})
            unit.update(info)
            if info.get("uptime") is not None:
                unit["running_since"] = now - info["uptime"]

    def on_event(self, event: dict[str, Any]) -> None:
        unit = self.units.setdefault(event["unit"], {"name": event["unit"]})
        if event.get("type") == "resync":
            self.resynced += 1
        unit["state"] = event["new"]
        unit["pid"] = event.get("pid")
        unit["reason"] = event.get("reason")
        unit["restarts"] = event.get("restarts", unit.get("restarts", 0))
        if event["new"] == "RUNNING":
            unit.setdefault("running_since", event.get("time"))
            if event.get("old") != "RUNNING":
                unit["running_since"] = event.get("time")
        else:
            unit["running_since"] = None
            unit["cpu_percent"] = unit["rss_bytes"] = unit["gpu_memory_bytes"] = None

    def table(self) -> Table:
        now = self.clock()
        states = [u.get("state", "?") for u in self.units.values()]
        running = states.count("RUNNING")
        title = f"dynsup top: {running}/{len(states)} running  (q quits)"
        table = Table(title=title, expand=True, title_justify="left")
        for column in ("UNIT", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEM", "GPUS"):
            table.add_column(column, no_wrap=True)
        table.add_column("GPU MEM", no_wrap=True)
        table.add_column("REASON", overflow="ellipsis", no_wrap=True)
        for name in sorted(self.units):
            unit = self.units[name]
            state = unit.get("state", "?")
            since = unit.get("running_since")
            table.add_row(
                clean(name),
                Text(state, style=_STYLE.get(state, "")),
                str(unit.get("pid") or "-"),
                format_uptime(now - since) if since else "-",
                str(unit.get("restarts") or 0),
                format_cpu(unit.get("cpu_percent")),
                format_bytes(unit.get("rss_bytes")),
                ",".join(str(g) for g in unit.get("gpus") or []) or "-",
                format_bytes(unit.get("gpu_memory_bytes")) if unit.get("gpus") else "-",
                trim(clean(unit.get("reason") or ""), 60),
            )
        return table


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (single keys, no echo), restored on every way out."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None) -> bool:
    if fd is None:
        return False
    while select.select([fd], [], [], 0)[0]:
        key = os.read(fd, 1)
        if key in (b"q", b"Q", b"\x03", b""):
            return True
    return False


def run(path: str) -> int:
    """Until q or Ctrl-C; 0 then. Connection errors propagate (dynsupctl maps them)."""
    board = Board()
    console = Console()
    with Client(path) as events, Client(path) as status, _keys() as fd:
        board.on_status(status.call("status", {"names": []}))
        refreshed = time.monotonic()
        replies = events.stream("events", {"names": []}, timeout=None, idle=TICK)
        with Live(board.table(), console=console, screen=True, auto_refresh=False) as live:
            try:
                for event in replies:
                    if event is not IDLE:
                        board.on_event(event)
                    if time.monotonic() - refreshed >= RESOURCES_EVERY:
                        board.on_status(status.call("status", {"names": []}))
                        refreshed = time.monotonic()
                    live.update(board.table(), refresh=True)
                    if _quit_pressed(fd):
                        break
            except KeyboardInterrupt:
                pass
    return 0
