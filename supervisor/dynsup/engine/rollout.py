"""One applied reload, as it happens: the steps it takes, for whoever watches it.

`Engine.begin_apply` returns a `Rollout` at once and carries the change out
in the engine's own task group, so a client that leaves (`update --no-wait`,
Ctrl-C) never cuts a rolling update in half. The steps are kept (a few per
unit), so a watcher that comes late, or reads slowly, still sees every one
in order: `follow()` reads the list from its start, then waits for more.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from ..broadcast import Pulse
from .reload import ReloadPlan

log = structlog.get_logger("dynsup.engine")


@dataclass(frozen=True)
class Step:
    """One thing a rollout did to one unit (or, for "rolling", to a group)."""

    unit: str
    # "rolling" (a group's order) | "draining" | "stopping" | "stopped" | "removed"
    # | "started" | "running" | "admitted" | "not_admitted" | "failed" | "kept"
    step: str
    detail: str = ""
    pid: int | None = None
    time: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "step": self.step,
            "detail": self.detail,
            "pid": self.pid,
            "time": self.time,
        }


class Rollout:
    """The steps of one `apply`, its failures, and whether it is done."""

    def __init__(self, plan: ReloadPlan) -> None:
        self.plan = plan
        self.steps: list[Step] = []
        self.failed: dict[str, str] = {}  # unit -> why it did not come up
        self.done = anyio.Event()
        self.scope = anyio.CancelScope()  # cancelled when the daemon stops mid-way
        self._pulse = Pulse()

    def report(self, unit: str, step: str, detail: str = "", pid: int | None = None) -> None:
        self.steps.append(Step(unit, step, detail, pid))
        log.info("rollout.step", unit=unit, step=step, detail=detail or None, pid=pid)
        self._pulse.fire()

    def fail(self, unit: str, reason: str) -> None:
        self.failed[unit] = reason
        self.report(unit, "failed", reason)

    def finish(self) -> None:
        self.done.set()
        self._pulse.fire()

    async def follow(self) -> AsyncIterator[Step]:
        """Every step from the first, then each new one, until the rollout is done."""
        seen = 0
        while True:
            while seen < len(self.steps):
                seen += 1
                yield self.steps[seen - 1]
            if self.done.is_set():
                return
            # No await since the length was read: a step reported now fires this pulse.
            await self._pulse.wait()
