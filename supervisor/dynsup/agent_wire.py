"""The agent process's wire: length-prefixed pickle frames over its Unix socket.

Pickle, not JSON lines, because the socket is private: mode 0600 in the
state directory, and the agent serves only a peer of its own uid (checked
with SO_PEERCRED on every connection), who could ptrace either end anyway.
What crosses it is exactly the `Agent` contract's values (frozen
dataclasses, bytes, `AgentError`s), which already pickle for Ray; a JSON
codec would have to be kept in step with every one of them. Both ends must
share those classes: the first call (``hello``) compares `PROTOCOL`, and a
daemon that finds another one replaces that agent (see `agent_client`).

Frames: 4-byte big-endian length, then a pickled tuple. Requests are
``(id, method, args)``; ``(id, CANCEL, ())`` abandons a call; answers are
``(id, ok, value)`` where value is the result or the exception raised.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from anyio.abc import ByteStream

PROTOCOL = 1
CANCEL = "__cancel__"
_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20  # a log read is at most a ring (1 MiB); anything bigger is a bug


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


async def send_frame(stream: ByteStream, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    await stream.send(_HEADER.pack(len(data)) + data)


async def receive_frame(stream: ByteStream, buffer: bytearray) -> Any:
    """The next frame; ``buffer`` keeps what was read beyond it. EndOfStream at EOF."""
    while True:
        if len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes")
            if len(buffer) >= _HEADER.size + size:
                data = bytes(buffer[_HEADER.size : _HEADER.size + size])
                del buffer[: _HEADER.size + size]
                try:
                    return pickle.loads(data)
                except Exception as exc:
                    raise FrameError(f"undecodable frame: {exc}") from exc
        buffer += await stream.receive(1 << 16)


def picklable_error(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else its text in an AgentError."""
    from .agent_api import AgentError

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return AgentError(f"{type(exc).__name__}: {exc}")
    return exc
