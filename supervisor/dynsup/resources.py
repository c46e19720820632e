"""What each unit costs now: CPU and memory of its whole process tree, GPU memory.

One pass over ``/proc`` serves every unit (300 units cost one walk, not
300): each ``/proc/<pid>/stat`` is read once and gives parent, process
group, CPU times and RSS. A unit's processes are

* the members of its own cgroup v2 (``cgroup.procs``) when its leader runs
  in one that is not the daemon's (nothing escapes a cgroup); otherwise
* its leader's process group, every descendant of a member (the leader's
  forks, also after ``setsid()``), and orphans re-parented to this
  process (we are their subreaper) that carry the leader's
  ``DYNSUP_TOKEN``.

Blocking and synchronous on purpose: callers run `ResourceMonitor.sample`
in a worker thread (`status`) or in the metrics server's own thread, never
on the event loop. Units on other nodes (Ray agents elsewhere) are not
measured here: their fields are None.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import psutil

from .cgroups import cgroup2_mount, own_cgroup
from .gpumem import GpuProbe
from .lineage import token_of
from .process import TOKEN_VAR

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TOKEN = f"{TOKEN_VAR}=".encode()


@dataclass(frozen=True)
class Leader:
    """What a sample needs of a unit: its leader's pid, where it runs, its GPUs."""

    pid: int
    node: str | None = None
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    """One unit's resources at one moment (None: not measurable from here)."""

    processes: int
    cpu_seconds: float  # user + system of the live members and the children they reaped
    cpu_percent: float | None  # over the interval since the previous sample
    rss_bytes: int
    gpu_memory_bytes: int | None  # None without NVML
    gpu_memory: tuple[tuple[str, int], ...]  # (gpu index, bytes) held, per GPU
    pids: frozenset[int]


@dataclass(frozen=True)
class _Proc:
    ppid: int
    pgid: int
    cpu: float  # seconds
    rss: int  # bytes
    start: int  # clock ticks after boot: tells a reused pid


def read_proc_table(proc: str = "/proc") -> dict[int, _Proc]:
    """Every process of this machine, from one read of each ``stat`` file."""
    table: dict[int, _Proc] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # gone meanwhile
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        try:
            table[int(entry)] = _Proc(
                ppid=int(fields[1]),
                pgid=int(fields[2]),
                cpu=sum(int(x) for x in fields[11:15]) / _TICK,
                rss=int(fields[21]) * _PAGE,
                start=int(fields[19]),
            )
        except (IndexError, ValueError):
            continue
    return table


def _children_map(table: Mapping[int, _Proc]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    return children


_CGROUP2_MOUNT = cgroup2_mount()


class _Members:
    """Finds each unit's processes in one proc table."""

    def __init__(
        self, table: Mapping[int, _Proc], host_pid: int, cgroups: dict[tuple[int, int], str | None]
    ) -> None:
        self.table = table
        self.cgroups = cgroups
        self.children = _children_map(table)
        self.by_group: dict[int, list[int]] = {}
        for pid, proc in table.items():
            self.by_group.setdefault(proc.pgid, []).append(pid)
        self.host_pid = host_pid
        self._orphans: list[tuple[int, str | None]] | None = None
        self._cgroup_root = _CGROUP2_MOUNT
        self._host_cgroup = own_cgroup("self")

    def of(self, leader: int, leaders: set[int]) -> set[int]:
        if leader not in self.table:
            return set()
        members = self._cgroup_members(leader)
        if members is not None:
            return members
        found = set(self.by_group.get(leader, ()))
        found.add(leader)
        token = None
        for orphan, orphan_token in self._host_orphans(leaders):
            if token is None:
                token = token_of(leader, _TOKEN) or ""
            if token and orphan_token == token:
                found.add(orphan)
        todo = list(found)
        while todo:
            for child in self.children.get(todo.pop(), ()):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def _cgroup_members(self, leader: int) -> set[int] | None:
        """The leader's own cgroup's processes, if it has one (not the daemon's)."""
        if self._cgroup_root is None:
            return None
        # A leader is put in its cgroup before it runs and stays there: looked up
        # once per process (300 units would cost 300 reads per sample).
        key = (leader, self.table[leader].start)
        if key not in self.cgroups:
            self.cgroups[key] = own_cgroup(leader)
        path = self.cgroups[key]
        if path is None or path == self._host_cgroup or path == "/":
            return None
        try:
            with open(f"{self._cgroup_root}{path}/cgroup.procs") as f:
                return {int(line) for line in f if line.strip()}
        except (OSError, ValueError):
            return None

    def _host_orphans(self, leaders: set[int]) -> list[tuple[int, str | None]]:
        """Children of this process that are not unit leaders: escaped descendants
        re-parented to us. Their tokens are read once per sample."""
        if self._orphans is None:
            self._orphans = [
                (pid, token_of(pid, _TOKEN))
                for pid in self.children.get(self.host_pid, ())
                if pid not in leaders
            ]
        return self._orphans


def local_node_names() -> frozenset[str]:
    """The names a unit's node may have when it runs on this machine."""
    names = {socket.gethostname(), "127.0.0.1", "localhost"}
    for addrs in psutil.net_if_addrs().values():
        names.update(a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return frozenset(names)


class ResourceMonitor:
    """Samples units' resources; thread-safe, one sample at a time, cached for ``max_age``.

    CPU % is measured between two samples; a unit seen for the first time
    gets its average since its leader started (what ``ps`` shows). ``gpus``
    opens the GPU probe (NVML); it is called only once a unit holds GPUs.
    """

    def __init__(
        self,
        gpus: Callable[[], GpuProbe | None] = lambda: None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gpus = gpus
        self._clock = clock
        self._lock = threading.Lock()
        self._local = local_node_names()
        self._last: dict[str, tuple[int, float, float]] = {}  # name -> (pid, cpu, at)
        self._cached: tuple[float, dict[str, Usage]] | None = None
        self._boot = psutil.boot_time()
        self._cgroups: dict[tuple[int, int], str | None] = {}  # (pid, start) -> cgroup

    def sample(self, leaders: Mapping[str, Leader], max_age: float = 0.0) -> dict[str, Usage]:
        """Usage of every unit in leaders that runs on this machine (others are left out)."""
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] <= max_age:
                cached = self._cached[1]
                # Fresh enough, if it measured these units' current processes.
                if all(
                    name in cached and leaders[name].pid in cached[name].pids
                    for name in self._measurable(leaders)
                ):
                    return {n: cached[n] for n in leaders if n in cached}
            usage = self._sample(leaders, now)
            self._cached = (now, usage)
            return usage

    def _measurable(self, leaders: Mapping[str, Leader]) -> Iterable[str]:
        return (n for n, lead in leaders.items() if lead.node is None or lead.node in self._local)

    def _sample(self, leaders: Mapping[str, Leader], now: float) -> dict[str, Usage]:
        table = read_proc_table()
        self._cgroups = {k: v for k, v in self._cgroups.items() if k[0] in table}
        members = _Members(table, os.getpid(), self._cgroups)
        leader_pids = {lead.pid for lead in leaders.values()}
        holds_gpus = any(lead.gpus for lead in leaders.values())
        gpu_by_pid = self._gpu_memory_by_pid() if holds_gpus else None
        wall = time.time()
        usage: dict[str, Usage] = {}
        for name in self._measurable(leaders):
            lead = leaders[name]
            pids = members.of(lead.pid, leader_pids)
            if not pids:
                continue
            cpu = sum(table[p].cpu for p in pids if p in table)
            percent = self._percent(name, lead.pid, cpu, now, table, wall)
            per_gpu: dict[str, int] = {}
            for pid in pids:
                for gpu, used in (gpu_by_pid or {}).get(pid, {}).items():
                    per_gpu[gpu] = per_gpu.get(gpu, 0) + used
            usage[name] = Usage(
                processes=len(pids),
                cpu_seconds=cpu,
                cpu_percent=percent,
                rss_bytes=sum(table[p].rss for p in pids if p in table),
                gpu_memory_bytes=None if gpu_by_pid is None else sum(per_gpu.values()),
                gpu_memory=tuple(sorted(per_gpu.items())),
                pids=frozenset(pids),
            )
        # Kept for the units not asked this time (`status NAME`), while they run.
        self._last = {n: last for n, last in self._last.items() if last[0] in table}
        self._last.update({n: (leaders[n].pid, u.cpu_seconds, now) for n, u in usage.items()})
        return usage

    def _percent(
        self, name: str, pid: int, cpu: float, now: float, table: Mapping[int, _Proc], wall: float
    ) -> float | None:
        last = self._last.get(name)
        if last is not None and last[0] == pid and now > last[2]:
            return max(0.0, (cpu - last[1]) / (now - last[2]) * 100.0)
        # First sight of this process: its average since it started.
        alive_for = wall - (self._boot + table[pid].start / _TICK)
        return cpu / alive_for * 100.0 if alive_for > 0.05 else None

    def _gpu_memory_by_pid(self) -> dict[int, dict[str, int]] | None:
        """pid -> GPU -> bytes held; None without NVML."""
        probe = self._gpus()
        if probe is None:
            return None
        by_pid: dict[int, dict[str, int]] = {}
        for holder in probe.holders():
            held = by_pid.setdefault(holder.pid, {})
            held[holder.gpu] = held.get(holder.gpu, 0) + holder.used_bytes
        return by_pid
