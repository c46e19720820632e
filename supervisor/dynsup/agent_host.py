"""The agent process: hosts the units' process groups so that they outlive a daemon.

    python -m dynsup.agent_host --socket STATE_DIR/agent.sock [--orphan-timeout S]

Without Ray, the daemon starts this small process in a session of its own
(``agent = "process"``, the default) instead of hosting `LocalAgent`
inside itself. It owns the process groups, their output pipes and their
ring buffers, and serves the `Agent` contract on a Unix socket (mode 0600,
peers of its own uid only; the wire is `agent_wire`). A daemon that dies,
even by SIGKILL, leaves it and its units running: the next daemon connects,
adopts what matches its specs and stops the rest, as it does with Ray's
detached agents, and the output continues from where the last daemon read
it (the agent keeps the pump's cursor, see ``hello``).

It stops its units only when asked: ``shutdown`` (an orderly daemon stop),
SIGTERM/SIGINT, or after ``--orphan-timeout`` seconds with no daemon
connected (0, the default: wait for the next daemon forever). If the agent
process itself dies, its warden kills every unit, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import SocketStream, TaskStatus

from . import __version__
from .agent import LocalAgent
from .agent_api import ChunkBatch, ExitStatus
from .agent_wire import (
    CANCEL,
    FOLLOW,
    PROTOCOL,
    FrameError,
    FrameReader,
    picklable_error,
    send_frame,
)
from .broadcast import Pulse
from .control.peercred import peer_credentials
from .logs import configure_logging
from .logs.pump import BIG_READ_SIZE
from .malloc import fix_mmap_threshold
from .warden import MARK_VAR, Warden

log = structlog.get_logger("dynsup.agent_host")

# The Agent contract, served as it is.
AGENT_METHODS = frozenset(
    {
        "spawn",
        "wait_leader_exit",
        "wait_exit",
        "stop",
        "send_signal",
        "read_log",
        "tail_log",
        "next_chunks",
        "running",
        "use_journal",
    }
)
# How long an exit waits for the daemon's pump to take the output before it.
PUMP_WAIT = 1.0
# Finished even when the daemon that asked disconnects meanwhile: a half-done
# spawn or stop would leave a group nobody knows the state of.
_SHIELDED = frozenset({"spawn", "stop", "shutdown"})


class AgentHost:
    """Serves one `LocalAgent` to the daemons that connect, one after another."""

    def __init__(self, agent: LocalAgent, orphan_timeout: float = 0.0) -> None:
        self.agent = agent
        self.orphan_timeout = orphan_timeout
        self.quit = anyio.Event()
        self._clients = 0
        self._clients_changed = Pulse()
        # Where the last daemon's output pump had read up to, and the units it
        # asked for (None: all). The next daemon resumes there.
        self._cursor = 0
        self._cursor_moved = Pulse()
        self._pumped_names: frozenset[str] | None = None

    # -- calls beyond the Agent contract ------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "version": __version__,
            "pid": os.getpid(),
            "cursor": self._cursor,
            "node": self.agent.node,
        }

    async def next_chunks(
        self, cursor: int, timeout: float, names: frozenset[str] | None = None
    ) -> ChunkBatch:
        # Asking from cursor means everything up to it has been received and
        # handed on (the daemon's pump asks again only after that).
        self._pumped_names = names
        if cursor > self._cursor:
            self._cursor = cursor
            self._cursor_moved.fire()
        return await self.agent.next_chunks(cursor, timeout, names)

    async def statistics(self) -> dict[str, int]:
        """What next_chunks handed out: chunks and bytes (tests, benches)."""
        return {"chunks_sent": self.agent.chunks_sent, "bytes_sent": self.agent.bytes_sent}

    async def wait_leader_exit(self, name: str) -> ExitStatus:
        status = await self.agent.wait_leader_exit(name)
        await self._pumped(name)
        return status

    async def wait_exit(self, name: str) -> ExitStatus:
        status = await self.agent.wait_exit(name)
        await self._pumped(name)
        return status

    async def _pumped(self, name: str) -> None:
        """Until the daemon has name's output printed before now, when it pulls
        name's output at all (bounded: it may have no pump).

        In-process, a unit's last lines are in the rings before anyone hears
        of its exit; across the socket the exit must not overtake them either,
        or a log probe or a follower in the daemon would miss the last lines.
        (journald gets them from this process, as they are read.)
        """
        if self._pumped_names is not None and name not in self._pumped_names:
            return
        last = self.agent.logs.last_seq_of(name)
        with anyio.move_on_after(PUMP_WAIT):
            while self._cursor < last:
                await self._cursor_moved.wait()

    async def shutdown(self) -> None:
        """Exit: the agent stops every group it still hosts first (each with its own
        stop signal and timeout); the caller waits for the process to end."""
        log.info("agent.shutdown")
        self.quit.set()

    def method(self, name: str) -> Callable[..., Awaitable[Any]] | None:
        if name in (
            "hello",
            "next_chunks",
            "statistics",
            "wait_leader_exit",
            "wait_exit",
            "shutdown",
        ):
            return getattr(self, name)  # type: ignore[no-any-return]
        if name in AGENT_METHODS:
            return getattr(self.agent, name)  # type: ignore[no-any-return]
        return None

    # -- connections -----------------------------------------------------------------

    async def serve_connection(self, stream: SocketStream) -> None:
        """One connection: a daemon's calls, or a follow it hands over.

        A bug in serving one connection costs that connection, never the
        agent: the listener's task group is the agent's, and its end would
        be every unit's (the warden's kill).
        """
        try:
            await self._serve_connection(stream)
        except Exception:
            log.exception("agent.connection_failed")
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _serve_connection(self, stream: SocketStream) -> None:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        if peer_credentials(sock).uid != os.getuid():
            await stream.aclose()
            return
        try:
            first, fds = await stream.receive_fds(1, 1)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, RuntimeError):
            await stream.aclose()
            return
        if first == FOLLOW and len(fds) == 1:
            await self.serve_follow(stream, socket.socket(fileno=fds[0]))
            return
        for fd in fds:  # a descriptor nobody asked for
            os.close(fd)
        self._set_clients(+1)
        log.info("agent.daemon_connected", daemons=self._clients)
        calls: dict[int, anyio.CancelScope] = {}
        send_lock = anyio.Lock()
        frames = FrameReader(stream, first)
        try:
            async with stream, anyio.create_task_group() as tg:
                try:
                    while True:
                        call_id, name, args = await frames.receive()
                        if name == CANCEL:
                            scope = calls.pop(call_id, None)
                            if scope is not None:
                                scope.cancel()
                            continue
                        scope = anyio.CancelScope(shield=name in _SHIELDED)
                        calls[call_id] = scope
                        tg.start_soon(
                            self._answer, stream, send_lock, calls, scope, call_id, name, args
                        )
                except (
                    anyio.EndOfStream,
                    anyio.BrokenResourceError,
                    FrameError,
                    OSError,
                    ValueError,
                ):
                    pass  # the daemon went away (or spoke nonsense): its calls end
                tg.cancel_scope.cancel()
        finally:
            self._set_clients(-1)
            log.info("agent.daemon_disconnected", daemons=self._clients)

    async def serve_follow(self, stream: SocketStream, client: socket.socket) -> None:
        """A `tail -f` handed over by the daemon: write it until the client leaves
        or the daemon closes this connection (it ended the follow, or died)."""
        alive = True
        try:
            async with stream, anyio.create_task_group() as tg:
                frames = FrameReader(stream)
                try:
                    request_id, name, positions, tagged, raw = await frames.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, FrameError, ValueError):
                    return

                async def until_daemon_leaves() -> None:
                    with contextlib.suppress(Exception):
                        await frames.receive()
                    tg.cancel_scope.cancel()

                tg.start_soon(until_daemon_leaves)
                alive = await self.agent.follow(client, request_id, name, positions, tagged, raw)
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await send_frame(stream, alive)
                tg.cancel_scope.cancel()
        finally:
            client.close()

    async def _answer(
        self,
        stream: SocketStream,
        send_lock: anyio.Lock,
        calls: dict[int, anyio.CancelScope],
        scope: anyio.CancelScope,
        call_id: int,
        name: str,
        args: tuple[Any, ...],
    ) -> None:
        with scope:
            method = self.method(name)
            try:
                if method is None:
                    raise AttributeError(f"the agent has no call {name!r}")
                reply = (call_id, True, await method(*args))
            except Exception as exc:
                reply = (call_id, False, picklable_error(exc))
            calls.pop(call_id, None)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                async with send_lock:
                    await send_frame(stream, reply)

    def _set_clients(self, delta: int) -> None:
        self._clients += delta
        self._clients_changed.fire()

    async def watch_orphaned(self) -> None:
        """With an orphan timeout: no daemon for that long, stop everything and exit."""
        if self.orphan_timeout <= 0:
            return
        while True:
            while self._clients:
                await self._clients_changed.wait()
            with anyio.move_on_after(self.orphan_timeout) as waited:
                while not self._clients:
                    await self._clients_changed.wait()
            if waited.cancelled_caught:
                log.warning("agent.orphaned", seconds=self.orphan_timeout)
                await self.shutdown()
                return


def take_lock(path: Path) -> int:
    """One agent per state directory: a second one (two daemons racing) exits at once."""
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise SystemExit(f"dynsup agent: another agent holds {path}.lock") from None
    return lock_fd


async def serve(path: Path, orphan_timeout: float) -> None:
    lock_fd = take_lock(path)
    warden = Warden(f"agent/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}")
    try:
        async with LocalAgent(
            env={MARK_VAR: warden.mark}, warden=warden, read_size=BIG_READ_SIZE
        ) as agent:
            host = AgentHost(agent, orphan_timeout)
            # Mode 0600 is set before listen(): nobody else can ever connect.
            listener = await anyio.create_unix_listener(path, mode=0o600)
            async with listener, anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, host.serve_connection, tg)
                tg.start_soon(host.watch_orphaned)
                await tg.start(_watch_signals, host)
                _report_ready()
                log.info("agent.listening", path=str(path), pid=os.getpid())
                await host.quit.wait()
                tg.cancel_scope.cancel()
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(warden.release)
        os.close(lock_fd)
        log.info("agent.stopped")


async def _watch_signals(
    host: AgentHost, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """SIGTERM/SIGINT: stop every unit and exit. SIGHUP and the rest: ignored."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            log.info("agent.stopping", signal=signal.Signals(signum).name)
            await host.shutdown()


def _report_ready() -> None:
    """One line on stdout (a pipe to the daemon that started us), then /dev/null there."""
    with contextlib.suppress(OSError):
        os.write(1, b"ready\n")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynsup-agent")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--orphan-timeout", type=float, default=0.0)
    parser.add_argument("--log-format", default="json")
    args = parser.parse_args(argv)
    configure_logging(args.log_format)
    # Each read from the heap, and reused (malloc.py).
    fix_mmap_threshold(2 * BIG_READ_SIZE, trim=8 * BIG_READ_SIZE)
    anyio.run(serve, args.socket, args.orphan_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
