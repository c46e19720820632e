"""Who belongs to which unit, without cgroups: one shared scan of our own process tree.

The agent is a child subreaper, so every orphan of a unit is re-parented to
it and stays in the tree below it. A scan walks that tree (never all of
/proc) in a worker thread and attributes each process, first match wins:

1. seen before: the unit remembered for its (pid, start time);
2. in a leader's process group;
3. its parent is attributed (lineage: a child belongs to its parent's unit);
4. it carries a unit's ``DYNSUP_TOKEN`` in its environment.

Remembering what was seen is what keeps an escapee that calls ``setsid()``
and clears its environment (``env -i``) attributed after its parent exits.
What was never seen alive under its unit (forked, orphaned and re-exec'ed
between two scans) cannot be attributed: the agent scans while it hosts
anything (``SAMPLE_INTERVAL``) and on every stop tick, and cgroups close
that gap where the kernel allows them.

A scan also reaps the zombies the subreaper inherited: a zombie child of
ours that is not a leader (its watcher reaps it) and that we saw with
another parent, or that is attributed to a unit, was never forked by us,
so neither a leader's watcher nor asyncio's child watcher waits for it.

Concurrent stops share scans: a caller waits for the next scan to start
after its call and gets its result (one scan per tick, not one per unit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

SAMPLE_INTERVAL = 0.5


@dataclass(frozen=True)
class Known:
    """A process as recorded: the pid and its start time in clock ticks since boot."""

    pid: int
    start: int


@dataclass(frozen=True)
class Stat:
    state: str
    ppid: int
    pgid: int
    start: int


def read_stat(pid: int) -> Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return Stat(fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def is_same(known: Known) -> bool:
    stat = read_stat(known.pid)
    return stat is not None and stat.start == known.start and stat.state != "Z"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def token_of(pid: int, var: bytes) -> str | None:
    """The value of ``var`` (b"NAME=") in the process's environment, or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(var):
                    return entry[len(var) :].decode(errors="replace")
    except OSError:
        pass
    return None


@dataclass
class Scan:
    """Living members per unit (leaders excluded) and the pids reaped by this scan."""

    members: dict[str, list[Known]] = field(default_factory=dict)
    reaped: list[int] = field(default_factory=list)


class Lineage:
    """The agent's record of its units' processes (fallback mode and reaping)."""

    def __init__(self, token_var: str, cgroup_root: str | None = None) -> None:
        self._token_var = (token_var + "=").encode()
        self._cgroup_root = cgroup_root  # the agent's cgroup path ("/dynsup-…"), if any
        self._leaders: dict[int, str] = {}  # leader pid (= pgid) -> unit
        self._tokens: dict[str, str] = {}
        self._known: dict[Known, tuple[str | None, int]] = {}  # -> (unit, ppid when seen)
        self._pending: _Pending | None = None
        self._running: anyio.Event | None = None

    def add(self, unit: str, leader: int, token: str) -> None:
        self._leaders[leader] = unit
        self._tokens[token] = unit

    def remove(self, leader: int, token: str) -> None:
        self._leaders.pop(leader, None)
        self._tokens.pop(token, None)

    def known_of(self, unit: str) -> list[Known]:
        return [k for k, (u, _) in self._known.items() if u == unit]

    async def scan(self) -> Scan:
        """A scan that started after this call (shared with concurrent callers)."""
        if self._pending is None:
            self._pending = _Pending()
        pending = self._pending
        while not pending.done.is_set():
            if self._running is not None:
                await self._running.wait()
                continue
            self._pending, self._running = None, anyio.Event()
            try:
                pending.result = await anyio.to_thread.run_sync(self._scan_sync)
            finally:
                self._running.set()
                self._running = None
                pending.done.set()
        return pending.result

    def _scan_sync(self) -> Scan:
        me = os.getpid()
        leaders = dict(self._leaders)
        tokens = dict(self._tokens)
        scan = Scan()
        seen: dict[Known, tuple[str | None, int]] = {}
        todo: list[tuple[int, str | None]] = [(c, None) for c in _children(me)]
        while todo:
            pid, parent_unit = todo.pop()
            stat = read_stat(pid)
            if stat is None:
                continue
            known = Known(pid, stat.start)
            previous = self._known.get(known)
            unit = previous[0] if previous is not None else None
            if unit is None:
                unit = leaders.get(stat.pgid) or parent_unit
            if unit is None and stat.state != "Z":
                token = token_of(pid, self._token_var)
                unit = tokens.get(token) if token is not None else None
            # Keep the first parent seen: an orphan re-parented to us keeps its lineage.
            seen[known] = (unit, previous[1] if previous is not None else stat.ppid)
            if stat.state == "Z":
                if stat.ppid == me and pid not in leaders and self._inherited(known, unit, seen):
                    try:
                        if os.waitpid(pid, os.WNOHANG)[0] == pid:
                            scan.reaped.append(pid)
                    except ChildProcessError:
                        pass
                continue
            if unit is not None and pid not in leaders:
                scan.members.setdefault(unit, []).append(known)
            todo.extend((c, unit) for c in _children(pid))
        self._known = seen
        return scan

    def _inherited(
        self, known: Known, unit: str | None, seen: dict[Known, tuple[str | None, int]]
    ) -> bool:
        """A zombie child of ours that we did not fork (so no watcher of ours waits for it)."""
        if unit is not None:
            return True
        if seen[known][1] != os.getpid():
            return True  # seen earlier below another parent
        if self._cgroup_root is None:
            return False
        try:
            with open(f"/proc/{known.pid}/cgroup") as f:
                return f"0::{self._cgroup_root}/" in f.read()
        except OSError:
            return False


@dataclass
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Scan = field(default_factory=Scan)
