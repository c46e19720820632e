"""Bounded logs addressed by absolute byte offset, and the agent's store of them.

A `RingBuffer` holds the newest ``capacity`` bytes of a stream. Offsets count
every byte ever appended, so a reader keeps an offset across appends and
learns how much it missed when the bytes it wanted were dropped: a slow
reader loses the oldest bytes, a writer (a child's pipe) never waits.

`LogStore` keeps one ring per (process name, stream) and an agent-wide
queue of recent chunks with sequence numbers, for pumps that long-poll
(`since`, `wait_beyond`). Both are sync and lock-free: they live on one
event loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from itertools import islice

import anyio

from ..agent_api import LogChunk

DEFAULT_CAPACITY = 1 << 20  # per (name, stream)
DEFAULT_RECENT_BYTES = 4 << 20  # the agent-wide chunk queue
# Counted per queued chunk on top of its data, so that a flood of tiny chunks
# is bounded too (a LogChunk costs a few hundred bytes of Python objects).
_CHUNK_OVERHEAD = 256


class RingBuffer:
    """The newest ``capacity`` bytes of a byte stream, addressed by absolute offset."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        # Invariant: _buf[_head:] holds exactly the bytes [_start, end). The
        # bytes before _head are dropped but not yet removed: they go all at
        # once when they reach `capacity` bytes, so each appended byte is moved
        # about once. (Trimming the front on every append made CPython move
        # the whole buffer on the next growth: under a log flood that memmove
        # was 40% of the daemon's time.) The storage stays under 3.5 x capacity.
        self._buf = bytearray()
        self._head = 0
        self._start = 0

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return self._start

    @property
    def end(self) -> int:
        """Total bytes ever appended: the offset the next byte will get."""
        return self._start + len(self)

    def __len__(self) -> int:
        return len(self._buf) - self._head

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Append data and return the offset of data[0].

        When data alone is larger than the capacity only its last
        ``capacity`` bytes are kept, without ever holding more.
        """
        offset = self.end
        n = len(data)
        if n >= self.capacity:
            self._buf = bytearray(memoryview(data)[n - self.capacity :])
            self._head = 0
            self._start = offset + n - self.capacity
            return offset
        self._buf += data
        keep_from = len(self._buf) - self.capacity
        if keep_from > self._head:
            self._start += keep_from - self._head
            self._head = keep_from
        if self._head >= self.capacity:
            del self._buf[: self._head]
            self._head = 0
        return offset

    def read(self, offset: int, limit: int) -> tuple[int, bytes, int]:
        """Up to ``limit`` bytes from ``offset``: ``(start, data, end)``.

        ``start`` is the offset of data[0]; it is greater than ``offset`` when
        the bytes asked for were already dropped (``start - offset`` were
        missed). Ask again from ``end``. An offset past the end (a cursor
        from another life of the log) reads nothing and resumes at the end.
        """
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must be >= 0, got {offset}, {limit}")
        start = min(max(offset, self._start), self.end)
        i = self._head + start - self._start
        data = bytes(self._buf[i : i + limit])
        return start, data, start + len(data)

    def tail_offset(self, n_lines: int) -> int:
        """The offset where the last ``n_lines`` lines start, as ``tail -n`` shows them.

        An unterminated last line counts as a line. With fewer lines held,
        this is `start` (possibly in the middle of a line that was cut).
        """
        if n_lines <= 0:
            return self.end
        pos = len(self._buf)
        if pos > self._head and self._buf[pos - 1] == 0x0A:  # ends a line, starts none
            pos -= 1
        for _ in range(n_lines):
            pos = self._buf.rfind(b"\n", self._head, pos)
            if pos < 0:
                return self._start
        return self._start + pos - self._head + 1


class LogStore:
    """The logs of every process an agent hosts: rings per stream plus a chunk queue."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        recent_bytes: int = DEFAULT_RECENT_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.capacity = capacity
        self.recent_bytes = recent_bytes
        self._clock = clock
        self._rings: dict[tuple[str, str], RingBuffer] = {}
        # Invariant: the queued chunks have consecutive seqs ending at _last_seq.
        self._recent: deque[LogChunk] = deque()
        self._recent_size = 0
        self._last_seq = 0
        # Created by the first waiter, set and dropped by the next append:
        # anyio.Event needs a running loop, append may run without one.
        self._appended: anyio.Event | None = None

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest chunk (0 before the first)."""
        return self._last_seq

    def append(
        self, name: str, stream: str, pid: int, data: bytes | bytearray | memoryview
    ) -> LogChunk:
        ring = self._rings.get((name, stream))
        if ring is None:
            ring = self._rings[name, stream] = RingBuffer(self.capacity)
        data = bytes(data)
        self._last_seq += 1
        chunk = LogChunk(
            seq=self._last_seq,
            name=name,
            stream=stream,
            pid=pid,
            offset=ring.append(data),
            data=data,
            time=self._clock(),
        )
        self._recent.append(chunk)
        self._recent_size += len(data) + _CHUNK_OVERHEAD
        # Keep the newest chunk whatever its size, so a pump can always see it.
        while self._recent_size > self.recent_bytes and len(self._recent) > 1:
            old = self._recent.popleft()
            self._recent_size -= len(old.data) + _CHUNK_OVERHEAD
        if self._appended is not None:
            self._appended.set()
            self._appended = None
        return chunk

    def read(self, name: str, stream: str, offset: int, limit: int) -> tuple[int, bytes, int]:
        """`RingBuffer.read` on one stream; a stream never written reads as empty."""
        ring = self._rings.get((name, stream))
        if ring is None:
            if offset < 0 or limit < 0:
                raise ValueError(f"offset and limit must be >= 0, got {offset}, {limit}")
            return 0, b"", 0
        return ring.read(offset, limit)

    def tail_offset(self, name: str, stream: str, n_lines: int) -> int:
        ring = self._rings.get((name, stream))
        return 0 if ring is None else ring.tail_offset(n_lines)

    def end(self, name: str, stream: str) -> int:
        ring = self._rings.get((name, stream))
        return 0 if ring is None else ring.end

    def remove(self, name: str) -> None:
        """Forget a process's rings (a removed unit or replica); queued chunks age out."""
        for key in [k for k in self._rings if k[0] == name]:
            del self._rings[key]

    def since(self, cursor: int, max_bytes: int | None = None) -> tuple[list[LogChunk], int, int]:
        """The queued chunks after ``cursor``: ``(chunks, new_cursor, lost)``.

        ``lost`` counts the chunks after the cursor that were dropped before
        this call. ``max_bytes`` caps a batch (at least one chunk is returned).
        A cursor beyond the newest chunk (from a previous agent) resyncs to it.
        """
        if cursor >= self._last_seq:
            return [], self._last_seq, 0
        first_seq = self._recent[0].seq
        lost = max(0, first_seq - cursor - 1)
        chunks: list[LogChunk] = []
        size = 0
        for chunk in islice(self._recent, max(0, cursor + 1 - first_seq), None):
            size += len(chunk.data)
            if max_bytes is not None and chunks and size > max_bytes:
                break
            chunks.append(chunk)
        return chunks, chunks[-1].seq, lost

    async def wait_beyond(self, cursor: int, timeout: float) -> bool:
        """Wait until a chunk newer than ``cursor`` exists or ``timeout`` passes.

        Returns whether one exists. Cancellable; never consumes anything.
        """
        with anyio.move_on_after(timeout):
            while self._last_seq <= cursor:
                if self._appended is None:
                    self._appended = anyio.Event()
                await self._appended.wait()
        return self._last_seq > cursor
