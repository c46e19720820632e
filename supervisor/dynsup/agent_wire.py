"""The agent process's wire: length-prefixed pickle frames over its Unix socket.

Pickle, not JSON lines, because the socket is private: mode 0600 in the
state directory, and the agent serves only a peer of its own uid (checked
with SO_PEERCRED on every connection), who could ptrace either end anyway.
What crosses it is exactly the `Agent` contract's values (frozen
dataclasses, bytes, `AgentError`s), which already pickle for Ray; a JSON
codec would have to be kept in step with every one of them. Both ends must
share those classes: the first call (``hello``) tells the agent's `PROTOCOL`;
a daemon uses an agent of `OLDEST_PROTOCOL` or later, within what that
agent knows, and replaces any other (see `agent_client`).

Frames: 4-byte big-endian length, then a pickled tuple. Requests are
``(id, method, args)``; ``(id, CANCEL, ())`` abandons a call; answers are
``(id, ok, value)`` where value is the result or the exception raised.

A connection that starts with the byte `FOLLOW` (and a descriptor) is not
a call connection: it hands the agent a `tail -f` client's socket, then
one frame ``(request_id, name, positions, tagged, raw)``; the agent writes the
follow to that socket and answers one frame, whether the client is still
there, once it ends (the client left, or the daemon closed the connection).
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

from anyio.abc import ByteStream

# 2: next_chunks takes the names the daemon consumes; the agent forwards to journald.
PROTOCOL = 2
# The oldest agent a daemon still speaks to, and adopts from, as it is: a
# daemon upgrade must not restart the units. Protocol 1 knows nothing of
# output interest (`next_chunks` names), journald in the agent (`use_journal`)
# or handed-over followers (`FOLLOW`): the daemon pulls everything, forwards
# to journald and relays `tail -f` itself until that agent is replaced, at
# the next orderly stop or when it dies.
OLDEST_PROTOCOL = 1
CANCEL = "__cancel__"
# The first byte of a connection that hands over a `tail -f` client: it
# carries the client's socket (SCM_RIGHTS). A call connection starts with a
# frame, whose first byte (the top of a length under MAX_FRAME) is never this.
FOLLOW = b"F"
_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20  # a log read is at most a ring (1 MiB); anything bigger is a bug
_RECEIVE_SIZE = 1 << 20


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


async def send_frame(stream: ByteStream, value: Any) -> None:
    frame = io.BytesIO()
    frame.write(bytes(_HEADER.size))
    pickle.dump(value, frame, protocol=pickle.HIGHEST_PROTOCOL)
    view = frame.getbuffer()
    _HEADER.pack_into(view, 0, len(view) - _HEADER.size)
    await stream.send(view)  # type: ignore[arg-type]  # a buffer, sent without a copy


class FrameReader:
    """Reads frames from one stream.

    A log batch is a frame of up to a few MiB: its pieces are gathered as
    they come and joined once, not appended to a growing buffer (each
    append, slice and trim of which is a copy of the frame).
    """

    def __init__(self, stream: ByteStream, read: bytes = b"") -> None:
        """``read``: what was already read from the stream."""
        self._stream = stream
        self._pieces: list[bytes | memoryview] = [read] if read else []
        self._held = len(read)  # bytes in _pieces

    async def receive(self) -> Any:
        """The next frame's value. EndOfStream at EOF; FrameError for garbage."""
        (size,) = _HEADER.unpack(await self._take(_HEADER.size))
        if size > MAX_FRAME:
            raise FrameError(f"frame of {size} bytes")
        data = await self._take(size)
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise FrameError(f"undecodable frame: {exc}") from exc

    async def _take(self, size: int) -> memoryview:
        while self._held < size:
            piece = await self._stream.receive(_RECEIVE_SIZE)
            self._pieces.append(piece)
            self._held += len(piece)
        pieces = self._pieces
        joined = memoryview(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        self._pieces = [joined[size:]] if len(joined) > size else []
        self._held = len(joined) - size
        return joined[:size]


def picklable_error(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else its text in an AgentError."""
    from .agent_api import AgentError

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return AgentError(f"{type(exc).__name__}: {exc}")
    return exc
