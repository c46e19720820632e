"""Containment of a unit's processes, in both modes (cgroup v2, and process groups).

Real processes and real signals; D state is produced with the cgroup v1
freezer (a frozen task does not die of SIGKILL until thawed) where it is
mounted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psutil
import pytest

from dynsup import process
from dynsup.agent import LocalAgent
from dynsup.agent_api import SpawnError, SpawnRequest, StopFailed
from dynsup.cgroups import AgentCgroups, CgroupUnavailable
from dynsup.process import ProcessGroup, become_subreaper

from .daemon_helpers import Dynsupd, run_dynsupd
from .helpers import alive

pytestmark = pytest.mark.anyio

FREEZER_V1 = Path("/sys/fs/cgroup/freezer")


def _cgroups_work() -> bool:
    try:
        tree = AgentCgroups.create("probe-" + uuid.uuid4().hex[:8])
    except CgroupUnavailable:
        return False
    tree.close()
    return True


CGROUPS = _cgroups_work()
MODES = [
    pytest.param(True, id="cgroups", marks=pytest.mark.skipif(not CGROUPS, reason="no cgroup v2")),
    pytest.param(False, id="process-groups"),
]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


async def read_pids(fd: int, count: int) -> list[int]:
    buf = b""
    with anyio.fail_after(20):
        while buf.count(b"\n") < count:
            await anyio.wait_readable(fd)
            buf += os.read(fd, 4096)
    return [int(x) for x in buf.split()[:count]]


@asynccontextmanager
async def open_agent(cgroups: bool) -> AsyncIterator[LocalAgent]:
    async with LocalAgent(cgroups=cgroups) as agent:
        assert (agent.cgroups is not None) is cgroups
        yield agent


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_members_survive_a_child_forking_short_lived_processes_while_stopped() -> None:
    """psutil.NoSuchProcess escaped ProcessGroup.members() and killed the daemon."""
    assert become_subreaper()
    code = """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(os.getpid(), flush=True)
        while True:
            pids = []
            for _ in range(8):
                pid = os.fork()
                if pid == 0:
                    time.sleep(0.0005)
                    os._exit(0)
                pids.append(pid)
            for pid in pids:
                os.waitpid(pid, 0)
    """
    for _ in range(5):
        group = ProcessGroup.spawn("forker", python(code), dict(os.environ), None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(group.watch_leader)
            await read_pids(group.stdout_fd, 1)
            with anyio.fail_after(30):
                await group.terminate(signal.SIGTERM, timeout=0.3)
        assert group.status is not None and group.status.signal == "SIGKILL"
        os.close(group.stdout_fd)
        os.close(group.stderr_fd)


@pytest.mark.parametrize(
    ("argv", "env", "cwd", "key"),
    [
        (["true"], {}, "/tmp\0x", "working_directory"),
        (["true", "a\0b"], {}, None, "command[1]"),
        (["true"], {"K": "v\0w"}, None, "environment 'K'"),
    ],
)
async def test_nul_byte_in_a_spawn_is_a_spawn_error_naming_the_key_and_leaks_no_fd(
    argv: list[str], env: dict[str, str], cwd: str | None, key: str
) -> None:
    async with LocalAgent(cgroups=CGROUPS) as agent:
        before = open_fds()
        with pytest.raises(SpawnError, match=key.replace("[", r"\[").replace("]", r"\]")):
            await agent.spawn(SpawnRequest("nul", tuple(argv), env, cwd))
        assert open_fds() == before
        if agent.cgroups is not None:
            assert agent.cgroups.leaves() == []


async def test_a_failed_exec_closes_both_pipes() -> None:
    before = open_fds()
    with pytest.raises(SpawnError, match="cannot run"):
        ProcessGroup.spawn("missing", ["/nonexistent/binary"], {}, None)
    with pytest.raises(SpawnError, match="cannot run"):
        ProcessGroup.spawn("badcwd", ["true"], {}, "/nonexistent/dir")
    assert open_fds() == before


@pytest.fixture
def frozen_cgroup() -> AsyncIterator[Path]:
    """A cgroup v1 freezer cgroup: its frozen tasks survive SIGKILL until thawed."""
    if not (FREEZER_V1 / "freezer.state").exists() and not FREEZER_V1.is_dir():
        pytest.skip("no cgroup v1 freezer to make a process unkillable")
    path = FREEZER_V1 / f"dynsup-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a freezer cgroup: {exc}")
    yield path
    (path / "freezer.state").write_text("THAWED")
    # The killed task dies once thawed; rmdir when it has.
    for _ in range(1000):
        try:
            path.rmdir()
            break
        except OSError:
            anyio.run(anyio.sleep, 0.01)


@pytest.mark.parametrize("cgroups", MODES)
async def test_stop_fails_loudly_when_sigkill_cannot_end_a_process(
    cgroups: bool, frozen_cgroup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SIGKILL retry loop spun forever on a process in D state; shutdown never ended."""
    monkeypatch.setattr(process, "KILL_GRACE", 1.0)
    async with open_agent(cgroups) as agent:
        argv = python("import os, time; print(os.getpid(), flush=True); time.sleep(600)")
        await agent.spawn(SpawnRequest("stuck", tuple(argv)))
        hosted = agent._hosted["stuck"]
        (pid,) = await read_pids_from_log(agent, "stuck", 1)
        (frozen_cgroup / "cgroup.procs").write_text(str(pid))
        (frozen_cgroup / "freezer.state").write_text("FROZEN")
        with anyio.fail_after(30), pytest.raises(StopFailed) as failed:
            await agent.stop("stuck", "SIGTERM", 0.2)
        assert pid in failed.value.pids
        assert str(pid) in str(failed.value)
        assert alive(pid)
        (frozen_cgroup / "freezer.state").write_text("THAWED")
        with anyio.fail_after(30):
            await agent.wait_exit("stuck")
        assert hosted.status is not None and hosted.status.signal in ("SIGTERM", "SIGKILL")


async def read_pids_from_log(agent: LocalAgent, name: str, count: int) -> list[int]:
    cursor = 0
    with anyio.fail_after(20):
        while True:
            got = await agent.read_log(name, "stdout", 0, 1 << 16)
            if got.data.count(b"\n") >= count:
                return [int(x) for x in got.data.split()[:count]]
            cursor = (await agent.next_chunks(cursor, timeout=1.0)).cursor


@pytest.mark.parametrize("cgroups", MODES)
async def test_wait_leader_exit_returns_while_the_group_is_torn_down(cgroups: bool) -> None:
    code = """
        import os, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print(flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
        child.stdout.readline()  # SIGTERM is ignored from now on
        print(child.pid, flush=True)
        os._exit(1)
    """
    async with open_agent(cgroups) as agent:
        await agent.spawn(SpawnRequest("leader", tuple(python(code)), stop_timeout=600))
        (child,) = await read_pids_from_log(agent, "leader", 1)
        with anyio.fail_after(20):
            status = await agent.wait_leader_exit("leader")
        assert status.code == 1
        assert alive(child)  # ignores SIGTERM; stop_timeout is long: the group lives on
        assert not agent._hosted["leader"].done.is_set()
        with anyio.fail_after(20):
            await agent.stop("leader", "SIGKILL", 1.0)
        assert not alive(child)


ESCAPEE = """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(sys.argv) > 1 and sys.argv[1] == "escapee":
        # Re-exec'ed with an empty environment (env -i): no token, no mark.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(int(sys.argv[2]), (str(os.getpid()) + "\\n").encode())
        time.sleep(600)
        sys.exit()
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.set_inheritable(w, True)
            os.execve(sys.executable, [sys.executable, "-c", CODE,
                                       "escapee", str(w)], dict())
        # The middle process lingers so a scan (fallback mode) sees the lineage.
        time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
        os._exit(0)
    print(os.getpid(), flush=True)
    sys.stdout.write(os.read(r, 100).decode()); sys.stdout.flush()
    time.sleep(600)
"""


def escapee_argv(linger: float) -> list[str]:
    body = textwrap.dedent(ESCAPEE)
    code = f"CODE = {body!r}\n{body}"
    return [sys.executable, "-c", code, str(linger)]


async def wait_attributed(agent: LocalAgent, name: str, pid: int) -> None:
    """Fallback mode only attributes what a scan saw under its unit: wait for that."""
    with anyio.fail_after(20):
        while pid not in {k.pid for k in agent._lineage.known_of(name)}:
            await anyio.sleep(0.05)  # the agent's sampler runs every SAMPLE_INTERVAL


@pytest.mark.parametrize("cgroups", MODES)
async def test_sigterm_ignoring_setsid_escapee_with_an_empty_environment_dies_on_stop(
    cgroups: bool,
) -> None:
    async with open_agent(cgroups) as agent:
        await agent.spawn(SpawnRequest("esc", tuple(escapee_argv(0.0 if cgroups else 3.0))))
        leader, escapee = await read_pids_from_log(agent, "esc", 2)
        if not cgroups:
            await wait_attributed(agent, "esc", escapee)
        with anyio.fail_after(30):
            await agent.stop("esc", "SIGTERM", 0.5)
        assert not alive(leader)
        assert not alive(escapee)


def _escapee_unit(tmp_path: Path, linger: float) -> Path:
    units = tmp_path / "units"
    units.mkdir()
    argv = escapee_argv(linger)
    (units / "esc.toml").write_text(
        f"[service]\ncommand = {json.dumps(argv)}\nstop_timeout = 0.5\nstart_seconds = 0\n"
    )
    return units


def _wait_dead(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon (or its warden) kills them: no event reaches the test
    left = [p for p in pids if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"survived: {left}"


def _escapee_pids(daemon: Dynsupd) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = daemon.ctl("tail", "esc").stdout.split()
        if len(out) >= 2:
            return [int(x) for x in out[:2]]
        time.sleep(0.05)  # the unit's output reaches the ring buffer
    raise AssertionError("the unit did not print its pids")


@pytest.mark.anyio(False)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("cgroups", MODES)
def test_setsid_escapee_with_an_empty_environment_dies_with_the_daemon(
    tmp_path: Path, cgroups: bool, how: str
) -> None:
    linger = 0.0 if cgroups else 3.0
    units = _escapee_unit(tmp_path, linger)
    env = {"DYNSUP_CGROUPS": "1" if cgroups else "0"}
    if how == "SIGKILL":
        # Only the in-process agent's units die with a killed daemon; the agent
        # process keeps them for the next one (tests/test_agent_process.py).
        env["DYNSUP_AGENT"] = "inprocess"
    with run_dynsupd(tmp_path, units, env=env) as daemon:
        daemon.wait_state("esc", "RUNNING")
        pids = _escapee_pids(daemon)
        if not cgroups:
            # The fallback attributes what a scan saw: let the middle process
            # exit (re-parenting the escapee) after the daemon's sampler ran.
            # The subreaper is the agent: the daemon itself, or its agent process.
            reaper = daemon.proc.pid
            if how != "SIGKILL":
                started = daemon.wait_event(lambda e: e.get("event") == "agent.started")
                reaper = started["pid"]
            deadline = time.monotonic() + 30
            while alive(pids[1]) and psutil.Process(pids[1]).ppid() != reaper:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        daemon.proc.send_signal(getattr(signal, how))
        daemon.proc.wait(60)
        _wait_dead(pids)
