"""The process room with real children: groups, escapees, exit statuses."""

from __future__ import annotations

import os
import signal
import sys
import textwrap

import anyio
import psutil
import pytest

from dynsup.process import ProcessGroup, become_subreaper

from .helpers import alive

pytestmark = pytest.mark.anyio


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


async def read_pids(group: ProcessGroup, count: int) -> list[int]:
    """The child prints pids it started, one per line, on stdout."""
    buf = b""
    with anyio.fail_after(10):
        while buf.count(b"\n") < count:
            await anyio.wait_readable(group.stdout_fd)
            buf += os.read(group.stdout_fd, 4096)
    return [int(x) for x in buf.split()[:count]]


@pytest.fixture(autouse=True)
def subreaper() -> None:
    assert become_subreaper()


async def test_exit_code_and_signal_name() -> None:
    group = ProcessGroup.spawn("t", python("import sys; sys.exit(3)"), dict(os.environ), None)
    status = await group.watch_leader()
    assert (status.code, status.signal) == (3, None)
    assert status.describe() == "exit status 3"
    group2 = ProcessGroup.spawn(
        "t",
        python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"),
        dict(os.environ),
        None,
    )
    status2 = await group2.watch_leader()
    assert (status2.code, status2.signal) == (None, "SIGSEGV")
    for g in (group, group2):
        os.close(g.stdout_fd)
        os.close(g.stderr_fd)


async def test_sigterm_ignoring_child_and_grandchild_are_killed() -> None:
    code = """
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        print(os.getpid(), flush=True); print(child.pid, flush=True)
        time.sleep(600)
    """
    group = ProcessGroup.spawn("t", python(code), dict(os.environ), None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(group.watch_leader)
        leader, grandchild = await read_pids(group, 2)
        assert alive(grandchild)
        began = anyio.current_time()
        await group.terminate(signal.SIGTERM, timeout=1.0)
        took = anyio.current_time() - began
    assert not alive(leader) and not alive(grandchild)
    assert group.status is not None and group.status.signal == "SIGKILL"
    assert 1.0 <= took < 2.0, took  # stop_timeout + 1 s at most


async def test_setsid_double_fork_escapee_is_killed() -> None:
    code = """
        import os, sys, time
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, (str(os.getpid()) + "\\n").encode())
                time.sleep(600)
            os._exit(0)
        print(os.getpid(), flush=True)
        sys.stdout.write(os.read(r, 100).decode()); sys.stdout.flush()
        time.sleep(600)
    """
    group = ProcessGroup.spawn("t", python(code), dict(os.environ), None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(group.watch_leader)
        leader, escapee = await read_pids(group, 2)
        assert os.getpgid(escapee) != group.pgid  # it really left the group
        with anyio.fail_after(10):
            while psutil.Process(escapee).ppid() != os.getpid():
                await anyio.sleep(0.01)  # the middle process exits: re-parented to us
        await group.terminate(signal.SIGTERM, timeout=5.0)
    assert not alive(leader) and not alive(escapee)


async def test_leftovers_die_when_the_leader_exits_by_itself() -> None:
    code = """
        import os, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(os.getpid(), flush=True); print(child.pid, flush=True)
        os._exit(1)
    """
    group = ProcessGroup.spawn("t", python(code), dict(os.environ), None)
    _leader, orphan = await read_pids(group, 2)
    status = await group.watch_leader()
    assert status.code == 1
    assert alive(orphan)
    await group.terminate(signal.SIGTERM, timeout=5.0)
    assert not alive(orphan)


async def test_reused_pid_is_never_signalled() -> None:
    from dynsup.lineage import Known, read_stat
    from dynsup.process import _kill_if_same

    victim = ProcessGroup.spawn("t", python("import time; time.sleep(600)"), dict(os.environ), None)
    stat = read_stat(victim.pid)
    assert stat is not None
    wrong = Known(victim.pid, stat.start - 100)  # as if the pid had been reused
    _kill_if_same(wrong, signal.SIGKILL)
    assert alive(victim.pid)
    async with anyio.create_task_group() as tg:
        tg.start_soon(victim.watch_leader)
        await victim.terminate(signal.SIGTERM, timeout=5.0)
    assert victim.status is not None and victim.status.signal == "SIGTERM"
