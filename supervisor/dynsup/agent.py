"""The in-process agent: hosts process groups and turns their output into log chunks.

Its public methods are the `Agent` contract (async, plain data in and out),
so the very same class can be hosted by a Ray actor on another node.
It owns a task group: one `LeaderWatch` for every leader's exit, one
`PipeReader` for every pipe, and a clean-up task per process from its
leader's exit until nothing the leader left behind runs.
Pipes are always drained into bounded ring buffers, so a child never
blocks on a slow supervisor or a slow `tail`. With journal settings
(`use_journal`), the agent also sends every line to journald as it reads
it: the output of its units reaches the journal without crossing to the
daemon, even while no daemon runs.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType

import anyio
import psutil
import structlog
from anyio.abc import TaskGroup

from .agent_api import (
    ChunkBatch,
    ExitStatus,
    LogRead,
    NotRunning,
    PortBusy,
    Spawned,
    SpawnError,
    SpawnRequest,
    StopFailed,
)
from .cgroups import AgentCgroups, CgroupUnavailable, enabled_by_env
from .leaders import LeaderWatch
from .lineage import SAMPLE_INTERVAL, Known, Lineage
from .logs import LogStore
from .logs.follow import follow_rings
from .logs.journald import JournalSettings, UnitOutputForwarder
from .logs.pump import READ_SIZE, PipeReader
from .process import TOKEN_VAR, ProcessGroup, become_subreaper
from .signals import parse_signal
from .warden import Warden

log = structlog.get_logger("dynsup.agent")

# After a group is gone, how long its pipes may take to be read to EOF.
DRAIN_TIMEOUT = 1.0


def inherited_env(unset: list[str] | tuple[str, ...]) -> dict[str, str]:
    """This node's environment without the unset names ("DYN_*" is a prefix)."""
    prefixes = tuple(p[:-1] for p in unset if p.endswith("*"))
    exact = {p for p in unset if not p.endswith("*")}
    return {
        key: value
        for key, value in os.environ.items()
        if key not in exact and not (prefixes and key.startswith(prefixes))
    }


def port_holder(port: int) -> str | None:
    """None when port is free to bind (TCP, any address), else who holds it."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("0.0.0.0", port))
    except OSError:
        pass
    else:
        return None
    finally:
        probe.close()
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                return f"pid {conn.pid}" if conn.pid else "another process"
    except psutil.Error:
        pass
    return "another process"


@dataclass
class _Hosted:
    group: ProcessGroup
    stop_signal: str
    stop_timeout: float
    tag: str
    leader_gone: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)  # the leader and its group are gone
    status: ExitStatus | None = None  # the leader's, set once it exited
    open_pipes: int = 2  # stdout and stderr, until the reader reads their EOF
    # Set once both pipes are read to EOF; made only when the clean-up after
    # the leader's exit must wait for them (an Event is ~1 KiB a running unit).
    drained: anyio.Event | None = None


class LocalAgent:
    """Hosts many process groups on this node."""

    def __init__(
        self,
        node: str | None = None,
        log_capacity: int = 1 << 20,
        env: Mapping[str, str] | None = None,
        cgroups: bool | None = None,
        warden: Warden | None = None,
        read_size: int = READ_SIZE,
    ) -> None:
        """``env``: added to every child's environment (a warden's mark).
        ``read_size``: the most one read of a pipe takes (`PipeReader`).

        ``cgroups``: one cgroup v2 per process group where the kernel allows
        (None: unless ``DYNSUP_CGROUPS=0``); False forces the process-group mode.
        ``warden``: told the agent's cgroup and the escapees it sees.
        """
        self.node = node or socket.gethostname()
        self._read_size = read_size
        self._env = dict(env or {})
        self.logs = LogStore(capacity=log_capacity)
        self._hosted: dict[str, _Hosted] = {}
        self._tg: TaskGroup | None = None
        self._pipes: PipeReader | None = None
        self._leaders: LeaderWatch | None = None
        self.subreaper = False
        self._want_cgroups = enabled_by_env() if cgroups is None else cgroups
        self.cgroups: AgentCgroups | None = None
        self._warden = warden
        # What next_chunks handed out: how much of the output a pump pulled.
        self.chunks_sent = 0
        self.bytes_sent = 0
        self._lineage = Lineage(TOKEN_VAR)
        self._told_warden: set[Known] = set()
        self._journal: UnitOutputForwarder | None = None
        self._journal_settings: JournalSettings | None = None
        self._journal_scope: anyio.CancelScope | None = None  # its backlog's sender

    async def __aenter__(self) -> LocalAgent:
        self.subreaper = become_subreaper()
        if self._want_cgroups:
            try:
                self.cgroups = AgentCgroups.create()
            except CgroupUnavailable as exc:
                log.info("agent.no_cgroups", reason=str(exc))
        mount_root = None
        if self.cgroups is not None:
            mount_root = self.cgroups.name
            if self._warden is not None:
                self._warden.guard_cgroup(str(self.cgroups.root))
        self._lineage = Lineage(TOKEN_VAR, cgroup_root=mount_root)
        self._pipes = PipeReader(self._read_size)
        self._leaders = LeaderWatch()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._pipes.run)
        self._tg.start_soon(self._leaders.run)
        if self.cgroups is not None:
            self._tg.start_soon(self.cgroups.run_events)
        self._tg.start_soon(self._sample)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # Nothing hosted may outlive the agent: stop whatever is still running.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for name, hosted in list(self._hosted.items()):
                    if not hosted.done.is_set():
                        tg.start_soon(self.stop, name, hosted.stop_signal, hosted.stop_timeout)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            assert self._pipes is not None and self._leaders is not None
            # Also when their tasks were cancelled before they ran.
            self._pipes.close()
            self._leaders.close()
            if self.cgroups is not None:
                self.cgroups.close()
            # After the pipes: their last unfinished lines were sent as they closed.
            self._close_journal()

    # -- the Agent contract --------------------------------------------------

    async def spawn(self, request: SpawnRequest) -> Spawned:
        name = request.name
        previous = self._hosted.get(name)
        if previous is not None and not previous.done.is_set():
            raise SpawnError(f"{name} is already running (pid {previous.group.pid})")
        for port in request.ports:
            holder = port_holder(port)
            if holder is not None:
                raise PortBusy(f"{name}: port {port} is already in use on {self.node} ({holder})")
        full_env = {**inherited_env(request.unset_env), **request.env, **self._env}
        cgroup = None
        if self.cgroups is not None:
            try:
                cgroup = self.cgroups.add(name)
            except OSError as exc:
                raise SpawnError(f"{name}: cannot create its cgroup: {exc}") from exc
        try:
            group = ProcessGroup.spawn(
                name,
                list(request.argv),
                full_env,
                request.cwd,
                cgroup=cgroup,
                scanner=self._lineage.scan,
            )
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        self._lineage.add(name, group.pid, group.token)
        hosted = _Hosted(group, request.stop_signal, request.stop_timeout, request.tag)
        self._hosted[name] = hosted
        assert self._tg is not None and self._pipes is not None, "agent used outside its context"
        for stream, fd in (("stdout", group.stdout_fd), ("stderr", group.stderr_fd)):
            self._pipes.add(
                fd,
                partial(self._deliver, name, stream, group.pid),
                partial(self._pipe_closed, hosted, stream),
            )
        self._watch(hosted)
        return self._spawned(name, hosted)

    def _spawned(self, name: str, hosted: _Hosted) -> Spawned:
        return Spawned(
            name=name,
            pid=hosted.group.pid,
            pgid=hosted.group.pgid,
            start_time=hosted.group.start_time,
            node=self.node,
            token=hosted.group.token,
            tag=hosted.tag,
        )

    async def wait_leader_exit(self, name: str) -> ExitStatus:
        hosted = self._get(name)
        await hosted.leader_gone.wait()
        assert hosted.status is not None
        return hosted.status

    async def wait_exit(self, name: str) -> ExitStatus:
        hosted = self._get(name)
        await hosted.done.wait()
        assert hosted.status is not None
        return hosted.status

    async def stop(self, name: str, stop_signal: str, timeout: float) -> ExitStatus | None:
        hosted = self._get(name)
        if not hosted.done.is_set():
            await hosted.group.terminate(parse_signal(stop_signal), timeout)
            await hosted.done.wait()
        return hosted.status

    async def send_signal(self, name: str, sig: str) -> None:
        hosted = self._get(name)
        if hosted.done.is_set():
            raise NotRunning(f"{name} is not running")
        hosted.group.send_signal(parse_signal(sig))

    async def read_log(self, name: str, stream: str, offset: int, limit: int) -> LogRead:
        start, data, end = self.logs.read(name, stream, offset, limit)
        return LogRead(start=start, data=data, end=end)

    async def tail_log(self, name: str, stream: str, lines: int) -> LogRead:
        start = self.logs.tail_offset(name, stream, lines)
        end = self.logs.end(name, stream)
        return await self.read_log(name, stream, start, end - start)

    serves_followers = True

    async def follow(
        self,
        client: socket.socket,
        request_id: int | str | None,
        name: str,
        positions: dict[str, int],
        tagged: bool,
        raw: bool = False,
    ) -> bool:
        return await follow_rings(
            self.logs, client, request_id, name, positions, tagged=tagged, raw=raw
        )

    async def next_chunks(
        self, cursor: int, timeout: float, names: Collection[str] | None = None
    ) -> ChunkBatch:
        await self.logs.wait_beyond(cursor, timeout, names)
        chunks, new_cursor, lost = self.logs.since(cursor, names=names)
        self.chunks_sent += len(chunks)
        self.bytes_sent += sum(len(chunk.data) for chunk in chunks)
        return ChunkBatch(chunks=chunks, cursor=new_cursor, lost=lost)

    async def running(self) -> list[Spawned]:
        return [self._spawned(name, h) for name, h in self._hosted.items() if not h.done.is_set()]

    # -- journald ------------------------------------------------------------

    async def use_journal(self, settings: JournalSettings | None) -> bool:
        """Send every line the units print to journald with these settings from
        now on (None: stop). Returns whether a journald listens there.

        The daemon says so each time it connects: an agent process outlives
        a daemon, and the next one may be configured otherwise.
        """
        if settings == self._journal_settings:
            return self._journal is not None
        self._close_journal()
        self._journal_settings = settings
        if settings is None:
            return False
        journal = UnitOutputForwarder.open(settings, node=self.node)
        if journal is None:
            log.warning("journal.unavailable", path=settings.path)
            return False
        assert self._tg is not None, "agent used outside its context"
        self._journal = journal
        self._journal_scope = scope = anyio.CancelScope()
        self._tg.start_soon(self._send_backlog, journal, scope)
        return True

    @staticmethod
    async def _send_backlog(journal: UnitOutputForwarder, scope: anyio.CancelScope) -> None:
        with scope:
            await journal.sender.run_backlog()

    def _close_journal(self) -> None:
        """Send what the current journal holds (unfinished lines), then close it."""
        journal, self._journal = self._journal, None
        self._journal_settings = None
        if self._journal_scope is not None:
            self._journal_scope.cancel()
            self._journal_scope = None
        if journal is not None:
            journal.flush_all()
            journal.sender.close()

    # -- internals -----------------------------------------------------------

    def _deliver(self, name: str, stream: str, pid: int, data: bytes) -> None:
        """A read from a pipe: into the rings, and to journald line by line."""
        chunk = self.logs.append(name, stream, pid, data)
        if self._journal is not None:
            self._journal.feed(chunk)

    def _get(self, name: str) -> _Hosted:
        try:
            return self._hosted[name]
        except KeyError:
            raise NotRunning(f"no process named {name!r} on {self.node}") from None

    def _watch(self, hosted: _Hosted) -> None:
        """Hear of the leader's exit: through the shared watch, else a task of its own."""
        assert self._tg is not None and self._leaders is not None
        if not self._leaders.add(hosted.group, partial(self._leader_exited, hosted)):
            self._tg.start_soon(self._watch_alone, hosted)

    async def _watch_alone(self, hosted: _Hosted) -> None:
        self._leader_exited(hosted, await hosted.group.watch_leader())

    def _leader_exited(self, hosted: _Hosted, status: ExitStatus) -> None:
        hosted.status = status
        hosted.leader_gone.set()
        assert self._tg is not None
        self._tg.start_soon(self._clean_up, hosted)

    async def _clean_up(self, hosted: _Hosted) -> None:
        """After the leader's exit: the rest of its group, its cgroup, its pipes."""
        group = hosted.group
        status = hosted.status
        assert status is not None
        try:
            # What the leader left behind (an EngineCore holding GPU memory, say)
            # must be gone before anyone hears of the exit and restarts the unit.
            with anyio.CancelScope(shield=True):
                await group.terminate(parse_signal(hosted.stop_signal), hosted.stop_timeout)
        except StopFailed as exc:
            # Processes SIGKILL cannot end: the unit must not restart next to
            # them. Keep trying, unshielded, so the agent's own exit still ends this.
            log.error("process.stop_failed", unit=group.name, pids=exc.pids, error=str(exc))
            while True:
                try:
                    await group.terminate(signal.SIGKILL, 0.0)
                    break
                except StopFailed:
                    continue
        finally:
            self._lineage.remove(group.pid, group.token)
            if group.cgroup is not None and not group.cgroup.remove():
                log.error("process.cgroup_busy", unit=group.name, cgroup=str(group.cgroup.path))
        # Whoever hears "gone" may read the unit's last lines at once: its
        # output is in the rings first (bounded: a stranger may hold a pipe open).
        with anyio.move_on_after(DRAIN_TIMEOUT):
            if hosted.open_pipes:
                hosted.drained = anyio.Event()
                await hosted.drained.wait()
        hosted.done.set()
        log.debug("process.exited", unit=group.name, pid=group.pid, status=status.describe())

    async def _sample(self) -> None:
        """Keep the lineage fresh and reap inherited orphans while anything is hosted."""
        while True:
            await anyio.sleep(SAMPLE_INTERVAL)
            if not any(not h.done.is_set() for h in self._hosted.values()):
                continue
            scan = await self._lineage.scan()
            if self._warden is not None and self.cgroups is None:
                seen = {k for members in scan.members.values() for k in members}
                fresh = seen - self._told_warden
                self._warden.guard_pids((k.pid, k.start) for k in fresh)
                self._told_warden = seen

    def _pipe_closed(self, hosted: _Hosted, stream: str) -> None:
        group = hosted.group
        if self._journal is not None:
            # Its last line, even without a newline: nothing more can come.
            self._journal.flush(group.name, stream, pid=group.pid)
        hosted.open_pipes -= 1
        if hosted.open_pipes == 0:
            if self._journal is not None:
                self._journal.flush(group.name, pid=group.pid)  # the rate window's tally
            if hosted.drained is not None:
                hosted.drained.set()
