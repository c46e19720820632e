"""Rolling changes as the engine carries them out: the steps a watcher sees.

Real processes (sleepers) in one group stand for a model's replicas; an
`admitted` hook stands for the frontend that routes to them. What a rollout
reports must follow what happened: each replica drained (stopped), its new
process started, RUNNING and admitted before the next one is touched; a
replacement that cannot come up is named, and the rest keep their old spec.
"""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest

from dynsup.engine import Rollout, State
from dynsup.units.spec import ServiceSpec

from .helpers import open_engine, service, wait_for

pytestmark = pytest.mark.anyio

SLEEP = "import time; print('up', flush=True); time.sleep(600)"
NAMES = ("tiny-0", "tiny-1")


def replicas(code: str = SLEEP, **fields: object) -> dict[str, ServiceSpec]:
    return {name: service(name, code, group="tiny", **fields) for name in NAMES}


def changed(specs: dict[str, ServiceSpec], **env: str) -> dict[str, ServiceSpec]:
    return {
        name: replace(spec, environment=spec.environment + tuple(env.items()))
        for name, spec in specs.items()
    }


async def settle(rollout: Rollout, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        await rollout.done.wait()


def steps_of(rollout: Rollout) -> list[tuple[str, str]]:
    return [(step.unit, step.step) for step in rollout.steps]


async def test_an_update_of_a_group_reports_each_replica_drained_started_running_admitted() -> None:
    admitted: list[str] = []

    async def admit(spec: ServiceSpec) -> None:
        admitted.append(spec.name)

    specs = replicas()
    async with open_engine(*specs.values(), admitted=admit) as engine:
        engine.start_autostart()
        old = {name: (await wait_for(engine, name, State.RUNNING)).pid for name in NAMES}
        rollout = engine.begin_apply(changed(specs, VERSION="2"))
        await settle(rollout)
        assert rollout.failed == {}
        assert steps_of(rollout) == [
            ("tiny", "rolling"),
            *[
                (name, step)
                for name in NAMES
                for step in ("stopping", "stopped", "started", "running", "admitted")
            ],
        ]
        new = {s.name: s.pid for s in engine.statistics()}
        started = {s.unit: s.pid for s in rollout.steps if s.step == "started"}
        assert started == new and not set(new.values()) & set(old.values())
        assert admitted == list(NAMES)


async def test_begin_apply_returns_before_the_replicas_are_replaced() -> None:
    specs = replicas()
    async with open_engine(*specs.values()) as engine:
        engine.start_autostart()
        old = {name: (await wait_for(engine, name, State.RUNNING)).pid for name in NAMES}
        rollout = engine.begin_apply(changed(specs, VERSION="2"))
        # Requested, not carried out: the plan is known, every old replica still runs.
        assert set(rollout.plan.changed) == set(NAMES)
        assert not rollout.done.is_set()
        assert {s.name: s.pid for s in engine.statistics()} == old
        # The next change waits for this one (write verbs apply one at a time).
        with pytest.raises(RuntimeError, match="in progress"):
            engine.begin_apply(specs)
        with anyio.fail_after(60):
            await engine.rollout_settled()
        assert rollout.failed == {}


async def test_a_replica_that_cannot_start_halts_the_rollout_and_is_named() -> None:
    specs = replicas()
    async with open_engine(*specs.values()) as engine:
        engine.start_autostart()
        old = {name: (await wait_for(engine, name, State.RUNNING)).pid for name in NAMES}
        # start_seconds: it must stay up that long to count as RUNNING; it exits at once.
        broken = {
            name: replace(
                spec, command=(*spec.command[:2], "import sys; sys.exit(2)"), start_seconds=30.0
            )
            for name, spec in specs.items()
        }
        rollout = engine.begin_apply(broken)
        await settle(rollout)
        assert list(rollout.failed) == ["tiny-0"]
        assert "exit status 2" in rollout.failed["tiny-0"], rollout.failed
        assert ("tiny-1", "kept") in steps_of(rollout)
        # The replica not yet replaced keeps serving with its old spec.
        assert engine.statistics(["tiny-1"])[0].pid == old["tiny-1"]
        assert engine.statistics(["tiny-1"])[0].state is State.RUNNING


async def test_a_scale_up_and_down_reports_the_added_and_the_removed() -> None:
    specs = replicas()
    async with open_engine(*specs.values()) as engine:
        engine.start_autostart()
        for name in NAMES:
            await wait_for(engine, name, State.RUNNING)
        more = {**specs, "tiny-2": service("tiny-2", SLEEP, group="tiny")}
        up = engine.begin_apply(more)
        await settle(up)
        assert steps_of(up) == [("tiny-2", "started"), ("tiny-2", "running")]
        down = engine.begin_apply(specs)
        await settle(down)
        assert steps_of(down) == [
            ("tiny-2", "stopping"),
            ("tiny-2", "stopped"),
            ("tiny-2", "removed"),
        ]
        assert engine.names() == list(NAMES)
