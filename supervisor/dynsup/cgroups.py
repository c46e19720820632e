"""cgroup v2 containment: one cgroup per hosted process group, nothing escapes it.

Layout (the agent's own cgroup comes from /proc/self/cgroup, the mount from
/proc/self/mountinfo; neither is assumed)::

    <own cgroup>/                      the daemon's cgroup (systemd: dynsupd.service)
        supervisor/                    the daemon itself, when <own> is not the root
        dynsup-<agent id>/             one subtree per agent
            <instance name>/           one leaf per hosted process group

cgroup v2 lets processes live only in leaves once controllers are enabled
below a cgroup ("no internal processes"); under systemd ``Delegate=yes`` the
daemon therefore moves itself into the ``supervisor`` leaf before creating
siblings of it. In the root cgroup (a container, a bare root shell) the rule
does not apply and nothing moves.

Membership is ``cgroup.procs``; "the group is empty" is ``populated 0`` in
``cgroup.events``, learned from inotify (one fd per agent, one watch per
cgroup: event-driven, no polling); ``cgroup.kill`` SIGKILLs every member at
once, whatever it did with sessions, process groups or its environment.

``DYNSUP_CGROUPS=0`` forces the process-group fallback (tests run both modes).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog

log = structlog.get_logger("dynsup.cgroups")

ENV_SWITCH = "DYNSUP_CGROUPS"
SUPERVISOR_LEAF = "supervisor"
AGENT_PREFIX = "dynsup-"

_IN_MODIFY = 0x00000002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


class CgroupUnavailable(Exception):
    """cgroup v2 is absent, not writable, or switched off: use process groups."""


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where cgroup2 is mounted (``/sys/fs/cgroup``, or ``.../unified`` in hybrid mode)."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        # "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if len(fields) >= 5 and fields[3] == "/":
                return Path(fields[4].replace("\\040", " "))
    return None


def own_cgroup(pid: int | str = "self") -> str | None:
    """This process's cgroup v2 path ("/" for the root), from the ``0::`` line."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except OSError:
        pass
    return None


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "no", "false", "off")


def _populated(path: Path) -> bool:
    try:
        text = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False  # removed: nothing can be in it
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() != "0"
    return False


@dataclass
class UnitCgroup:
    """The leaf cgroup of one hosted process group."""

    path: Path
    wd: int
    tree: AgentCgroups = field(repr=False)

    @contextlib.contextmanager
    def hosting(self) -> Iterator[None]:
        """This process inside the leaf for the duration: a child spawned meanwhile
        starts in it, before it can run a single instruction of its own.

        Python 3.11's subprocess has no ``cgroup=`` (clone3 CLONE_INTO_CGROUP),
        and moving the child after Popen returns races with an early fork. A
        preexec_fn that moves the child works, but forces fork instead of vfork:
        3 ms per spawn in a 55 MB daemon, most of a 500-unit start. Moving the
        spawner itself costs two writes (~20 us) and keeps vfork. The spawner
        is in the leaf for one Popen call on the event loop thread; the daemon's
        other threads fork nothing meanwhile.
        """
        os.write(self.tree.enter_fd(self), str(os.getpid()).encode())
        try:
            yield
        finally:
            self.tree.go_home()

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def populated(self) -> bool:
        return _populated(self.path)

    def kill(self) -> None:
        """SIGKILL every member, atomically with respect to forks (kernel 5.14+)."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / "cgroup.kill").write_text("1")

    async def wait_empty(self) -> None:
        await self.tree.wait_empty(self)

    def remove(self) -> bool:
        """rmdir once empty; False when something is still inside (it stays for the warden)."""
        self.tree.unwatch(self)
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
        return True


class AgentCgroups:
    """One agent's cgroup subtree and the inotify fd that reports its leaves emptying."""

    def __init__(self, mount: Path, root: Path) -> None:
        self.root = root
        self.name = "/" + str(root.relative_to(mount))  # as /proc/<pid>/cgroup writes it
        # Where this process itself lives (a spawn visits a leaf and comes back).
        self._home_fd = os.open(
            mount / own_cgroup().lstrip("/") / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC
        )
        self._procs_fds: dict[int, int] = {}
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            raise CgroupUnavailable(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        # Per watch: an Event set (and replaced) on every change of cgroup.events.
        self._changed: dict[int, anyio.Event] = {}

    @classmethod
    def create(cls, agent_id: str | None = None) -> AgentCgroups:
        """Make ``<own>/dynsup-<id>``; CgroupUnavailable when the kernel or rights say no."""
        if not enabled_by_env():
            raise CgroupUnavailable(f"switched off by {ENV_SWITCH}")
        mount = cgroup2_mount()
        own = own_cgroup()
        if mount is None or own is None:
            raise CgroupUnavailable("no cgroup2 mount")
        base = mount / own.lstrip("/")
        if own != "/" and base.name == SUPERVISOR_LEAF:
            base = base.parent  # already moved by an earlier agent of this process
        elif own != "/":
            _move_self_to_leaf(base / SUPERVISOR_LEAF)
        root = base / f"{AGENT_PREFIX}{agent_id or uuid.uuid4().hex[:12]}"
        try:
            root.mkdir(exist_ok=True)
            if not (root / "cgroup.kill").exists():
                os.rmdir(root)
                raise CgroupUnavailable("no cgroup.kill (kernel before 5.14)")
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {root}: {exc}") from exc
        return cls(mount, root)

    def add(self, name: str) -> UnitCgroup:
        path = self.root / name
        # It may exist: a previous group of that name whose rmdir failed (the
        # agent's spawn checked that the name is free, so it is empty by now).
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        events = str(path / "cgroup.events").encode()
        wd = self._libc.inotify_add_watch(self._fd, events, _IN_MODIFY)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return UnitCgroup(path=path, wd=wd, tree=self)

    def enter_fd(self, cg: UnitCgroup) -> int:
        fd = self._procs_fds.get(cg.wd)
        if fd is None:
            fd = self._procs_fds[cg.wd] = os.open(
                cg.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC
            )
        return fd

    def go_home(self) -> None:
        os.write(self._home_fd, str(os.getpid()).encode())

    def unwatch(self, cg: UnitCgroup) -> None:
        fd = self._procs_fds.pop(cg.wd, None)
        if fd is not None:
            os.close(fd)
        self._libc.inotify_rm_watch(self._fd, cg.wd)
        event = self._changed.pop(cg.wd, None)
        if event is not None:
            event.set()

    async def wait_empty(self, cg: UnitCgroup) -> None:
        while True:
            # Take the event before reading the file: a change in between wakes us.
            event = self._changed.setdefault(cg.wd, anyio.Event())
            if not cg.populated():
                return
            await event.wait()

    async def run_events(self) -> None:
        """Dispatch inotify events to the waiters; runs for the agent's lifetime."""
        while True:
            await anyio.wait_readable(self._fd)
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                continue
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                wd, _mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size + length
                event = self._changed.pop(wd, None)
                if event is not None:
                    event.set()

    def leaves(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.is_dir()]
        except OSError:
            return []

    def close(self) -> None:
        """Remove what is empty; a leaf still populated stays for the warden to kill."""
        for leaf in self.leaves():
            with contextlib.suppress(OSError):
                os.rmdir(leaf)
        with contextlib.suppress(OSError):
            os.rmdir(self.root)
        for fd in (self._fd, self._home_fd, *self._procs_fds.values()):
            os.close(fd)
        self._procs_fds.clear()


def _move_self_to_leaf(leaf: Path) -> None:
    try:
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        raise CgroupUnavailable(f"cannot move into {leaf}: {exc}") from exc
    log.info("cgroup.moved_self", cgroup=str(leaf))
