"""The agent's shared watches: every pipe drained and every leader's exit heard
by one task each, whatever the number of processes.

Real children, real pipes. A running unit used to cost the daemon three
tasks in the agent (two pipe readers and its leader's watch, ~4 KiB
each: bench/README.md's stop_scale section).
"""

from __future__ import annotations

import os

import anyio
import pytest

from dynsup.agent import LocalAgent
from dynsup.agent_api import SpawnRequest

pytestmark = pytest.mark.anyio

UNITS = 30


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_one_reader_drains_the_pipes_of_every_process_an_agent_hosts() -> None:
    before_fds = open_fds()
    async with LocalAgent(cgroups=False) as agent:
        before = len(anyio.get_running_tasks())
        names = [f"u{i}" for i in range(UNITS)]
        for name in names:
            # The shell prints its $0 on both streams, then waits to be stopped.
            script = 'echo "out $0"; echo "err $0" >&2; exec sleep 600'
            await agent.spawn(SpawnRequest(name, ("sh", "-c", script, name)))
        # No task per running process: pipes and exits are the agent's shared tasks'.
        assert len(anyio.get_running_tasks()) - before <= 2
        with anyio.fail_after(60):
            for name in names:
                for stream, word in (("stdout", "out"), ("stderr", "err")):
                    expected = f"{word} {name}\n".encode()
                    while agent.logs.read(name, stream, 0, 100)[1] != expected:
                        await agent.logs.wait_beyond(agent.logs.last_seq, 1.0)
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(agent.stop, name, "SIGTERM", 10.0)
        # Each pipe and pidfd is closed at its end, while the agent runs on
        # (its two epolls stay).
        with anyio.fail_after(60):
            while len(open_fds() - before_fds) > 2:
                await anyio.sleep(0.05)  # the reader sees EOF on its next round
    assert open_fds() == before_fds


async def test_every_leader_exit_is_heard_with_its_own_status() -> None:
    async with LocalAgent(cgroups=False) as agent:
        for code in range(UNITS):
            await agent.spawn(SpawnRequest(f"u{code}", ("sh", "-c", f"exit {code}")))
        with anyio.fail_after(60):
            for code in range(UNITS):
                status = await agent.wait_exit(f"u{code}")
                assert (status.code, status.signal) == (code, None)
