"""A real Engine placing units through RayPlacer: GPUs reserved per unit, kept across
restarts, never shared; a dead agent replaced; multi-node ranks on a three-raylet cluster.

Processes run under the per-node agent actor; their GPUs are read back
from the running processes' environment.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import psutil
import pytest

from dynsup.agent_api import ChunkBatch
from dynsup.engine import Engine, OutputHub, State
from dynsup.engine.placement import Placement, Placer
from dynsup.placement import (
    Layout,
    OverCommitError,
    RayHandle,
    Strategy,
    group_name,
    list_groups,
    namespace_for,
    reserve,
)
from dynsup.placement.placer import NOSET_ENV
from dynsup.placement.runtime import RayRuntime, open_runtime
from dynsup.units.spec import ProbeKind, ReadySpec, ServiceSpec, freeze_env
from tests.ray_fixtures import (
    EMBEDDED_GPUS,
    LocalCluster,
    named_actors,
    ray_embedded,
    ray_instance,
    ray_multinode,
    run_driver,
    wait_gone,
)

from .helpers import service

__all__ = ["ray_embedded", "ray_instance", "ray_multinode"]  # fixtures, used by name

pytestmark = [pytest.mark.ray, pytest.mark.anyio]

# Ready once it printed: only then is its environment readable in /proc (a
# process whose exec is still setting up its stack shows an empty one).
SLEEPER = "import time; print('up', flush=True); time.sleep(600)"
UP = ReadySpec(ProbeKind.LOG, r"^up$", timeout=60.0)
SETTLE = 60.0  # generous: an actor's first start takes ~1-2 s here, more under load


@pytest.fixture
def anyio_backend() -> object:
    return ("asyncio", {"debug": True})


@pytest.fixture
def namespace(ray_instance: str) -> Iterator[str]:
    ns = namespace_for(ray_instance)
    yield ns
    left = named_actors(ns)
    assert not left, f"agent actors left by the test: {left}"


@asynccontextmanager
async def open_stack(
    handle: RayHandle, instance: str, namespace: str, *specs: ServiceSpec, **engine: Any
) -> AsyncIterator[tuple[RayRuntime, Engine]]:
    """The runtime and an engine over it (``engine``: more arguments of Engine)."""
    hub = OutputHub()

    def publish(batch: ChunkBatch) -> None:
        for chunk in batch.chunks:
            hub.publish(chunk)

    async with (
        open_runtime(handle, instance, namespace=namespace, reserve_timeout=5.0) as rt,
        anyio.create_task_group() as pumps,
    ):
        pumps.start_soon(rt.pump_output, publish)
        async with Engine(placer=rt.placer, output=hub, **engine) as supervisor:
            supervisor.load({spec.name: spec for spec in specs})
            yield rt, supervisor
        pumps.cancel_scope.cancel()
    assert rt.idle, "the runtime was left with processes running"
    assert await list_groups(instance) == []


async def wait_running(engine: Engine, name: str, *, not_pid: int | None = None) -> int:
    with anyio.fail_after(SETTLE):
        snap = await engine.wait_state(
            name,
            lambda s: s.state in (State.RUNNING, State.FATAL) and s.pid != not_pid,
        )
    assert snap.state is State.RUNNING, snap
    assert snap.pid is not None
    return snap.pid


def visible_devices(pid: int) -> str:
    return psutil.Process(pid).environ()["CUDA_VISIBLE_DEVICES"]


def gpu_unit(name: str, gpus: int = 2) -> ServiceSpec:
    return service(name, SLEEPER, gpus=gpus, ready=UP, restart_delay=0.05, stop_timeout=5.0)


async def test_four_units_get_disjoint_gpus_and_a_fifth_is_refused(
    ray_embedded: RayHandle, ray_instance: str, namespace: str
) -> None:
    specs = [gpu_unit(f"w{i}") for i in range(5)]
    async with open_stack(ray_embedded, ray_instance, namespace, *specs) as (rt, engine):
        (node,) = ray_embedded.nodes()
        # Up front, before anything runs: what was asked and what each node has.
        with pytest.raises(OverCommitError, match=rf"10 GPUs in all.*node {node.node_id}: 8$"):
            await rt.placer.check_fits(specs)
        await rt.placer.check_fits(specs[:4])

        for spec in specs[:4]:
            engine.start_nowait(spec.name)
        pids = [await wait_running(engine, spec.name) for spec in specs[:4]]
        seen = [visible_devices(pid).split(",") for pid in pids]
        assert all(len(ids) == 2 for ids in seen)
        assert sorted(gpu for ids in seen for gpu in ids) == [str(i) for i in range(EMBEDDED_GPUS)]
        assert [engine.statistics([s.name])[0].gpus for s in specs[:4]] == [tuple(i) for i in seen]
        for pid in pids:
            assert psutil.Process(pid).environ()["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

        # The fifth fails at once with the over-commit message; nobody loses a GPU.
        engine.start_nowait("w4")
        with anyio.fail_after(SETTLE):
            fifth = await engine.wait_state("w4", lambda s: s.state is State.FATAL)
        assert "10 GPUs in all" in fifth.reason and f"node {node.node_id}: 8" in fifth.reason
        assert [g.name.rsplit("/", 2)[1] for g in await list_groups(ray_instance)] == [
            "w0",
            "w1",
            "w2",
            "w3",
        ]

        table = rt.gpu_table()
        holders = {row["gpu"]: (row["unit"], row["replica"], row["rank"]) for row in table}
        assert len(table) == EMBEDDED_GPUS
        for spec, ids in zip(specs, seen, strict=False):
            assert all(holders[gpu] == (spec.name, 0, 0) for gpu in ids)


async def test_a_crashed_unit_restarts_with_its_gpus_and_stop_releases_them(
    ray_embedded: RayHandle, ray_instance: str, namespace: str
) -> None:
    spec = gpu_unit("crashy", gpus=4)
    other = gpu_unit("other", gpus=4)
    async with open_stack(ray_embedded, ray_instance, namespace, spec, other) as (rt, engine):
        engine.start_nowait("crashy")
        first = await wait_running(engine, "crashy")
        ids = visible_devices(first)
        os.kill(first, signal.SIGKILL)
        second = await wait_running(engine, "crashy", not_pid=first)
        assert visible_devices(second) == ids
        assert engine.statistics(["crashy"])[0].restarts == 1

        # Stopped, its GPUs go back to the cluster: all 8 can be taken again.
        await engine.stop("crashy")
        assert await list_groups(ray_instance) == []
        assert rt.placer.gpus_of("crashy") == []
        engine.start_nowait("other")
        engine.start_nowait("crashy")
        await wait_running(engine, "other")
        await wait_running(engine, "crashy")


ESCAPER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
print("escapee", child.pid, flush=True)
time.sleep(600)
"""


async def test_a_killed_agent_is_replaced_and_takes_its_processes_along(
    ray_embedded: RayHandle, ray_instance: str, namespace: str
) -> None:
    gpu = gpu_unit("gpu")
    # Ready once it printed its escapee's pid: output comes back through the pump.
    ready = ReadySpec(ProbeKind.LOG, r"^escapee \d+$", timeout=SETTLE)
    plain = service("plain", ESCAPER, ready=ready, restart_delay=0.05)
    async with open_stack(ray_embedded, ray_instance, namespace, gpu, plain) as (rt, engine):
        engine.start_nowait("gpu")
        engine.start_nowait("plain")
        old = {name: await wait_running(engine, name) for name in ("gpu", "plain")}
        ids = visible_devices(old["gpu"])
        old_agent = await rt.local_agent.info()
        printed = await rt.agent.tail_log("plain", "stdout", 1)
        escapee = psutil.Process(int(printed.data.split()[1]))
        assert escapee.environ()["DYNSUP_AGENT"] == old_agent["mark"]

        olds = [psutil.Process(pid) for pid in old.values()] + [escapee]
        olds.append(psutil.Process(old_agent["warden_pid"]))
        os.kill(old_agent["pid"], signal.SIGKILL)
        new = {name: await wait_running(engine, name, not_pid=old[name]) for name in old}
        for name in old:
            snap = engine.statistics([name])[0]
            assert snap.restarts == 1 and snap.exit_status.startswith("agent lost: "), snap
        new_agent = await rt.local_agent.info()
        assert new_agent["pid"] != old_agent["pid"]
        assert {psutil.Process(pid).ppid() for pid in new.values()} == {new_agent["pid"]}
        assert visible_devices(new["gpu"]) == ids  # the group outlived the agent

        # Nothing of the old agent survives, not even what left the unit's group.
        assert await wait_gone(olds, SETTLE) == []


# The multi-node cluster is driven from a subprocess (see ray_fixtures).

SPREAD_DRIVER = """
import os, signal, time
import anyio, anyio.to_thread, psutil
from dynsup.engine import Engine, OutputHub, State
from dynsup.placement import connect, list_groups, namespace_for
from dynsup.placement.gang import GangAgent
from dynsup.placement.relocating import unwrap
from dynsup.placement.runtime import open_runtime
from dynsup.units.spec import ProbeKind, ReadySpec
from tests.helpers import service
from tests.ray_fixtures import named_actors

INSTANCE = "spread-tp"
RANK = "import time; print('up', flush=True); time.sleep(600)"
UP = ReadySpec(ProbeKind.LOG, r"^up$", timeout=60.0)

async def printed(agent, spawned):
    # Once a rank printed, its exec is complete and /proc shows its environment.
    cursor, seen = 0, False
    with anyio.fail_after(60):
        while not seen:
            batch = await agent.next_chunks(cursor, 60)
            seen = any((c.name, c.pid) == (spawned.name, spawned.pid) for c in batch.chunks)
            cursor = batch.cursor

async def ranks_of(rt, engine, not_pid=None):
    with anyio.fail_after(60):
        snap = await engine.wait_state(
            "llama-0", lambda s: s.state in (State.RUNNING, State.FATAL) and s.pid != not_pid)
    assert snap.state is State.RUNNING, snap
    gang = unwrap(rt.placer.placement_of("llama-0").agent)
    assert isinstance(gang, GangAgent)
    running = await gang.running()
    out = []
    for rank, spawned in zip(gang.ranks, running):
        await printed(rank.agent, spawned)
        proc = psutil.Process(spawned.pid)
        env = proc.environ()
        out.append({
            "name": spawned.name, "pid": spawned.pid, "node_id": rank.agent.node_id,
            "agent_pid": proc.ppid(), "argv": proc.cmdline()[3:], "status": proc.status(),
            "env": {k: env.get(k) for k in ("DYNSUP_RANK", "DYNSUP_RANKS", "DYNSUP_RANK0_ADDR",
                                          "CUDA_VISIBLE_DEVICES")},
        })
    return out

async def main():
    handle = connect(ADDRESS, num_gpus=None, namespace=namespace_for(INSTANCE))
    with anyio.fail_after(60):
        while len([n for n in handle.nodes() if n.alive]) < 3:  # raylets registering
            await anyio.sleep(0.1)
    gpu_nodes = sorted(n.node_id for n in handle.nodes() if n.alive and n.gpus_total)
    spec = service("llama-0", RANK, gpus=8, restart_delay=0.05, ready=UP,
                   command=(sys.executable, "-c", RANK, "--rank={rank}", "--of={ranks}",
                            "--master-addr={rank0_addr}", '{"json": "stays"}'))
    hub = OutputHub()
    async with open_runtime(handle, INSTANCE) as rt, anyio.create_task_group() as pumps:
        pumps.start_soon(rt.pump_output, lambda batch: [hub.publish(c) for c in batch.chunks])
        async with Engine(placer=rt.placer, output=hub) as engine:
            engine.load({spec.name: spec})
            engine.start_nowait("llama-0")
            first = await ranks_of(rt, engine)
            table = rt.gpu_table()
            # Handles first: the restart reaps both ranks within milliseconds of the kill.
            olds = [psutil.Process(r["pid"]) for r in first]
            os.kill(first[1]["pid"], signal.SIGKILL)  # rank 1 dies: the set restarts
            # In a thread: the engine must go on meanwhile.
            gone = (await anyio.to_thread.run_sync(lambda: psutil.wait_procs(olds, timeout=60)))[1]
            second = await ranks_of(rt, engine, not_pid=first[0]["pid"])
            snap = engine.statistics(["llama-0"])[0]
        pumps.cancel_scope.cancel()
    report({
        "gpu_nodes": gpu_nodes, "first": first, "second": second, "table": table,
        "old_alive": len(gone), "restarts": snap.restarts, "exit": snap.exit_status,
        "actors_left": named_actors(namespace_for(INSTANCE)),
        "groups_left": [g.name for g in await list_groups(INSTANCE)],
    })

anyio.run(main)
"""


def test_a_spread_unit_runs_its_ranks_on_two_nodes_and_restarts_them_together(
    ray_multinode: LocalCluster,
) -> None:
    result = run_driver(ray_multinode, "import sys\n" + SPREAD_DRIVER, timeout=300)
    first, second = result["first"], result["second"]
    assert [r["name"] for r in first] == ["llama-0", "llama-0-r1"]
    # Two ranks on the two GPU raylets, each under its own node's agent.
    assert sorted(r["node_id"] for r in first) == result["gpu_nodes"]
    assert first[0]["agent_pid"] != first[1]["agent_pid"]
    rank0_addr = first[0]["env"]["DYNSUP_RANK0_ADDR"]
    for k, rank in enumerate(first):
        assert rank["status"] != "zombie", rank
        assert rank["env"] == {
            "DYNSUP_RANK": str(k),
            "DYNSUP_RANKS": "2",
            "DYNSUP_RANK0_ADDR": rank0_addr,
            "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        }
        assert rank["argv"] == [
            f"--rank={k}",
            "--of=2",
            f"--master-addr={rank0_addr}",
            '{"json": "stays"}',
        ]
    # Killing rank 1 restarted both ranks, on the same nodes.
    assert result["old_alive"] == 0
    assert result["restarts"] == 1 and result["exit"].startswith("rank 1 (llama-0-r1)")
    assert [r["node_id"] for r in second] == [r["node_id"] for r in first]
    assert not {r["pid"] for r in second} & {r["pid"] for r in first}
    ranks = {(row["node_id"], row["gpu"]): row["rank"] for row in result["table"]}
    assert sorted(ranks.values()) == [0] * 4 + [1] * 4
    assert result["actors_left"] == [] and result["groups_left"] == []


class _WatchedPlacer:
    """The runtime's own placer; tells the test when a placement has begun."""

    def __init__(self, placer: Placer) -> None:
        self.placer = placer
        self.placing = anyio.Event()

    async def place(self, spec: ServiceSpec) -> Placement:
        self.placing.set()
        return await self.placer.place(spec)

    async def release(self, spec: ServiceSpec) -> None:
        await self.placer.release(spec)


async def test_a_gpu_unit_stopped_while_being_placed_leaves_no_placement_group(
    ray_embedded: RayHandle, ray_instance: str, namespace: str
) -> None:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # The unit's group exists (a restart reuses it) and an actor holds its
    # GPUs, so the placement waits in its GPU probe until the stop comes.
    name = group_name(ray_instance, "slow", 0)
    held = await reserve(name, Layout(Strategy.STRICT_PACK, 2, 1), SETTLE)

    class Blocker:  # nested: sent by value, workers need no copy of the tests
        def ready(self) -> bool:
            return True

    strategy = PlacementGroupSchedulingStrategy(held.group, placement_group_bundle_index=0)
    blocker = ray.remote(num_cpus=0, num_gpus=2)(Blocker).options(scheduling_strategy=strategy)
    blocker = blocker.remote()
    try:
        with anyio.fail_after(SETTLE):
            await blocker.ready.remote()
        async with open_runtime(ray_embedded, ray_instance, namespace=namespace) as rt:
            placer = _WatchedPlacer(rt.placer)
            async with Engine(placer=placer, output=OutputHub()) as engine:
                engine.load({"slow": gpu_unit("slow")})
                engine.start_nowait("slow")
                with anyio.fail_after(SETTLE):
                    await placer.placing.wait()
                await engine.stop("slow")
                assert engine.statistics(["slow"])[0].state is State.STOPPED
            # Nobody holds it now: it must not keep its GPUs from everyone.
            assert await list_groups(ray_instance) == []
    finally:
        ray.kill(blocker)


async def test_units_under_a_ray_agent_inherit_none_of_rays_worker_environment(
    ray_embedded: RayHandle, ray_instance: str, namespace: str
) -> None:
    own = {"RAY_MINE": "kept", "PYTHONBREAKPOINT": "pdb.set_trace"}
    plain = replace(service("plain", SLEEPER, ready=UP), environment=freeze_env(own))
    gpu = replace(gpu_unit("gpu"), environment=freeze_env({}))
    async with open_stack(ray_embedded, ray_instance, namespace, plain, gpu) as (_, engine):
        engine.start_nowait("plain")
        engine.start_nowait("gpu")
        envs = {
            name: psutil.Process(await wait_running(engine, name)).environ()
            for name in ("plain", "gpu")
        }
    for name, env in envs.items():
        ray_keys = {key for key in env if key.startswith("RAY_")}
        explicit = {"RAY_MINE"} if name == "plain" else {NOSET_ENV}
        assert ray_keys == explicit, (name, ray_keys)
        assert env.get("PYTHONBREAKPOINT") != "ray.util.rpdb.set_trace"
        assert "SPT_NOENV" not in env and "DYNSUP_RAY_HEAD" not in env
        # Ray gives its CPU-less workers one OpenMP thread; the node did not.
        assert env.get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")
    # A unit's own environment still passes, Ray's names included.
    assert envs["plain"]["RAY_MINE"] == "kept"
    assert envs["plain"]["PYTHONBREAKPOINT"] == "pdb.set_trace"
