"""Unit output as lines, for the engine's log probes.

Whoever pumps chunks out of an agent publishes them here; a log probe
subscribes before its process is spawned, so it cannot miss a line.
Publishing never blocks: a subscriber that falls behind loses lines.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..agent_api import LogChunk

_MAX_LINE = 64 * 1024
# What a `tail -f` follower may have queued (its socket is slower than the
# unit): the daemon's memory stays bounded under a flood.
FOLLOW_BUDGET = 4 << 20


class LineSubscription:
    def __init__(self, hub: OutputHub, name: str, pid: int | None, buffer: int) -> None:
        self.name = name
        # None until the process is spawned: lines that arrive first are kept
        # and sorted out by pid once it is known (bind).
        self.pid = pid
        self._early: list[LogChunk] = []
        self._hub = hub
        self._partial: dict[str, bytes] = {}
        self._send: MemoryObjectSendStream[str]
        self._receive: MemoryObjectReceiveStream[str]
        self._send, self._receive = anyio.create_memory_object_stream[str](buffer)

    def bind(self, pid: int) -> None:
        self.pid = pid
        early, self._early = self._early, []
        for chunk in early:
            if chunk.pid == pid:
                self.feed(chunk)

    def offer(self, chunk: LogChunk) -> None:
        if self.pid is None:
            self._early.append(chunk)
        elif chunk.pid == self.pid:
            self.feed(chunk)

    def feed(self, chunk: LogChunk) -> None:
        data = self._partial.pop(chunk.stream, b"") + chunk.data
        *complete, rest = data.split(b"\n")
        self._partial[chunk.stream] = rest[-_MAX_LINE:]
        for raw in complete:
            with contextlib.suppress(anyio.WouldBlock):
                self._send.send_nowait(raw.decode("utf-8", "replace"))

    async def lines(self) -> AsyncIterator[str]:
        async for line in self._receive:
            yield line

    def close(self) -> None:
        self._hub.unsubscribe(self)
        self._send.close()
        self._receive.close()


class ChunkFollower:
    """Raw chunks of some units, for `tail -f`. Bounded in bytes: a slow follower
    loses chunks and sees the gap in the offsets of the next one."""

    def __init__(self, hub: OutputHub, names: tuple[str, ...], budget: int) -> None:
        self.names = names
        self.budget = budget
        self.queued = 0  # bytes published and not yet taken
        self._hub = hub
        self.send, self.receive = anyio.create_memory_object_stream[LogChunk](math.inf)

    def offer(self, chunk: LogChunk) -> None:
        if self.queued + len(chunk.data) > self.budget:
            return  # lost; the next chunk's offset tells the follower how much
        self.queued += len(chunk.data)
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.send.send_nowait(chunk)

    async def chunks(self) -> AsyncIterator[LogChunk]:
        async for chunk in self.receive:
            self.queued -= len(chunk.data)
            yield chunk

    def close(self) -> None:
        self._hub.unfollow(self)
        self.send.close()
        self.receive.close()


class OutputHub:
    def __init__(self) -> None:
        self._subs: dict[str, list[LineSubscription]] = {}
        self._followers: dict[str, list[ChunkFollower]] = {}

    def follow(self, *names: str, budget: int = FOLLOW_BUDGET) -> ChunkFollower:
        """One follower of these units' chunks, in the order they are published."""
        follower = ChunkFollower(self, names, budget)
        for name in names:
            self._followers.setdefault(name, []).append(follower)
        return follower

    def unfollow(self, follower: ChunkFollower) -> None:
        for name in follower.names:
            followers = self._followers.get(name, [])
            if follower in followers:
                followers.remove(follower)

    def subscribe(self, name: str, pid: int | None, buffer: int = 4096) -> LineSubscription:
        sub = LineSubscription(self, name, pid, buffer)
        self._subs.setdefault(name, []).append(sub)
        return sub

    def unsubscribe(self, sub: LineSubscription) -> None:
        subs = self._subs.get(sub.name, [])
        if sub in subs:
            subs.remove(sub)

    def publish(self, chunk: LogChunk) -> None:
        for sub in list(self._subs.get(chunk.name, ())):
            sub.offer(chunk)
        for follower in list(self._followers.get(chunk.name, ())):
            follower.offer(chunk)
