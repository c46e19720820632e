"""The daemon pulls only the output it consumes: under a flood nobody follows, none.

Real agents (in the daemon, and the agent process) with real children. The
daemon's pump asks its agent only for the units the hub has consumers for
(log probes, followers); journald gets the lines from the agent itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import pytest

from dynsup.agent_api import ChunkBatch
from dynsup.agent_client import AgentClient, shutdown_agent
from dynsup.backends import Backend, open_agent_backend, open_local
from dynsup.daemon import output_consumer
from dynsup.engine import Engine, OutputHub, State
from dynsup.units.spec import ProbeKind, ReadySpec

from .helpers import service, wait_for

pytestmark = pytest.mark.anyio

LOUD_LINES = 20_000  # 2 MB, more than the agent's chunk queue holds (4 MiB with overheads)
LOUD = f"""
import sys
out = open(1, "w", buffering=8192, closefd=False)
for n in range({LOUD_LINES}):
    out.write("%012d %s\\n" % (n, "x" * 86))
out.flush()
"""
PROBED = """
import sys, time
print("loading", flush=True)
print("ready now", flush=True)
time.sleep(600)
"""


def backend_of(mode: str, state_dir: Path) -> AbstractAsyncContextManager[Backend]:
    state_dir.mkdir(exist_ok=True)
    return open_local() if mode == "inprocess" else open_agent_backend(state_dir)


async def agent_bytes_sent(backend: Backend) -> int:
    """What the agent handed out on next_chunks: counted where it is sent."""
    agent = backend.agent
    if isinstance(agent, AgentClient):  # the agent process, through its socket
        return int((await agent.statistics())["bytes_sent"])
    return int(agent.bytes_sent)  # type: ignore[attr-defined]


class Received:
    """The daemon's side: every chunk the pump handed on, by unit."""

    def __init__(self, hub: OutputHub) -> None:
        self.bytes: dict[str, int] = {}
        self._consume = output_consumer(hub, None)

    def __call__(self, batch: ChunkBatch) -> None:
        for chunk in batch.chunks:
            self.bytes[chunk.name] = self.bytes.get(chunk.name, 0) + len(chunk.data)
        self._consume(batch)


@asynccontextmanager
async def open_daemon_side(
    mode: str, tmp_path: Path
) -> AsyncIterator[tuple[Backend, Engine, Received]]:
    hub = OutputHub()
    received = Received(hub)
    async with backend_of(mode, tmp_path / "state") as backend:
        try:
            async with (
                Engine(placer=backend.placer, output=hub) as engine,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(backend.pump, received, hub)
                try:
                    yield backend, engine, received
                finally:
                    await engine.stop_all()
                    tg.cancel_scope.cancel()
        except BaseException:
            # A failed test: the agent process would wait for the next daemon.
            if isinstance(backend.agent, AgentClient):
                with anyio.CancelScope(shield=True):
                    await shutdown_agent(backend.agent)
            raise


@pytest.mark.parametrize("mode", ["inprocess", "process"])
async def test_output_nobody_consumes_stays_in_the_agent_and_a_later_log_probe_sees_its_ready_line(
    tmp_path: Path, mode: str
) -> None:
    loud = service("loud", LOUD)
    probed = service(
        "probed", PROBED, ready=ReadySpec(kind=ProbeKind.LOG, target=r"^ready now$", timeout=60)
    )
    printed = LOUD_LINES * 100
    async with open_daemon_side(mode, tmp_path) as (backend, engine, received):
        engine.load({"loud": loud, "probed": probed})
        engine.start_nowait("loud")
        await wait_for(engine, "loud", State.EXITED, timeout=120)
        # Every byte is in the agent's ring (tail reads it), none crossed to the daemon.
        assert (await backend.agent.tail_log("loud", "stdout", 1)).end == printed
        assert received.bytes == {}
        assert backend.pumped.bytes == 0
        assert await agent_bytes_sent(backend) == 0

        # A log probe that comes later (it subscribes before its unit is spawned)
        # gets the lines it waits for: the pump asks again for its unit.
        engine.start_nowait("probed")
        await wait_for(engine, "probed", State.RUNNING, timeout=120)
        assert set(received.bytes) == {"probed"}
        assert received.bytes["probed"] >= len("loading\nready now\n")
        assert backend.pumped.bytes == received.bytes["probed"]
        assert await agent_bytes_sent(backend) == backend.pumped.bytes


async def test_the_hub_names_the_units_it_has_consumers_for_and_says_when_that_changes() -> None:
    hub = OutputHub()
    seen: list[frozenset[str]] = []

    async def watch() -> None:
        while True:
            await hub.changed.wait()
            seen.append(hub.names())

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await anyio.wait_all_tasks_blocked()
        probe = hub.subscribe("worker", None)
        await anyio.wait_all_tasks_blocked()
        follower = hub.follow("worker", "frontend")
        await anyio.wait_all_tasks_blocked()
        probe.close()  # the follower still wants the worker's output: no change
        await anyio.wait_all_tasks_blocked()
        follower.close()
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert seen == [
        frozenset({"worker"}),
        frozenset({"worker", "frontend"}),
        frozenset(),
    ]
