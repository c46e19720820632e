"""Agents beyond the daemon: the agent actor spoken to through RemoteAgent, gangs of
ranks, and a daemon restart that adopts what the previous daemon left running.

The gang tests use in-process agents (the gang logic knows no Ray); the
adoption test runs two short daemons in subprocesses on one embedded head.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from dynsup.agent import LocalAgent
from dynsup.agent_api import ChunkBatch, NotRunning, Spawned, SpawnError, SpawnRequest
from dynsup.placement import RayHandle, namespace_for
from dynsup.placement.actor import actor_name
from dynsup.placement.gang import GangAgent, Rank
from dynsup.placement.remote import RemoteAgent, agents_of, get_or_create_agent
from tests.ray_fixtures import RESULT_PREFIX, named_actors, ray_embedded, ray_instance, wait_gone

from .helpers import alive, python

__all__ = ["ray_embedded", "ray_instance"]  # fixtures, used by name

pytestmark = pytest.mark.anyio

SETTLE = 60.0
SLEEP = "import time; time.sleep(600)"


@pytest.fixture
def anyio_backend() -> object:
    return ("asyncio", {"debug": True})


# -- the agent actor ----------------------------------------------------------


@pytest.fixture
def namespace(ray_instance: str) -> Iterator[str]:
    ns = namespace_for(ray_instance)
    yield ns
    left = named_actors(ns)
    assert not left, f"agent actors left by the test: {left}"


@asynccontextmanager
async def open_agent(handle: RayHandle, namespace: str) -> AsyncIterator[RemoteAgent]:
    import ray

    agent = get_or_create_agent(ray.get_runtime_context().get_node_id(), namespace)
    try:
        await agent.ensure()
        yield agent
    finally:
        with anyio.CancelScope(shield=True):
            await agent.shutdown()


@pytest.mark.ray
async def test_the_actor_speaks_the_agent_contract(ray_embedded: RayHandle, namespace: str) -> None:
    import ray

    cpus = ray.available_resources().get("CPU")
    async with open_agent(ray_embedded, namespace) as agent:
        info = await agent.info()
        assert info["subreaper"] and info["pid"] != os.getpid()
        (found,) = await agents_of(namespace)
        assert found.node_id == agent.node_id
        assert named_actors(namespace) == [actor_name(agent.node_id)]
        assert ray.available_resources().get("CPU") == cpus  # num_cpus=0

        code = "print('out', flush=True)\n" + SLEEP
        spawned = await agent.spawn(SpawnRequest("echo", python(code), tag="t1"))
        assert spawned.tag == "t1" and psutil.Process(spawned.pid).ppid() == info["pid"]
        assert [s.name for s in await agent.running()] == ["echo"]

        # Output comes back through the long-poll, not a loop that spins.
        cursor, out = 0, b""
        with anyio.fail_after(SETTLE):
            while out != b"out\n":
                batch = await agent.next_chunks(cursor, SETTLE)
                assert {(c.name, c.stream) for c in batch.chunks} <= {("echo", "stdout")}
                out += b"".join(c.data for c in batch.chunks)
                cursor = batch.cursor
        assert (await agent.tail_log("echo", "stdout", 5)).data == b"out\n"

        await agent.send_signal("echo", "SIGTERM")
        with anyio.fail_after(SETTLE):
            assert (await agent.wait_exit("echo")).signal == "SIGTERM"
        assert await agent.running() == []
        await agent.spawn(SpawnRequest("three", python("raise SystemExit(3)")))
        assert (await agent.wait_exit("three")).code == 3

        # Errors keep their class and message across the actor boundary.
        with pytest.raises(NotRunning, match="no process named 'ghost'"):
            await agent.wait_exit("ghost")
        with pytest.raises(SpawnError, match="cannot run '/no/such/binary'"):
            await agent.spawn(SpawnRequest("bad", ("/no/such/binary",)))

        # Shutting the agent down stops what it hosts.
        left = psutil.Process((await agent.spawn(SpawnRequest("left", python(SLEEP)))).pid)
    assert await wait_gone([left], SETTLE) == []


async def wait_output(agent: RemoteAgent, cursor: int, expected: bytes) -> ChunkBatch:
    """Read chunks from cursor until they make up exactly expected."""
    data = b""
    with anyio.fail_after(SETTLE):
        while data != expected:
            batch = await agent.next_chunks(cursor, SETTLE)
            data += b"".join(c.data for c in batch.chunks)
            cursor = batch.cursor
    return batch


@pytest.mark.ray
async def test_a_pump_crosses_the_death_of_its_agent(
    ray_embedded: RayHandle, namespace: str
) -> None:
    async with open_agent(ray_embedded, namespace) as agent:
        await agent.spawn(SpawnRequest("a", python("print('one', flush=True)\n" + SLEEP)))
        cursor = (await wait_output(agent, 0, b"one\n")).cursor
        info = await agent.info()
        orphan = psutil.Process((await agent.running())[0].pid)
        os.kill(info["pid"], signal.SIGKILL)

        # A pump waiting on the dead agent gets an empty batch, never an error.
        with anyio.fail_after(SETTLE):
            empty = await agent.next_chunks(cursor, 0.5)
        assert empty.chunks == [] and empty.cursor == cursor
        assert await wait_gone([orphan], SETTLE) == []  # the warden took it along

        # The next spawn makes a new actor; the old cursor reads its log from the start.
        await agent.spawn(SpawnRequest("a", python("print('two', flush=True)\n" + SLEEP)))
        assert (await agent.info())["pid"] != info["pid"]
        await wait_output(agent, cursor, b"two\n")


# -- gangs (in-process agents: the gang logic knows no Ray) -------------------

RANK = """
import os, sys, time
print(os.environ["DYNSUP_RANK"], os.environ["DYNSUP_RANKS"], os.environ["DYNSUP_RANK0_ADDR"],
      os.environ["CUDA_VISIBLE_DEVICES"], *sys.argv[1:], flush=True)
time.sleep(600)
"""


@asynccontextmanager
async def open_gang(ranks: int = 3) -> AsyncIterator[tuple[GangAgent, list[LocalAgent]]]:
    async with contextlib.AsyncExitStack() as stack:
        agents = [await stack.enter_async_context(LocalAgent(node=f"n{k}")) for k in range(ranks)]
        gang = GangAgent(
            "tp",
            [
                Rank(agent, {"CUDA_VISIBLE_DEVICES": f"{k * 2},{k * 2 + 1}"}, f"10.0.0.{k}")
                for k, agent in enumerate(agents)
            ],
        )
        yield gang, agents


async def first_line(agent: LocalAgent, name: str) -> str:
    cursor, data = 0, b""
    with anyio.fail_after(SETTLE):
        while b"\n" not in data:
            batch = await agent.next_chunks(cursor, SETTLE)
            cursor = batch.cursor
            data += b"".join(c.data for c in batch.chunks if c.name == name)
    return data.decode().split("\n")[0]


async def test_a_gang_tells_each_rank_its_place_and_dies_as_one() -> None:
    argv = (*python(RANK), "--rank={rank}/{ranks}", "--master={rank0_addr}", "{other}")
    async with open_gang() as (gang, agents):
        spawned = await gang.spawn(
            SpawnRequest("tp", argv, stop_timeout=5.0, tag="fp", rank_args=("--headless",))
        )
        ranks = await gang.running()
        assert [r.name for r in ranks] == ["tp", "tp-r1", "tp-r2"]
        assert spawned == ranks[0] and {r.tag for r in ranks} == {"fp"}
        for k, rank in enumerate(ranks):
            line = await first_line(agents[k], rank.name)
            devices = f"{k * 2},{k * 2 + 1}"
            # Ranks > 0 get the request's rank_args (vLLM's --headless), rank 0 not.
            extra = " --headless" if k > 0 else ""
            assert (
                line == f"{k} 3 10.0.0.0 {devices} --rank={k}/3 --master=10.0.0.0 {{other}}{extra}"
            )

        # Rank 2 dies: wait_exit reports it once every other rank is stopped too.
        os.kill(ranks[2].pid, signal.SIGKILL)
        with anyio.fail_after(SETTLE):
            status = await gang.wait_exit("tp")
        assert status.describe() == "rank 2 (tp-r2) terminated by SIGKILL"
        assert not status.is_success((0,))
        assert not any(alive(r.pid) for r in ranks)
        assert await gang.running() == []

        # The restart runs the whole set again; stop takes every rank down.
        again = await gang.spawn(SpawnRequest("tp", argv, stop_timeout=5.0))
        assert len(await gang.running()) == 3
        stopped = await gang.stop("tp", "SIGTERM", 5.0)
        assert stopped is not None and stopped.signal == "SIGTERM"
        assert not alive(again.pid) and await gang.running() == []


async def test_stop_takes_the_ranks_down_before_rank_0() -> None:
    # Rank 0 reports, on SIGTERM, whether the other ranks were already gone.
    code = """
    import os, signal, sys, time
    def term(*_):
        others = [int(p) for p in os.environ["OTHERS"].split(",") if p]
        def gone(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().split()[2] == "Z"
            except OSError:
                return True
        print("others gone:", all(gone(p) for p in others), flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    print("up", flush=True)
    while True:
        time.sleep(60)
    """
    async with open_gang(ranks=2) as (gang, agents):
        rank1 = await agents[1].spawn(SpawnRequest("tp-r1", python(SLEEP)))
        env = {"OTHERS": str(rank1.pid)}
        await agents[0].spawn(SpawnRequest("tp", python(code), env))
        assert await first_line(agents[0], "tp") == "up"
        await gang.stop("tp", "SIGTERM", 5.0)
        read = await agents[0].read_log("tp", "stdout", 0, 1000)
        assert read.data.decode().splitlines() == ["up", "others gone: True"]


class Unstartable(LocalAgent):
    async def spawn(self, request: SpawnRequest) -> Spawned:
        raise SpawnError(f"{request.name}: cannot run it here")


async def test_a_half_started_gang_is_stopped() -> None:
    async with LocalAgent() as rank1, Unstartable() as rank0:
        gang = GangAgent("tp", [Rank(rank0, {}, "10.0.0.0"), Rank(rank1, {}, "10.0.0.1")])
        # Rank 1 starts first; rank 0 cannot start, so rank 1 must not run on.
        with pytest.raises(SpawnError, match="tp: cannot run it here"):
            await gang.spawn(SpawnRequest("tp", python(SLEEP)))
        assert await rank1.running() == []
        assert (await rank1.wait_exit("tp-r1")).signal == "SIGTERM"  # started, then stopped


# -- a daemon restart that loses nothing --------------------------------------

DAEMON = """
import os, sys, anyio
from dynsup.engine import Engine, OutputHub, State
from dynsup.engine.reload import fingerprint
from dynsup.placement import list_groups
from dynsup.placement.runtime import open_ray_runtime
from tests.helpers import service

STEP, STATE = sys.argv[1], sys.argv[2]
HELLO = "import os, time; print('hello', os.getpid(), flush=True); time.sleep(600)"
STALE = HELLO if STEP == "first" else HELLO + "  # changed"
SPECS = {s.name: s for s in [
    service("keep", HELLO, gpus=2),
    service("stale", STALE, gpus=2),
    service("plain", HELLO),
]}

async def running(engine, name):
    with anyio.fail_after(60):
        snap = await engine.wait_state(name, lambda s: s.state in (State.RUNNING, State.FATAL))
    assert snap.state is State.RUNNING, snap
    return snap

async def main():
    async with open_ray_runtime(instance="adopt", address="", num_gpus=4, num_cpus=1,
                                state_dir=STATE) as rt:
        if STEP == "first":
            async with Engine(placer=rt.placer, output=OutputHub()) as engine:
                engine.load(SPECS)
                for name in SPECS:
                    engine.start_nowait(name)
                snaps = {name: await running(engine, name) for name in SPECS}
                report({name: [s.pid, list(s.gpus)] for name, s in snaps.items()})
                await anyio.sleep_forever()  # until SIGKILL: a daemon crash
        survivors = await rt.survivors()
        found = {s.name: [s.spawned.pid, s.spawned.tag, list(s.placement.gpus)]
                 for s in survivors}
        adopt = rt.adoptable(survivors, SPECS)
        assert [s.name for s in adopt] == sorted(
            s.name for s in survivors if s.spawned.tag == fingerprint(SPECS[s.name]))
        await rt.stop_stale(survivors, keep={s.name for s in adopt})
        groups_after_sweep = [g.name for g in await list_groups("adopt")]
        async with Engine(placer=rt.placer, output=OutputHub()) as engine:
            engine.load(SPECS)
            for s in adopt:
                engine.adopt(s.name, s.placement, s.spawned)
            adopted = {s.name: (await running(engine, s.name)).pid for s in adopt}
            logs = {s.name: (await rt.agent.tail_log(s.name, "stdout", 1)).data.decode()
                    for s in adopt}
            table = [(r["gpu"], r["unit"]) for r in rt.gpu_table()]
            engine.start_nowait("stale")
            restarted = (await running(engine, "stale")).pid
    report({
        "found": found, "adopted": adopted, "logs": logs, "table": table,
        "groups_after_sweep": groups_after_sweep, "restarted": restarted,
        "head_left": os.path.exists(os.path.join(STATE, "ray-head.toml")),
    })

anyio.run(main)
"""


def start_python(code: str, stderr: Path, *args: str) -> tuple[subprocess.Popen[str], Any]:
    """Start code; return the process and the value its report() printed first."""
    prelude = textwrap.dedent(
        f"""
        import json
        def report(value):
            print({RESULT_PREFIX!r} + json.dumps(value), flush=True)
        """
    )
    with stderr.open("a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(RESULT_PREFIX):
            return proc, json.loads(line[len(RESULT_PREFIX) :])
    proc.wait()
    raise AssertionError(
        f"exited {proc.returncode} without a report:\n{stderr.read_text()[-3000:]}"
    )


@pytest.mark.ray
def test_a_restarted_daemon_adopts_what_is_unchanged_and_stops_the_rest(
    tmp_path: Path,
) -> None:
    state = str(tmp_path / "state")
    stderr = tmp_path / "stderr"
    first, started = start_python(DAEMON, stderr, "first", state)
    try:
        first.kill()  # no clean-up of any kind: the head, agents and units stay
        first.wait()
        assert all(alive(pid) for pid, _ in started.values())

        second, result = start_python(DAEMON, stderr, "second", state)
        second.communicate(timeout=120)  # drains stdout meanwhile
        assert second.returncode == 0, stderr.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    found = result["found"]
    assert sorted(found) == ["keep", "plain", "stale"]
    # Same pids, same GPUs; logs go on in the agent's rings.
    assert result["adopted"] == {"keep": started["keep"][0], "plain": started["plain"][0]}
    assert found["keep"][2] == started["keep"][1]
    assert result["logs"] == {name: f"hello {started[name][0]}\n" for name in ("keep", "plain")}
    # The stale unit's process went first, then its group; its GPUs were free for its successor.
    assert not alive(started["stale"][0])
    assert result["groups_after_sweep"] == ["dynsup/adopt/keep/0"]
    assert result["restarted"] != started["stale"][0]
    held = [gpu for gpu, unit in result["table"] if unit == "keep"]
    assert sorted(held) == sorted(started["keep"][1])
    # The orderly shutdown stopped every unit, then the agents and the head.
    assert not any(alive(pid) for pid, _ in started.values())
    assert not result["head_left"]
