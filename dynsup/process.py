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

The leader's exit is learned from a pidfd becoming readable (event-driven,
no polling, no SIGCHLD handler). There is no kernel event for "a process
group became empty", so only that wait polls, with a short interval, and
only while a stop or a post-exit clean-up is in progress.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import psutil

from .agent_api import ExitStatus, SpawnError
from .signals import parse_signal

TOKEN_VAR = "DYNSUP_TOKEN"
_PR_SET_CHILD_SUBREAPER = 36
PIPE_SIZE = 1 << 20
# Polling interval while waiting for a group to empty: short at first so a
# well-behaved program that exits at once is noticed within a few ms.
_EMPTY_POLL_FIRST = 0.002
_EMPTY_POLL_MAX = 0.05


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def signal_by_name(name: str | int) -> signal.Signals:
    return parse_signal(name)


def exit_status_from_wait(status: int) -> ExitStatus:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return ExitStatus(code=None, signal=signal.Signals(-code).name)
    return ExitStatus(code=code, signal=None)


@dataclass(frozen=True)
class _Known:
    pid: int
    start_time: float


def _enlarge_pipe(fd: int) -> None:
    """A 1 MiB pipe (Linux's default is 64 KiB): a child printing in bursts goes on
    writing while the agent is busy elsewhere, and each read takes more at once."""
    with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: keep the default
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


@dataclass
class ProcessGroup:
    """A spawned leader and everything it started."""

    name: str
    pid: int
    start_time: float
    token: str
    stdout_fd: int
    stderr_fd: int
    status: ExitStatus | None = None
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _leader_gone: anyio.Event = field(default_factory=anyio.Event, repr=False)
    _teardown_lock: anyio.Lock = field(default_factory=anyio.Lock, repr=False)
    _escapees: set[_Known] = field(default_factory=set, repr=False)

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
    ) -> ProcessGroup:
        if not argv:
            raise SpawnError(f"{name}: empty command")
        token = f"{name}:{uuid.uuid4().hex}"
        child_env = {**env, TOKEN_VAR: token}
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            _enlarge_pipe(fd)
        try:
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
            for fd in (out_r, err_r):
                os.close(fd)
            raise SpawnError(f"{name}: cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        finally:
            os.close(out_w)
            os.close(err_w)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        try:
            start_time = psutil.Process(popen.pid).create_time()
        except psutil.Error:
            start_time = 0.0  # already gone and reaped elsewhere: nothing to protect
        return cls(
            name=name,
            pid=popen.pid,
            start_time=start_time,
            token=token,
            stdout_fd=out_r,
            stderr_fd=err_r,
            _popen=popen,
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
                try:
                    pid, status = os.waitpid(self.pid, 0 if pidfd is not None else os.WNOHANG)
                except ChildProcessError:
                    # Someone else reaped it: we cannot know how it ended.
                    self.status = ExitStatus(code=None, signal="UNKNOWN")
                    break
                if pid == self.pid:
                    self.status = exit_status_from_wait(status)
                    break
                await anyio.sleep(_EMPTY_POLL_MAX)  # no pidfd: kernels before 5.3
        finally:
            if pidfd is not None:
                os.close(pidfd)
        if self._popen is not None:
            # Keep subprocess from reaping (a possibly reused) pid later.
            self._popen.returncode = os.EX_OK if self.status.code is None else self.status.code
        self._leader_gone.set()
        return self.status

    @property
    def leader_alive(self) -> bool:
        return not self._leader_gone.is_set()

    # -- the group and its escapees ------------------------------------------

    def members(self) -> list[_Known]:
        """Living processes of this unit besides the leader: its group, and escapees.

        Candidates are our own descendants (the subreaper keeps orphans
        among them); a candidate belongs to the unit when it is in the
        unit's process group or carries the unit's token.
        """
        found: list[_Known] = []
        candidates = [psutil.Process(pid) for pid in own_descendants()]
        for proc in candidates:
            if proc.pid == self.pid:
                continue  # the leader is reaped by watch_leader only
            try:
                pgid = _pgid_of(proc.pid)
                if proc.status() == psutil.STATUS_ZOMBIE:
                    # Reap only what is provably ours: another unit's leader is a
                    # zombie of ours too until its own watcher reaps it.
                    known = _Known(proc.pid, proc.create_time())
                    if pgid == self.pgid or known in self._escapees:
                        self._reap_if_ours(proc.pid)
                    continue
                if pgid == self.pgid:
                    found.append(_Known(proc.pid, proc.create_time()))
                elif self._has_token(proc):
                    known = _Known(proc.pid, proc.create_time())
                    self._escapees.add(known)
                    found.append(known)
            except psutil.Error:
                continue
        return found

    def _has_token(self, proc: psutil.Process) -> bool:
        try:
            return proc.environ().get(TOKEN_VAR) == self.token
        except (psutil.Error, OSError):
            return False

    @staticmethod
    def _reap_if_ours(pid: int) -> None:
        try:
            if psutil.Process(pid).ppid() == os.getpid():
                os.waitpid(pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the whole group (what `dynsupctl signal` and a stop do first)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def send_signal_to(self, sig: signal.Signals, members: Iterable[_Known]) -> None:
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
        Safe to call concurrently and repeatedly; later callers find nothing left.
        """
        async with self._teardown_lock:
            if await self._signal_until_gone(sig, timeout):
                return
            # Repeat until nothing is left: a member may fork while being killed.
            while not await self._signal_until_gone(signal.SIGKILL, 1.0):
                pass

    async def _signal_until_gone(self, sig: signal.Signals, timeout: float) -> bool:
        """Send sig to the group and to every member found, until all are gone or timeout."""
        signalled: set[_Known] = set()
        group_signalled = False
        interval = _EMPTY_POLL_FIRST
        with anyio.move_on_after(timeout):
            while True:
                members = self.members()
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


def own_descendants(root: int | None = None) -> list[int]:
    """Pids below root (default: this process), read from /proc/<pid>/task/*/children.

    Walks only our own tree, so its cost grows with what we supervise, not with
    every process on the node (psutil's children() reads all of /proc).
    """
    root = os.getpid() if root is None else root
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            todo.extend(children)
    return found


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _kill_if_same(known: _Known, sig: signal.Signals) -> None:
    """Signal pid only if it is still the process recorded (start time matches)."""
    try:
        if psutil.Process(known.pid).create_time() != known.start_time:
            return
        os.kill(known.pid, sig)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass
