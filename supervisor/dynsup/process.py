"""One process group: spawn, watch, signal, and tear down without leftovers.

Every child is started as a session and process-group leader
(``start_new_session``), so one ``killpg`` reaches everything that stays in
its group (vLLM's EngineCore and workers do). Programs that call
``setsid()`` or double-fork leave the group; we find them anyway:

* the host process is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so an
  orphaned descendant is re-parented to us rather than to init and stays
  among our descendants;
* every child gets a unique ``DYNSUP_TOKEN`` in its environment, which its
  descendants inherit; a descendant of ours with our token (or with our
  group id) belongs to the unit.

Each found process is remembered with its kernel start time, and checked
again before any signal, so a reused pid is never hit.

Where cgroup v2 is writable (see `cgroups`), each group also lives in a
cgroup of its own: membership is the kernel's, "empty" is an inotify event
and ``cgroup.kill`` ends it; escapees cannot exist. Elsewhere the lineage
(see `lineage`) finds what left the group.

The leader's exit is learned from a pidfd becoming readable (event-driven,
no polling, no SIGCHLD handler). Without cgroups there is no kernel event for
"a process group became empty", so only that wait polls, with a short
interval, one shared scan per tick, and only while a stop or a post-exit
clean-up is in progress.

SIGKILL is bounded: what is still there ``KILL_GRACE`` seconds after it (a
process in uninterruptible sleep) raises `StopFailed` naming the pids.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import psutil

from .agent_api import ExitStatus, SpawnError, StopFailed
from .cgroups import UnitCgroup
from .lineage import Known, Lineage, Scan, is_same, read_stat

TOKEN_VAR = "DYNSUP_TOKEN"
_PR_SET_CHILD_SUBREAPER = 36
PIPE_SIZE = 1 << 20
# Polling interval while waiting for a group to empty: short at first so a
# well-behaved program that exits at once is noticed within a few ms.
_EMPTY_POLL_FIRST = 0.002
_EMPTY_POLL_MAX = 0.05
# How long processes may outlive SIGKILL before the stop fails loudly: the
# kernel ends a killed process within milliseconds unless it sleeps
# uninterruptibly (a hung NFS or GPU driver call), which may last forever.
KILL_GRACE = 5.0


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_status_from_wait(status: int) -> ExitStatus:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return ExitStatus(code=None, signal=signal.Signals(-code).name)
    return ExitStatus(code=code, signal=None)


def _enlarge_pipe(fd: int) -> None:
    """A 1 MiB pipe (Linux's default is 64 KiB): a child printing in bursts goes on
    writing while the agent is busy elsewhere, and each read takes more at once."""
    with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: keep the default
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


Scanner = Callable[[], Awaitable[Scan]]


def _check_nul(name: str, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> None:
    """exec takes C strings: name the key holding a NUL byte (Popen says only "embedded null")."""
    for i, arg in enumerate(argv):
        if "\0" in arg:
            raise SpawnError(f"{name}: command[{i}] contains a NUL byte")
    for key, value in env.items():
        if "\0" in key or "\0" in value:
            raise SpawnError(f"{name}: environment {key!r} contains a NUL byte")
    if cwd is not None and "\0" in cwd:
        raise SpawnError(f"{name}: working_directory contains a NUL byte")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _start_time(pid: int) -> float:
    """The kernel's start time of pid as psutil's create_time() gives it (seconds since
    the epoch), from one read of /proc/<pid>/stat; 0.0 when it is already gone."""
    stat = read_stat(pid)
    return 0.0 if stat is None else stat.start / _CLOCK_TICKS + psutil.boot_time()


@dataclass
class ProcessGroup:
    """A spawned leader and everything it started."""

    name: str
    pid: int
    start_time: float
    token: str
    stdout_fd: int
    stderr_fd: int
    cgroup: UnitCgroup | None = None
    status: ExitStatus | None = None
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _leader_gone: anyio.Event = field(default_factory=anyio.Event, repr=False)
    _teardown_lock: anyio.Lock = field(default_factory=anyio.Lock, repr=False)
    _scanner: Scanner | None = field(default=None, repr=False)
    _lineage: Lineage | None = field(default=None, repr=False)  # without an agent's scanner

    @property
    def pgid(self) -> int:
        # Recorded at spawn (pgid == pid for a session leader): once the
        # leader is reaped getpgid fails, but killpg still reaches the group.
        return self.pid

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        cgroup: UnitCgroup | None = None,
        scanner: Scanner | None = None,
    ) -> ProcessGroup:
        """Start argv as a session leader (in cgroup, when given); SpawnError when it cannot run.

        scanner: the agent's shared lineage scan; without one (a group on its
        own) each stop tick scans by itself.
        """
        if not argv:
            raise SpawnError(f"{name}: empty command")
        _check_nul(name, argv, env, cwd)
        token = f"{name}:{uuid.uuid4().hex}"
        child_env = {**env, TOKEN_VAR: token}
        # The child's ends are closed always, ours on failure (trio's _open_process).
        with contextlib.ExitStack() as always, contextlib.ExitStack() as on_failure:
            out_r, out_w = os.pipe()
            on_failure.callback(os.close, out_r)
            always.callback(os.close, out_w)
            err_r, err_w = os.pipe()
            on_failure.callback(os.close, err_r)
            always.callback(os.close, err_w)
            for fd in (out_r, err_r):
                _enlarge_pipe(fd)
            try:
                with cgroup.hosting() if cgroup is not None else contextlib.nullcontext():
                    popen = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out_w,
                        stderr=err_w,
                        env=child_env,
                        cwd=cwd,
                        start_new_session=True,
                        close_fds=True,
                    )
            except OSError as exc:
                raise SpawnError(f"{name}: cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
            except (ValueError, TypeError) as exc:
                raise SpawnError(f"{name}: cannot run {argv[0]!r}: {exc}") from exc
            on_failure.pop_all()
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        start_time = _start_time(popen.pid)
        return cls(
            name=name,
            pid=popen.pid,
            start_time=start_time,
            token=token,
            stdout_fd=out_r,
            stderr_fd=err_r,
            cgroup=cgroup,
            _popen=popen,
            _scanner=scanner,
        )

    # -- the leader -------------------------------------------------------

    async def watch_leader(self) -> ExitStatus:
        """Wait for the leader to exit and reap it. Run exactly once per group."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            pidfd = None
        try:
            while True:
                if pidfd is not None:
                    await anyio.wait_readable(pidfd)
                status = self.reap_nowait()
                if status is not None:
                    return status
                await anyio.sleep(_EMPTY_POLL_MAX)  # no pidfd: kernels before 5.3
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def reap_nowait(self) -> ExitStatus | None:
        """Reap the leader if it has exited: its status, else None. Never blocks.

        `watch_leader` waits with it; a watcher of many leaders (the agent's
        `LeaderWatch`, over their pidfds) calls it instead of watch_leader.
        """
        try:
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it: we cannot know how it ended.
            status = ExitStatus(code=None, signal="UNKNOWN")
        else:
            if pid != self.pid:
                return None
            status = exit_status_from_wait(wait_status)
        self.status = status
        if self._popen is not None:
            # Keep subprocess from reaping (a possibly reused) pid later.
            self._popen.returncode = os.EX_OK if status.code is None else status.code
        self._leader_gone.set()
        return status

    @property
    def leader_alive(self) -> bool:
        return not self._leader_gone.is_set()

    # -- the group and its escapees ------------------------------------------

    async def members(self) -> list[Known]:
        """Living processes of this unit besides the leader (read in a worker thread)."""
        if self.cgroup is not None:
            cg = self.cgroup
            pids = await anyio.to_thread.run_sync(cg.pids)
            return [k for k in map(_known_now, pids) if k is not None and k.pid != self.pid]
        scan = await (self._scanner or self._own_scan)()
        return scan.members.get(self.name, [])

    async def _own_scan(self) -> Scan:
        if self._lineage is None:
            self._lineage = Lineage(TOKEN_VAR)
            self._lineage.add(self.name, self.pid, self.token)
        return await self._lineage.scan()

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the whole group (what `dynsupctl signal` and a stop do first)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def send_signal_to(self, sig: signal.Signals, members: Iterable[Known]) -> None:
        """Signal each escapee that is still the process we recorded."""
        for known in members:
            if _pgid_of(known.pid) != self.pgid:
                _kill_if_same(known, sig)

    def _group_empty(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    async def terminate(self, sig: signal.Signals, timeout: float) -> None:
        """Stop everything of this unit: sig, wait until empty up to timeout, then SIGKILL.

        Returns once the leader is reaped and no member or escapee is alive.
        Raises StopFailed when something outlives SIGKILL by KILL_GRACE.
        Safe to call concurrently and repeatedly; later callers find nothing left.
        """
        if self._teardown_lock.locked():
            # Another teardown runs (the clean-up after the leader's exit, with
            # its own stop_timeout): this caller's signal and deadline apply too.
            await self._hurry(sig, timeout)
        async with self._teardown_lock:
            if self.cgroup is not None:
                await self._terminate_cgroup(self.cgroup, sig, timeout)
                return
            if await self._signal_until_gone(sig, timeout):
                return
            with anyio.move_on_after(KILL_GRACE):
                # Repeat until nothing is left: a member may fork while being killed.
                while not await self._signal_until_gone(signal.SIGKILL, 1.0):
                    pass
                return
            left = [m.pid for m in await self.members()]
            if self.leader_alive:
                left.insert(0, self.pid)
            raise self._stop_failed(left)

    async def _hurry(self, sig: signal.Signals, timeout: float) -> None:
        self.send_signal(sig)
        with anyio.move_on_after(timeout):
            async with self._teardown_lock:
                return  # the running teardown ended first
        self.send_signal(signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()
        else:
            self.send_signal_to(signal.SIGKILL, await self.members())

    def _stop_failed(self, pids: list[int]) -> StopFailed:
        return StopFailed(
            f"{self.name}: pids {' '.join(map(str, pids)) or '?'} still there "
            f"{KILL_GRACE:g}s after SIGKILL (uninterruptible sleep?)",
            pids,
        )

    async def _terminate_cgroup(self, cg: UnitCgroup, sig: signal.Signals, timeout: float) -> None:
        if cg.populated() or self.leader_alive:
            self.send_signal(sig)
            # Members that left the process group get sig too (each checked
            # to be in the cgroup still, through a pidfd: never a reused pid).
            for pid in await anyio.to_thread.run_sync(cg.pids):
                _signal_in_cgroup(pid, cg, sig)
            with anyio.move_on_after(timeout):
                await cg.wait_empty()
                await self._leader_gone.wait()
                return
            # Atomic: a member forking in a loop cannot outrun it.
            cg.kill()
            with anyio.move_on_after(KILL_GRACE):
                await cg.wait_empty()
                await self._leader_gone.wait()
                return
            raise self._stop_failed(await anyio.to_thread.run_sync(cg.pids))

    async def _signal_until_gone(self, sig: signal.Signals, timeout: float) -> bool:
        """Send sig to the group and to every member found, until all are gone or timeout."""
        signalled: set[Known] = set()
        group_signalled = False
        interval = _EMPTY_POLL_FIRST
        with anyio.move_on_after(timeout):
            while True:
                members = await self.members()
                if not self.leader_alive and not members and self._group_empty():
                    return True
                if not group_signalled:
                    self.send_signal(sig)
                    group_signalled = True
                # Escapees found later (a fork during the stop) get sig too.
                fresh = [m for m in members if m not in signalled]
                self.send_signal_to(sig, fresh)
                signalled.update(fresh)
                await anyio.sleep(interval)
                interval = min(interval * 2, _EMPTY_POLL_MAX)
        return False


def _known_now(pid: int) -> Known | None:
    stat = read_stat(pid)
    return None if stat is None else Known(pid, stat.start)


def _signal_in_cgroup(pid: int, cg: UnitCgroup, sig: signal.Signals) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # The pidfd pins the process: if it is still in the cgroup now, it is ours.
        with open(f"/proc/{pid}/cgroup") as f:
            if not f.read().rstrip().endswith("/" + cg.path.name):
                return
        signal.pidfd_send_signal(pidfd, sig)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _kill_if_same(known: Known, sig: signal.Signals) -> None:
    """Signal pid only if it is still the process recorded (start time matches)."""
    if not is_same(known):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(known.pid, sig)
