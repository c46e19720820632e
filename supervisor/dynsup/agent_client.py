"""The daemon's side of the agent process: connect (or start it), and speak `Agent`.

`AgentClient` implements the `Agent` contract by calls over the agent's
socket (`agent_wire`): many calls share one connection, each answered by
id, so a long-poll (``next_chunks``, ``wait_leader_exit``) never holds up
a ``spawn``. A call cancelled here is cancelled there too. When the
connection breaks, every call in flight fails with `AgentProcessLost` (an
`AgentError`: the engine treats it like a lost Ray agent), and `keep_agent`
starts a new agent process; calls made meanwhile wait for it.

`open_agent_process` finds the agent a previous daemon left in the state
directory, or starts one in a session of its own, and leaves it running
when the daemon detaches (a crash does the same by itself).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import SocketStream, TaskGroup

from .agent_api import (
    AgentError,
    ChunkBatch,
    ExitStatus,
    LogRead,
    Spawned,
    SpawnError,
    SpawnRequest,
)
from .agent_wire import (
    CANCEL,
    FOLLOW,
    OLDEST_PROTOCOL,
    PROTOCOL,
    FrameError,
    FrameReader,
    send_frame,
)
from .logs.journald import JournalSettings

log = structlog.get_logger("dynsup.agent_client")

SOCKET_NAME = "agent.sock"
START_TIMEOUT = 60.0  # a loaded machine takes seconds to import Python packages
RESTART_DELAY = 0.5  # after the agent process died, then doubling up to:
MAX_RESTART_DELAY = 30.0


class AgentProcessLost(AgentError):
    """The connection to the agent process broke (it died, or was stopped)."""


@dataclass
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    ok: bool = False
    value: Any = None


class AgentClient:
    """The `Agent` contract over one connection to the agent process."""

    def __init__(self, stream: SocketStream, tg: TaskGroup) -> None:
        self._stream = stream
        self._tg = tg
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = anyio.Lock()
        self._lost: str | None = None
        self.lost = anyio.Event()  # set when the connection breaks (see `keep_agent`)
        self._replaced = anyio.Event()  # set when `reconnect` has a new connection
        self.keep = False  # whether a broken connection waits for `keep_agent`'s new one
        self.journal: JournalSettings | None = None  # as told with use_journal
        self.info: dict[str, Any] = {}
        self.path: Path | None = None  # the agent's socket, for connections of their own
        tg.start_soon(self._read)

    async def reconnect(self, stream: SocketStream) -> None:
        """Speak over a new connection (to a new agent process) from now on."""
        self._stream = stream
        self._lost = None
        self.lost = anyio.Event()
        self._tg.start_soon(self._read)
        self.info = await self.call("hello")
        await self.call("use_journal", self.journal)
        replaced, self._replaced = self._replaced, anyio.Event()
        replaced.set()

    async def _read(self) -> None:
        frames = FrameReader(self._stream)
        try:
            while True:
                call_id, ok, value = await frames.receive()
                pending = self._pending.pop(call_id, None)
                if pending is not None:
                    pending.ok, pending.value = ok, value
                    pending.done.set()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._fail_all("the agent process closed its connection")
        except FrameError as exc:
            self._fail_all(f"the agent process sent garbage: {exc}")

    def _fail_all(self, why: str) -> None:
        self._lost = why
        self.lost.set()
        for pending in self._pending.values():
            pending.value = AgentProcessLost(why)
            pending.done.set()
        self._pending.clear()

    async def call(self, method: str, *args: Any) -> Any:
        if self._lost is not None and self.keep and method != "hello":
            # The agent process died: a new one is on its way (keep_agent).
            with anyio.move_on_after(START_TIMEOUT):
                await self._replaced.wait()
        if self._lost is not None:
            raise AgentProcessLost(self._lost)
        call_id = next(self._ids)
        pending = self._pending[call_id] = _Pending()
        try:
            try:
                async with self._send_lock:
                    await send_frame(self._stream, (call_id, method, args))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise AgentProcessLost(f"cannot reach the agent process: {exc}") from exc
            await pending.done.wait()
        except BaseException:
            if self._pending.pop(call_id, None) is not None and self._lost is None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    async with self._send_lock:
                        await send_frame(self._stream, (call_id, CANCEL, ()))
            raise
        if not pending.ok:
            raise pending.value
        return pending.value

    @property
    def protocol(self) -> int:
        """The wire protocol of the agent process connected now."""
        return int(self.info.get("protocol", PROTOCOL))

    @property
    def output_in_agent(self) -> bool:
        """Whether the agent connected now forwards to journald, pulls by names and
        writes follows (protocol 2 on; an older one sends the daemon everything)."""
        return self.protocol >= 2

    @property
    def serves_followers(self) -> bool:
        return self.output_in_agent

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def follow(
        self,
        client: socket.socket,
        request_id: int | str | None,
        name: str,
        positions: dict[str, int],
        tagged: bool,
        raw: bool = False,
    ) -> bool:
        """Hand the client's socket to the agent process, which writes the follow from
        its rings; until it ends (cancel this to end it)."""
        if self.path is None:
            return False
        try:
            side = await anyio.connect_unix(self.path)
        except OSError as exc:
            log.warning("agent.follow_failed", error=str(exc))
            return False
        async with side:
            try:
                await side.send_fds(FOLLOW, [client.fileno()])
                await send_frame(side, (request_id, name, positions, tagged, raw))
                return bool(await FrameReader(side).receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError, FrameError, OSError):
                # The agent went away mid-follow: a partial event may be out, so the
                # client's connection cannot carry on.
                return False

    # -- the Agent contract ------------------------------------------------------

    async def spawn(self, request: SpawnRequest) -> Spawned:
        try:
            return await self.call("spawn", request)  # type: ignore[no-any-return]
        except AgentProcessLost as exc:
            # Not started (or killed with the agent by its warden): a failed
            # start, retried by the unit's policy once an agent is back.
            raise SpawnError(f"the agent process is down: {exc}") from None

    async def wait_leader_exit(self, name: str) -> ExitStatus:
        return await self.call("wait_leader_exit", name)  # type: ignore[no-any-return]

    async def wait_exit(self, name: str) -> ExitStatus:
        return await self.call("wait_exit", name)  # type: ignore[no-any-return]

    async def stop(self, name: str, stop_signal: str, timeout: float) -> ExitStatus | None:
        return await self.call("stop", name, stop_signal, timeout)  # type: ignore[no-any-return]

    async def send_signal(self, name: str, sig: str) -> None:
        await self.call("send_signal", name, sig)

    async def read_log(self, name: str, stream: str, offset: int, limit: int) -> LogRead:
        return await self.call("read_log", name, stream, offset, limit)  # type: ignore[no-any-return]

    async def tail_log(self, name: str, stream: str, lines: int) -> LogRead:
        return await self.call("tail_log", name, stream, lines)  # type: ignore[no-any-return]

    async def next_chunks(
        self, cursor: int, timeout: float, names: Collection[str] | None = None
    ) -> ChunkBatch:
        if not self.output_in_agent:  # it sends everything; the hub drops what nobody wants
            return await self.call("next_chunks", cursor, timeout)  # type: ignore[no-any-return]
        names = None if names is None else frozenset(names)
        return await self.call("next_chunks", cursor, timeout, names)  # type: ignore[no-any-return]

    async def running(self) -> list[Spawned]:
        return await self.call("running")  # type: ignore[no-any-return]

    # -- beyond the Agent contract -------------------------------------------------

    async def use_journal(self, settings: JournalSettings | None) -> bool:
        """The agent forwards its units' output to journald with these settings
        (and the agent started after this one dies, too). False from an agent
        that cannot: the daemon forwards that agent's output itself."""
        if not self.output_in_agent:
            return False
        self.journal = settings
        return await self.call("use_journal", settings)  # type: ignore[no-any-return]

    async def statistics(self) -> dict[str, Any]:
        """The agent's counters: ``chunks_sent``/``bytes_sent`` on next_chunks."""
        return await self.call("statistics")  # type: ignore[no-any-return]


def agent_argv(path: Path, orphan_timeout: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dynsup.agent_host",
        "--socket",
        str(path),
        "--orphan-timeout",
        str(orphan_timeout),
    ]


async def _start_agent(path: Path, orphan_timeout: float) -> None:
    """Start the agent process and return once it listens (it says "ready" on stdout)."""
    with open(path.parent / "agent.log", "ab") as err:
        process = subprocess.Popen(
            agent_argv(path, orphan_timeout),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            # Its own session: a Ctrl-C or a group kill aimed at the daemon
            # leaves it (and the units) alone.
            start_new_session=True,
            close_fds=True,
        )
    assert process.stdout is not None
    try:
        with anyio.fail_after(START_TIMEOUT):
            line = await anyio.to_thread.run_sync(process.stdout.readline, abandon_on_cancel=True)
    except TimeoutError:
        process.kill()
        raise AgentError(f"the agent process did not start within {START_TIMEOUT:.0f}s") from None
    finally:
        process.stdout.close()
    if line.strip() != b"ready":
        process.wait()
        raise AgentError(
            f"the agent process exited ({process.returncode}); see {path.parent / 'agent.log'}"
        )
    # Reaped in a thread when it ends, so that a long-lived daemon keeps no zombie.
    _reap_later(process)
    log.info("agent.started", pid=process.pid, socket=str(path))


def _reap_later(process: subprocess.Popen[bytes]) -> None:
    import threading

    threading.Thread(target=process.wait, name="agent-reaper", daemon=True).start()


async def _connect(path: Path, tg: TaskGroup) -> AgentClient | None:
    try:
        stream = await anyio.connect_unix(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    client = AgentClient(stream, tg)
    client.path = path
    try:
        client.info = await client.call("hello")
    except AgentError:
        await client.aclose()
        return None
    return client


@asynccontextmanager
async def open_agent_process(
    state_dir: Path, orphan_timeout: float = 0.0, journal: JournalSettings | None = None
) -> AsyncIterator[tuple[AgentClient, bool]]:
    """The agent process of this state directory: (client, found) — found when it was
    already running (a previous daemon's, to adopt from).

    ``journal``: where the agent sends its units' output from now on (None:
    nowhere); told to a found agent too, whose last daemon may have said otherwise.

    On exit, the connection closes and the agent waits for the next daemon;
    call `shutdown_agent` first to stop it.
    """
    path = state_dir / SOCKET_NAME
    async with anyio.create_task_group() as tg:
        client = await _connect(path, tg)
        found = client is not None
        if client is not None and not OLDEST_PROTOCOL <= client.protocol <= PROTOCOL:
            # Another dynsup's agent that speaks another wire: it cannot be
            # adopted from, so it stops its units like an orderly stop would.
            log.warning("agent.replaced", found=client.info, protocol=PROTOCOL)
            await shutdown_agent(client)
            client, found = None, False
        if client is None:
            await _start_agent(path, orphan_timeout)
            client = await _connect(path, tg)
            if client is None:
                raise AgentError(f"the agent process started but {path} does not answer")
        else:
            log.info("agent.found", pid=client.info.get("pid"), version=client.info.get("version"))
            if client.protocol < PROTOCOL:
                log.warning(
                    "agent.older",
                    protocol=client.protocol,
                    note="adopted as it is; replaced at the next orderly stop",
                )
        await client.use_journal(journal)
        client.keep = True
        tg.start_soon(keep_agent, client, path, orphan_timeout)
        try:
            yield client, found
        finally:
            client.keep = False  # closing this connection is not the agent's death
            with anyio.CancelScope(shield=True):
                await client.aclose()
            tg.cancel_scope.cancel()


async def keep_agent(client: AgentClient, path: Path, orphan_timeout: float) -> None:
    """Start the agent process again whenever it dies, and reconnect ``client`` to it.

    The dead agent's warden has killed its units: each one's run ends with
    "agent lost", and its policy starts it again on the new agent. Without
    this, one crash of the agent process (a bug, the OOM killer) left every
    unit FATAL until the daemon itself was restarted.
    """
    while True:
        await client.lost.wait()
        if not client.keep:
            return  # an orderly shutdown: the agent was asked to go
        log.error("agent.lost", reason=client._lost)
        delay = RESTART_DELAY
        while client.keep:
            try:
                await _start_agent(path, orphan_timeout)
                await client.reconnect(await anyio.connect_unix(path))
            except Exception as exc:  # whatever it is, the daemon carries on and tries again
                log.error("agent.restart_failed", error=str(exc), retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, MAX_RESTART_DELAY)
                continue
            log.info("agent.restarted", pid=client.info.get("pid"))
            break


async def shutdown_agent(client: AgentClient) -> None:
    """Stop every unit the agent still hosts, then wait until the agent process is gone."""
    client.keep = False  # its end is not a crash: start no other
    pid = client.info.get("pid")
    pidfd = None
    if isinstance(pid, int):
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)  # before it can exit: never another process's pid
    try:
        with contextlib.suppress(AgentProcessLost):
            await client.call("shutdown")
        if pidfd is not None:
            await anyio.wait_readable(pidfd)  # readable once the process has exited
    finally:
        if pidfd is not None:
            os.close(pidfd)
