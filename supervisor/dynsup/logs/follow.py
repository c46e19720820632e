"""`tail -f` served from the rings, straight onto the client's socket.

The daemon answers a follow request, sends its first event (the last
lines), then hands the client's socket to the agent that holds the rings
(`Agent.follow`); the events that follow are written by `follow_rings`,
in the agent's process, and never cross the daemon. Under a flood that is
what keeps the daemon's CPU near zero: relaying a child's output through
the daemon cost more than the agent's reading it (bench/README.md).

The follower keeps no queue: it reads each stream's ring from where it
left off, as fast as the client takes it. What the ring overwrote before
the follower came to it is announced as ``missed``, as the daemon's
followers always did; the events are the same JSON lines.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping

import anyio

from ..control.protocol import LogData, RequestId, encode_event
from .ring import LogStore

# One event carries at most this much of a stream: a ring's worth (1 MiB by
# default) in a few events, each one send the client reads in one go.
EVENT_BYTES = 1 << 20
# A client that takes nothing for this long is dropped (the daemon's rule).
SEND_TIMEOUT = 60.0


async def follow_rings(
    store: LogStore,
    client: socket.socket,
    request_id: RequestId,
    name: str,
    positions: Mapping[str, int],
    *,
    tagged: bool,
    raw: bool = False,
) -> bool:
    """Write ``name``'s output past ``positions`` (stream -> offset) to ``client``
    as tail events until the client leaves; returns False then.

    ``tagged`` events name their stream; ``raw`` ones carry the bytes after
    the line (`LogData`). Cancel it to end the follow; the
    caller owns the socket (this never closes it).
    """
    client.setblocking(False)
    async with anyio.create_task_group() as tg:

        async def until_client_leaves() -> None:
            await _wait_closed(client)
            tg.cancel_scope.cancel()

        tg.start_soon(until_client_leaves)
        # OSError, TimeoutError: the client is gone or stopped reading.
        with contextlib.suppress(OSError, TimeoutError):
            await _write(store, client, request_id, name, dict(positions), tagged, raw)
        tg.cancel_scope.cancel()
    return False


async def _write(
    store: LogStore,
    client: socket.socket,
    request_id: RequestId,
    name: str,
    positions: dict[str, int],
    tagged: bool,
    raw: bool,
) -> None:
    while True:
        # Read the sequence first: anything of its unit appended after it wakes the wait below.
        seen = store.last_seq
        wrote = False
        for stream, position in positions.items():
            start, data, end = store.read(name, stream, position, EVENT_BYTES)
            if end < position:  # a new life of the unit's log (removed, then added)
                start, data, end = store.read(name, stream, 0, EVENT_BYTES)
                position = 0
            if not data:
                continue
            positions[stream] = end
            event = LogData(data, start - position, stream if tagged else None, raw)
            await _send(client, encode_event(request_id, event))
            wrote = True
        if not wrote:
            await store.wait_beyond(seen, timeout=3600.0, names=(name,))


async def _send(client: socket.socket, data: bytes) -> None:
    try:
        sent = client.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    if sent == len(data):
        return  # the usual case: no timeout scope to set up (a flood sends thousands a second)
    view = memoryview(data)[sent:]
    with anyio.fail_after(SEND_TIMEOUT):
        while view:
            await anyio.wait_writable(client)
            try:
                view = view[client.send(view) :]
            except (BlockingIOError, InterruptedError):
                continue


async def _wait_closed(client: socket.socket) -> None:
    """Until the client closes its side (what it sends meanwhile is dropped)."""
    while True:
        await anyio.wait_readable(client)
        try:
            if not client.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return
