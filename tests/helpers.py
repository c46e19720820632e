"""Small helpers for tests that run real processes."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import psutil

from dynsup.backends import open_local
from dynsup.daemon import output_consumer
from dynsup.engine import Engine, OutputHub, State, UnitStatus
from dynsup.engine.engine import AfterExit
from dynsup.units.spec import ServiceSpec, freeze_env


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", textwrap.dedent(code))


def service(name: str, code: str, **fields: Any) -> ServiceSpec:
    env = fields.pop("environment", {})
    base = ServiceSpec(
        name=name,
        command=python(code),
        environment=freeze_env({**os.environ, **env}),
        start_seconds=fields.pop("start_seconds", 0.0),
        stop_timeout=fields.pop("stop_timeout", 5.0),
    )
    return replace(base, **fields)


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def running(proc: psutil.Process) -> bool:
    """Alive and still the same process (psutil checks its start time), not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@asynccontextmanager
async def open_engine(
    *specs: ServiceSpec, after_exit: AfterExit | None = None, **hooks: Any
) -> AsyncIterator[Engine]:
    """An engine on the daemon's in-process backend, with output pumped to its hub;
    ``hooks``: the Engine's other hooks (drain, admitted, ...)."""
    hub = OutputHub()
    async with (
        open_local() as backend,
        Engine(placer=backend.placer, output=hub, after_exit=after_exit, **hooks) as engine,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(backend.pump, output_consumer(hub, None), hub)
        engine.load({s.name: s for s in specs})
        try:
            yield engine
        finally:
            await engine.stop_all()
            tg.cancel_scope.cancel()


async def wait_for(engine: Engine, name: str, state: State, timeout: float = 20) -> UnitStatus:
    with anyio.fail_after(timeout):
        return await engine.wait_state(name, lambda s: s.state is state)
