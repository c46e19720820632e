"""A synchronous client of the control socket. Stdlib only: `dynsupctl` must start fast.

    with Client(path) as client:
        units = client.call("status", {"names": []})["units"]

        replies = client.stream("tail", {"name": "etcd", "follow": True})
        for event in replies:          # events as they come
            print(event["data"], end="")
        result = replies.result        # the final result, once the events ran out

Errors: `DaemonUnreachable` (cannot connect), `ConnectionLost` (closed before
the final reply), `ProtocolError` (a reply that is not protocol), all under
`ClientError`; and `CommandError` (protocol.py) for the daemon's own answer.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from .protocol import CommandError, encode_request

CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 30.0
MAX_REPLY = 256 << 20  # a reply line this long is a runaway, not a status
IDLE = None  # what `ReplyStream` yields when `idle` seconds pass without a message


class ClientError(Exception):
    """The conversation with the daemon failed (not: the daemon said no)."""


class DaemonUnreachable(ClientError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot reach dynsupd at {path}: {reason}")
        self.path = path
        self.reason = reason


class ConnectionLost(ClientError):
    """The daemon closed the connection before the final reply."""


class ProtocolError(ClientError):
    """The daemon sent something that is not a reply."""


_UNSET: Any = object()


class Client:
    def __init__(self, path: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout  # per message: how long a silent daemon is waited for
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 1
        self._pending: ReplyStream | None = None  # a request whose final reply is unread

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    def call(self, cmd: str, args: dict[str, Any] | None = None, *, timeout: Any = _UNSET) -> Any:
        """Send one request and return its result (events, if any, are skipped)."""
        replies = self.stream(cmd, args, timeout=timeout)
        for _ in replies:
            pass
        return replies.result

    def stream(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: Any = _UNSET,
        idle: float | None = None,
    ) -> ReplyStream:
        """Send one request; iterate the result for its events, then read ``.result``.

        ``timeout`` (None: wait forever) bounds the wait for each message;
        with ``idle``, the iterator yields `IDLE` every ``idle`` seconds of
        silence (for progress displays).
        """
        if self._pending is not None and not self._pending.done:
            self.close()  # abandoned midway: its late replies must not answer this request
        request_id = self._next_id
        self._next_id += 1
        self._send(encode_request(request_id, cmd, args))
        wait = self.timeout if timeout is _UNSET else timeout
        self._pending = ReplyStream(self, request_id, wait, idle)
        return self._pending

    # -- the wire --------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(self.path)
            except FileNotFoundError:
                sock.close()
                raise DaemonUnreachable(self.path, "no such socket (is dynsupd running?)") from None
            except ConnectionRefusedError:
                sock.close()
                raise DaemonUnreachable(self.path, "connection refused (stale socket?)") from None
            except PermissionError:
                sock.close()
                raise DaemonUnreachable(self.path, "permission denied") from None
            except OSError as exc:
                sock.close()
                raise DaemonUnreachable(self.path, exc.strerror or str(exc)) from None
            self._sock = sock
        return self._sock

    def _send(self, data: bytes) -> None:
        sock = self._connect()
        sock.settimeout(self.timeout)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon may have refused us with a line already; read it below.
            pass
        except TimeoutError:
            raise ConnectionLost("timed out sending the request") from None

    def _read_message(self, timeout: float | None) -> dict[str, Any]:
        """The next message; TimeoutError when none came within timeout."""
        assert self._sock is not None
        scanned = 0  # no newline in _buf[:scanned]: a long line is searched once
        while True:
            end = self._buf.find(b"\n", scanned)
            scanned = len(self._buf)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                try:
                    message = _decode(line)
                except ProtocolError:
                    self.close()  # out of step with the daemon: start afresh next time
                    raise
                event = message.get("event")
                if isinstance(event, dict) and isinstance(event.get("size"), int):
                    # A raw tail event: its bytes follow the line; they stay
                    # bytes (``"bytes"``), to be written out as they are.
                    event["bytes"] = self._read_exactly(event.pop("size"), timeout)
                return message
            if len(self._buf) > MAX_REPLY:
                self.close()
                raise ProtocolError(f"reply longer than {MAX_REPLY} bytes")
            # Our own buffer (not makefile): a timeout never loses half a line.
            self._sock.settimeout(timeout)
            try:
                chunk = self._sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.close()
                raise ConnectionLost("dynsupd closed the connection before replying")
            self._buf += chunk

    def _read_exactly(self, size: int, timeout: float | None) -> bytes | bytearray:
        assert self._sock is not None
        if not 0 <= size <= MAX_REPLY:
            self.close()
            raise ProtocolError(f"raw event of {size} bytes")
        if len(self._buf) >= size:
            data = self._buf[:size]
            del self._buf[:size]
            return data
        data = bytearray(size)
        view = memoryview(data)
        have = len(self._buf)
        view[:have] = self._buf
        self._buf.clear()
        self._sock.settimeout(timeout)
        while have < size:
            try:
                got = self._sock.recv_into(view[have:])
            except (ConnectionResetError, BrokenPipeError):
                got = 0
            if not got:
                self.close()
                raise ConnectionLost("dynsupd closed the connection in the middle of an event")
            have += got
        return data


class ReplyStream:
    """The replies to one request: iterate for its events; then ``.result`` holds the result.

    Iteration raises `CommandError` if the daemon answered with an error.
    """

    def __init__(
        self, client: Client, request_id: int, timeout: float | None, idle: float | None
    ) -> None:
        self._client = client
        self._id = request_id
        self._timeout = timeout
        self._idle = idle
        self._done = False
        self._result: Any = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def result(self) -> Any:
        if not self._done:
            raise RuntimeError("the stream has not ended yet; iterate it first")
        return self._result

    def __iter__(self) -> Iterator[Any]:
        silent = 0.0
        while not self._done:
            wait = self._timeout
            if self._idle is not None:
                wait = self._idle if wait is None else min(self._idle, wait - silent)
            try:
                message = self._client._read_message(wait)
            except TimeoutError:
                silent += wait or 0.0
                if self._timeout is not None and silent >= self._timeout:
                    self._client.close()  # a late reply would confuse the next request
                    raise ConnectionLost(
                        f"no reply from dynsupd within {self._timeout:g}s"
                    ) from None
                yield IDLE
                continue
            silent = 0.0
            if message.get("id") not in (self._id, None):
                self._client.close()
                raise ProtocolError(f"reply for request {message.get('id')!r}, not {self._id}")
            if not message.get("ok", False):
                self._done = True
                raise CommandError.from_json(message.get("error"))
            if "event" in message:
                yield message["event"]
            elif "result" in message:
                self._done = True
                self._result = message["result"]
            else:
                self._client.close()
                raise ProtocolError(f"reply without event or result: {message!r}"[:200])


def _decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        raise ProtocolError(f"not JSON: {line[:80]!r}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"not a JSON object: {line[:80]!r}")
    return message
