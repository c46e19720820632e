"""The control socket server: JSON lines over a Unix socket, one task per connection.

Wiring::

    server = ControlServer(handlers, path=path, read_only_verbs=READ_ONLY,
                           access=AccessPolicy.from_groups(group, readonly_group))
    await tg.start(server.serve)      # returns once the socket is bound and chmod'ed

A handler is ``async def handler(args: dict) -> Any``. It returns the result
(any JSON value), or a `Stream` for a verb that sends events first; it raises
`CommandError` for an expected failure. Any other exception is a bug: the
client gets INTERNAL, the daemon logs it, the server carries on.

Robustness, per connection: a request line over `MAX_LINE` gets TOO_LARGE and
the connection is closed (the framing is lost); a malformed line gets
BAD_REQUEST and the connection carries on; a client that stops reading is
dropped after `send_timeout`; requests on one connection are served one after
another; plain requests run to completion even when the client goes away
(a half-finished `stop` helps no one), while a `Stream` ends as soon as the
client closes its side.
"""

from __future__ import annotations

import errno
import fcntl
import inspect
import os
import socket
import stat
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup, TaskStatus

from .paths import prepare_socket_dir
from .peercred import Access, AccessPolicy, peer_credentials
from .protocol import (
    INTERNAL,
    MAX_LINE,
    PERMISSION_DENIED,
    SHUTTING_DOWN,
    TOO_LARGE,
    UNKNOWN_COMMAND,
    CommandError,
    Request,
    RequestId,
    RequestRejected,
    encode,
    encode_event,
    error_reply,
    parse_request,
    result_reply,
)

__all__ = ["AccessPolicy", "AlreadyRunning", "ControlServer", "Handler", "Handoff", "Stream"]

log = structlog.get_logger("dynsup.control")

SEND_TIMEOUT = 10.0  # a client that reads nothing for this long is dropped
CLOSE_TIMEOUT = 5.0  # for a stream's own cleanup when its client is gone
BACKLOG = 1024
# While a stream runs we read ahead only to notice the client leaving;
# pipelined requests beyond this much are left in the kernel's buffer.
READ_AHEAD = 2 * MAX_LINE
# accept() errors that mean "out of resources for now", not "listener broken"
# (trio's serve_listeners makes the same choice).
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass
class Stream:
    """A streaming reply: each item of ``events`` goes out as an event, then the result.

    ``final`` (sync or async, no arguments) makes the result once the events
    are exhausted; without it the result is null. The events iterator is
    closed (``aclose``) whether it ran out, failed or lost its client, so an
    async generator's ``finally`` always runs. It runs in a cancelled scope
    when the client left: shield any ``await`` there. Do the verb's action
    before returning the Stream (it then happens even if nobody listens);
    the events should only watch.
    """

    events: AsyncIterable[Any]
    final: Callable[[], Any] | None = None


@dataclass
class Handoff:
    """A streaming reply whose events, after ``first``, someone else writes.

    The server sends ``first`` as an event, then awaits ``serve(sock,
    request_id)``, which writes further events straight to the client's
    socket (`tail -f` served by the agent that holds the rings) and returns
    True if the client is still there: the server then sends the result
    (null) and reads the next request. The server neither reads nor writes
    the socket meanwhile; ``serve`` must not leave a partial line behind.
    """

    first: Any
    serve: Callable[[socket.socket, RequestId], Awaitable[bool]]


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class AlreadyRunning(RuntimeError):
    """Another daemon serves (or is starting on) this socket path."""


class _ClientGone(Exception):
    """The client disconnected or stopped reading; drop the connection."""


class _LineTooLong(Exception):
    pass


class ControlServer:
    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        path: str,
        read_only_verbs: frozenset[str] = frozenset(),
        access: AccessPolicy | None = None,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.handlers = handlers
        self.path = path
        self.read_only_verbs = read_only_verbs
        self.access = access or AccessPolicy()
        self.send_timeout = send_timeout
        self._shutting_down = False
        self._bound: tuple[int, socket.socket, int] | None = None  # lock fd, listener, inode

    def begin_shutdown(self) -> None:
        """From now on only read-only verbs are served; others get SHUTTING_DOWN."""
        self._shutting_down = True

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def bind(self) -> None:
        """Take the socket path now (optional; serve() does it otherwise).

        For callers that want `AlreadyRunning` as a plain exception: raised
        inside a task group it arrives wrapped in an ExceptionGroup. After
        bind(), run serve() or call close().
        """
        if self._bound is None:
            # Synchronous on purpose: a few local syscalls, and a worker thread
            # cancelled midway would leak the lock and the socket it made.
            self._bound = self._bind()
        await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        """Give up a bound socket that serve() will not run on (serve() cleans up itself)."""
        if self._bound is not None:
            lock_fd, sock, inode = self._bound
            self._bound = None
            # Unlink before closing: late clients see "no daemon", not a hang.
            try:
                if os.stat(self.path).st_ino == inode:
                    os.unlink(self.path)
            except OSError:
                pass
            sock.close()
            os.close(lock_fd)  # last: releases the lock for the next daemon

    async def serve(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless bind() did), report started with the path, serve until cancelled,
        then remove the socket."""
        try:
            await self.bind()
            assert self._bound is not None
            log.info("control.listening", path=self.path, mode=f"{self.access.socket_mode:o}")
            async with anyio.create_task_group() as tg:
                task_status.started(self.path)
                await self._accept_loop(self._bound[1], tg)
        finally:
            self.close()

    # -- binding -------------------------------------------------------------

    def _bind(self) -> tuple[int, socket.socket, int]:
        prepare_socket_dir(self.path, shared=self.access.socket_mode != 0o600)
        # The lock decides between two daemons starting at once; the probe
        # below cannot (both would see a stale socket and both would bind).
        # Lock files are never unlinked: that would let two holders exist.
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(f"another dynsupd holds {self.path}.lock") from None
            self._remove_stale_socket()
            sock = self._listen()
            try:
                return lock_fd, sock, os.stat(self.path).st_ino
            except BaseException:
                sock.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise

    def _remove_stale_socket(self) -> None:
        try:
            if not os.path.exists(self.path) and not os.path.islink(self.path):
                return
        except OSError:
            return
        if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("control.stale_socket_removed", path=self.path)
            os.unlink(self.path)
            return
        except BlockingIOError:
            pass  # backlog full: very much alive
        finally:
            probe.close()
        raise AlreadyRunning(f"a daemon is already answering on {self.path}")

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # Nobody can connect before listen(), so the window between bind
            # (umask mode) and chmod is harmless.
            if self.access.group is not None:
                os.chown(self.path, -1, self.access.group)
            os.chmod(self.path, self.access.socket_mode)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _accept_loop(self, sock: socket.socket, tg: TaskGroup) -> None:
        while True:
            await anyio.wait_readable(sock)
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY:
                    raise
                log.warning("control.accept_failed", error=str(exc))
                await anyio.sleep(0.1)  # wait for a connection to free its fd
                continue
            conn.setblocking(False)
            tg.start_soon(self._connection, conn)

    # -- one connection ------------------------------------------------------

    async def _connection(self, conn: socket.socket) -> None:
        try:
            cred = peer_credentials(conn)
            with structlog.contextvars.bound_contextvars(peer_pid=cred.pid, peer_uid=cred.uid):
                if self.access.trusted_without_lookup(cred):
                    access = self.access.decide(cred)
                else:  # the user database may be LDAP: keep it off the event loop
                    access = await anyio.to_thread.run_sync(self.access.decide, cred)
                connection = _Connection(self, _SocketIO(conn), access)
                if access is Access.DENIED:
                    log.warning("control.peer_denied", peer_gid=cred.gid)
                    denied = CommandError(PERMISSION_DENIED, "not allowed to use this socket")
                    await connection.send(error_reply(None, denied))
                    return
                await connection.run()
        except _ClientGone:
            pass
        except Exception:  # a bug here must cost one connection, not the server
            log.exception("control.connection_failed")
        finally:
            conn.close()


class _SocketIO:
    """Non-blocking I/O on a connected socket, through anyio.wait_readable/wait_writable.

    Not anyio's UNIXSocketStream: on asyncio (anyio 4.16) a receive() that is
    cancelled just as data arrives makes the loop report InvalidStateError
    (its reader callback resolves the already-cancelled future); the same
    holds for UNIXSocketListener.accept(). wait_readable tolerates that race.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def receive(self) -> bytes:
        """Some bytes; b"" at EOF or when the peer reset the connection."""
        await anyio.lowlevel.checkpoint()  # a client that floods us must not starve the loop
        while True:
            try:
                return self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_readable(self.sock)
            except OSError:
                return b""

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(self.sock)
            except OSError:  # EPIPE, ECONNRESET: the client is gone
                raise _ClientGone from None


class _LineReader:
    def __init__(self, io: _SocketIO) -> None:
        self._io = io
        self._buf = bytearray()
        self._scanned = 0  # no newline in _buf[:_scanned]
        self.eof = False

    async def readline(self) -> bytes | None:
        """The next line without its newline; None at EOF (a partial line is dropped)."""
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end > MAX_LINE or (end < 0 and len(self._buf) > MAX_LINE):
                raise _LineTooLong
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if self.eof:
                return None
            await self._fill()

    async def wait_eof(self) -> None:
        """Read ahead, keeping the bytes, until the client closes its side."""
        while not self.eof and len(self._buf) <= READ_AHEAD:
            await self._fill()
        if not self.eof:
            await anyio.sleep_forever()  # pipelined too much; a send timeout will catch it

    async def _fill(self) -> None:
        chunk = await self._io.receive()
        if chunk:
            self._buf += chunk
        else:
            self.eof = True


class _Connection:
    def __init__(self, server: ControlServer, io: _SocketIO, access: Access) -> None:
        self.server = server
        self.io = io
        self.access = access
        self.reader = _LineReader(io)

    async def run(self) -> None:
        while True:
            try:
                line = await self.reader.readline()
            except _LineTooLong:
                log.warning("control.line_too_long", limit=MAX_LINE)
                too_large = CommandError(TOO_LARGE, f"request line longer than {MAX_LINE} bytes")
                await self.send(error_reply(None, too_large))
                return
            if line is None:
                return
            try:
                request = parse_request(line)
            except RequestRejected as exc:
                await self.send(error_reply(exc.request_id, exc))
                continue
            await self.serve(request)

    async def serve(self, request: Request) -> None:
        try:
            handler = self._handler_for(request)
            with structlog.contextvars.bound_contextvars(cmd=request.cmd):
                if request.cmd in self.server.read_only_verbs:
                    log.debug("control.request", args=request.args)
                else:  # who changed what, for the journal
                    log.info("control.request", args=request.args)
                outcome = await handler(request.args)
        except CommandError as exc:
            await self.send(error_reply(request.id, exc))
            return
        except Exception as exc:
            await self.send(error_reply(request.id, _as_command_error(exc, request)))
            return
        if isinstance(outcome, Stream):
            await self.stream_events(request.id, outcome)
        elif isinstance(outcome, Handoff):
            await self.hand_off(request.id, outcome)
        else:
            await self.send(result_reply(request.id, outcome))

    def _handler_for(self, request: Request) -> Handler:
        server = self.server
        handler = server.handlers.get(request.cmd)
        if handler is None:
            known = ", ".join(sorted(server.handlers))
            raise CommandError(UNKNOWN_COMMAND, f"unknown command {request.cmd!r} (known: {known})")
        read_only = request.cmd in server.read_only_verbs
        if self.access is Access.READ_ONLY and not read_only:
            raise CommandError(PERMISSION_DENIED, f"{request.cmd!r} needs write access")
        if server.shutting_down and not read_only:
            raise CommandError(SHUTTING_DOWN, "the daemon is shutting down")
        return handler

    async def stream_events(self, request_id: RequestId, stream: Stream) -> None:
        gone = False
        async with anyio.create_task_group() as tg:

            async def cancel_on_eof() -> None:
                await self.reader.wait_eof()
                log.info("control.stream_abandoned")
                tg.cancel_scope.cancel()

            tg.start_soon(cancel_on_eof)
            try:
                await self._pump(request_id, stream)
            except _ClientGone:
                gone = True  # raised below: a task group would wrap it in a group
            finally:
                tg.cancel_scope.cancel()
        if gone:
            raise _ClientGone

    async def hand_off(self, request_id: RequestId, handoff: Handoff) -> None:
        await self.send_bytes(encode_event(request_id, handoff.first))
        if not await handoff.serve(self.io.sock, request_id):
            raise _ClientGone
        await self.send(result_reply(request_id, None))

    async def _pump(self, request_id: RequestId, stream: Stream) -> None:
        events = aiter(stream.events)
        try:
            try:
                async for event in events:
                    # Encoded here: an event that is not JSON ends the stream with INTERNAL.
                    await self.send_bytes(encode_event(request_id, event))
                result = stream.final() if stream.final is not None else None
                if inspect.isawaitable(result):
                    result = await result
            except CommandError as exc:
                await self.send(error_reply(request_id, exc))
                return
            except _ClientGone:
                raise
            except Exception as exc:
                await self.send(error_reply(request_id, _as_command_error(exc, None)))
                return
            await self.send(result_reply(request_id, result))
        finally:
            await _close_quietly(events)

    async def send(self, message: dict[str, Any]) -> None:
        """Send one final reply; a result that is not JSON becomes INTERNAL (a handler bug)."""
        try:
            data = encode(message)
        except (TypeError, ValueError) as exc:
            log.error("control.result_not_json", error=str(exc))
            bug = CommandError(INTERNAL, f"result is not JSON: {exc}")
            data = encode(error_reply(message.get("id"), bug))
        await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        try:
            with anyio.fail_after(self.server.send_timeout):
                await self.io.send(data)
        except TimeoutError:
            log.warning("control.send_timeout", timeout=self.server.send_timeout)
            raise _ClientGone from None


async def _close_quietly(events: AsyncIterator[Any]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is None:
        return
    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
        try:
            await aclose()
        except Exception:
            log.exception("control.stream_close_failed")


def _as_command_error(exc: Exception, request: Request | None) -> CommandError:
    """A handler's CommandError, possibly inside an exception group; else INTERNAL (logged)."""
    found = _find_command_error(exc)
    if found is not None:
        return found
    log.error("control.handler_failed", exc_info=exc, cmd=request.cmd if request else None)
    return CommandError(INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _find_command_error(exc: BaseException) -> CommandError | None:
    if isinstance(exc, CommandError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find_command_error(inner)
        if found is not None:
            return found
    return None
