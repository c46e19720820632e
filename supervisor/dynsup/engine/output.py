"""Unit output for the engine's log probes and for `tail -f`.

Whoever pumps chunks out of an agent publishes them here; a log probe
subscribes before its process is spawned, so it cannot miss a line.
Publishing never blocks: a subscriber that falls behind loses output.

The hub also says whose output it needs (`names`, and `changed` when that
set changes): a pump may pull only those units' chunks. Chunks of a unit
printed a little before its consumer came may still be published to it;
each consumer drops what is not its own (a probe: another pid; `tail -f`:
bytes before the offset it read first).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..agent_api import LogChunk
from ..broadcast import Pulse

_MAX_LINE = 64 * 1024
# What a `tail -f` follower may have queued (its socket is slower than the
# unit): the daemon's memory stays bounded under a flood.
FOLLOW_BUDGET = 4 << 20
# What a log probe may have queued: searching a block costs it far less
# than the pump's read that made it, so it only lags on a busy loop.
PROBE_BUDGET = 4 << 20

_C = TypeVar("_C")


class LineSubscription:
    """A unit's output as blocks of whole lines, for a log probe.

    Each block is the text of the complete lines a chunk ends (joined by
    newlines, without the last one): a probe searches a block at once, in
    C, instead of being woken for every line (a flood is a million lines a
    second). Bounded in bytes: a probe that falls behind by more than
    ``budget`` loses blocks.
    """

    def __init__(self, hub: OutputHub, name: str, pid: int | None, budget: int) -> None:
        self.name = name
        # None until the process is spawned: lines that arrive first are kept
        # and sorted out by pid once it is known (bind).
        self.pid = pid
        self.budget = budget
        self.queued = 0  # characters published and not yet taken
        self._early: list[LogChunk] = []
        self._hub = hub
        self._partial: dict[str, bytes] = {}
        self._send: MemoryObjectSendStream[str]
        self._receive: MemoryObjectReceiveStream[str]
        self._send, self._receive = anyio.create_memory_object_stream[str](math.inf)

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
        held = self._partial.get(chunk.stream)
        data = held + chunk.data if held else chunk.data
        end = data.rfind(b"\n")
        # An unfinished line is held (its last _MAX_LINE bytes) until its newline comes.
        self._partial[chunk.stream] = data[end + 1 :][-_MAX_LINE:]
        if end < 0:
            return
        block = data[:end].decode("utf-8", "replace")
        if self.queued + len(block) > self.budget:
            return  # lost: the probe is that far behind
        self.queued += len(block)
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(block)

    async def lines(self) -> AsyncIterator[str]:
        """Blocks of whole lines, joined by newlines, as they are printed."""
        async for block in self._receive:
            self.queued -= len(block)
            yield block

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
        # Invariant: no empty lists; their keys are `names()`.
        self._subs: dict[str, list[LineSubscription]] = {}
        self._followers: dict[str, list[ChunkFollower]] = {}
        self._names: frozenset[str] = frozenset()
        self.changed = Pulse()  # fired when `names()` changes

    def names(self) -> frozenset[str]:
        """The units whose output someone here consumes now."""
        return self._names

    def _update_names(self) -> None:
        names = frozenset(self._subs) | frozenset(self._followers)
        if names != self._names:
            self._names = names
            self.changed.fire()

    def follow(self, *names: str, budget: int = FOLLOW_BUDGET) -> ChunkFollower:
        """One follower of these units' chunks, in the order they are published."""
        follower = ChunkFollower(self, names, budget)
        for name in names:
            self._followers.setdefault(name, []).append(follower)
        self._update_names()
        return follower

    def unfollow(self, follower: ChunkFollower) -> None:
        for name in follower.names:
            _discard(self._followers, name, follower)
        self._update_names()

    def subscribe(self, name: str, pid: int | None, budget: int = PROBE_BUDGET) -> LineSubscription:
        sub = LineSubscription(self, name, pid, budget)
        self._subs.setdefault(name, []).append(sub)
        self._update_names()
        return sub

    def unsubscribe(self, sub: LineSubscription) -> None:
        _discard(self._subs, sub.name, sub)
        self._update_names()

    def publish(self, chunk: LogChunk) -> None:
        for sub in list(self._subs.get(chunk.name, ())):
            sub.offer(chunk)
        for follower in list(self._followers.get(chunk.name, ())):
            follower.offer(chunk)


def _discard(table: dict[str, list[_C]], name: str, consumer: _C) -> None:
    """Remove consumer from table[name], and the key with its last consumer."""
    consumers = table.get(name, [])
    if consumer in consumers:
        consumers.remove(consumer)
    if not consumers:
        table.pop(name, None)
