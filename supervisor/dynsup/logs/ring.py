"""Bounded logs addressed by absolute byte offset, and the agent's store of them.

A `RingBuffer` holds the newest ``capacity`` bytes of a stream. Offsets count
every byte ever appended, so a reader keeps an offset across appends and
learns how much it missed when the bytes it wanted were dropped: a slow
reader loses the oldest bytes, a writer (a child's pipe) never waits.

`LogStore` keeps one ring per (process name, stream) and an agent-wide
queue of recent chunks with sequence numbers, for pumps that long-poll
(`since`, `wait_beyond`), either for every process or only for some names
(a pump that pulls only what its daemon consumes). Both are sync and
lock-free: they live on one event loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection
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
        # Invariant: the byte at absolute offset o (start <= o < end) is
        # _buf[o % capacity]. _buf grows with the first `capacity` bytes, then
        # never changes size: later bytes overwrite the oldest in place. (A
        # buffer that was trimmed and regrown got new memory from malloc every
        # `capacity` bytes, and under a log flood the page faults on that
        # fresh memory were most of the daemon's CPU.)
        self._buf = bytearray()
        self._end = 0

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return max(0, self._end - self.capacity)

    @property
    def end(self) -> int:
        """Total bytes ever appended: the offset the next byte will get."""
        return self._end

    def __len__(self) -> int:
        return self._end - self.start

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Append data and return the offset of data[0].

        When data alone is larger than the capacity only its last
        ``capacity`` bytes are kept, without ever holding more.
        """
        offset = self._end
        view = memoryview(data).cast("B")
        n = len(view)
        cap = self.capacity
        kept = view[n - cap :] if n > cap else view
        at = offset + n - len(kept)  # absolute offset of kept[0]
        buf = self._buf
        if len(buf) < cap:
            if at + len(kept) <= cap:  # still filling: _buf is [0, end) as it is
                buf += kept
                self._end += n
                return offset
            buf += bytes(cap - len(buf))  # once per ring: from now on, overwrite in place
        i = at % cap
        first = min(len(kept), cap - i)
        buf[i : i + first] = kept[:first]
        if first < len(kept):
            buf[: len(kept) - first] = kept[first:]
        self._end += n
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
        start = min(max(offset, self.start), self._end)
        stop = min(start + limit, self._end)
        cap = self.capacity
        i = start % cap
        size = stop - start
        with memoryview(self._buf) as buf:  # one copy, not a slice's and then bytes'
            if i + size <= cap:
                data = bytes(buf[i : i + size])
            else:
                data = b"".join((buf[i:], buf[: i + size - cap]))
        return start, data, stop

    def tail_offset(self, n_lines: int) -> int:
        """The offset where the last ``n_lines`` lines start, as ``tail -n`` shows them.

        An unterminated last line counts as a line. With fewer lines held,
        this is `start` (possibly in the middle of a line that was cut).
        """
        start = self.start
        if n_lines <= 0:
            return self._end
        pos = self._end
        if pos > start and self._buf[(pos - 1) % self.capacity] == 0x0A:  # ends a line
            pos -= 1
        for _ in range(n_lines):
            pos = self._rfind_newline(start, pos)
            if pos < 0:
                return start
        return pos + 1

    def _rfind_newline(self, lo: int, hi: int) -> int:
        """The absolute offset of the last newline in [lo, hi), or -1."""
        if hi <= lo:
            return -1
        cap = self.capacity
        base = lo - lo % cap  # the absolute offset of _buf[0] for lo's lap
        if hi > base + cap:  # the range wraps: look at the newer part first
            found = self._buf.rfind(b"\n", 0, hi - base - cap)
            if found >= 0:
                return base + cap + found
            hi = base + cap
        found = self._buf.rfind(b"\n", lo - base, hi - base)
        return base + found if found >= 0 else -1


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
        # name -> seq of its newest chunk, and of its newest chunk dropped from
        # the queue: what a pump interested in some names only has to look at.
        self._last_of: dict[str, int] = {}
        self._dropped_of: dict[str, int] = {}
        # Created by the first waiter, set and dropped by the next append:
        # anyio.Event needs a running loop, append may run without one.
        self._appended: anyio.Event | None = None
        # Waiters for some names only: a chunk of another name wakes none of
        # them (under a flood of a unit nobody follows, the pump sleeps).
        self._waiters: list[tuple[Collection[str], anyio.Event]] = []

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
        self._last_of[name] = self._last_seq
        # Keep the newest chunk whatever its size, so a pump can always see it.
        while self._recent_size > self.recent_bytes and len(self._recent) > 1:
            old = self._recent.popleft()
            self._recent_size -= len(old.data) + _CHUNK_OVERHEAD
            self._dropped_of[old.name] = old.seq
        if self._appended is not None:
            self._appended.set()
            self._appended = None
        if self._waiters:
            self._wake(name)
        return chunk

    def _wake(self, name: str) -> None:
        """Wake the waiters for name (each once: a woken waiter looks again)."""
        waiting = []
        for names, event in self._waiters:
            if name in names:
                event.set()
            else:
                waiting.append((names, event))
        self._waiters = waiting

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

    def last_seq_of(self, name: str) -> int:
        """Sequence number of name's newest chunk (0 before its first)."""
        return self._last_of.get(name, 0)

    def remove(self, name: str) -> None:
        """Forget a process's rings (a removed unit or replica); queued chunks age out."""
        for key in [k for k in self._rings if k[0] == name]:
            del self._rings[key]

    def since(
        self,
        cursor: int,
        max_bytes: int | None = None,
        names: Collection[str] | None = None,
    ) -> tuple[list[LogChunk], int, int]:
        """The queued chunks after ``cursor``: ``(chunks, new_cursor, lost)``.

        ``names``: only those processes' chunks (None: everyone's); the new
        cursor is past the others too, so they are never looked at again.
        ``lost`` counts the chunks after the cursor that were dropped before
        this call; with ``names``, only when one of theirs was among them
        (then all of them: the queue does not keep the names of what it
        dropped). ``max_bytes`` caps a batch (at least one chunk is returned).
        A cursor beyond the newest chunk (from a previous agent) resyncs to it.
        """
        if cursor >= self._last_seq:
            return [], self._last_seq, 0
        first_seq = self._recent[0].seq
        lost = max(0, first_seq - cursor - 1)
        if names is not None and not any(self._dropped_of.get(n, 0) > cursor for n in names):
            lost = 0
        chunks: list[LogChunk] = []
        size = 0
        new_cursor = self._last_seq
        for chunk in islice(self._recent, max(0, cursor + 1 - first_seq), None):
            if names is not None and chunk.name not in names:
                continue
            size += len(chunk.data)
            if max_bytes is not None and chunks and size > max_bytes:
                new_cursor = chunks[-1].seq
                break
            chunks.append(chunk)
        return chunks, new_cursor, lost

    async def wait_beyond(
        self, cursor: int, timeout: float, names: Collection[str] | None = None
    ) -> bool:
        """Wait until a chunk newer than ``cursor`` exists or ``timeout`` passes.

        ``names``: a chunk of one of them (None: of anyone). Returns whether
        one exists. Cancellable; never consumes anything. A cursor beyond the
        newest chunk (from a previous agent's life) returns at once: `since`
        resyncs it.
        """
        if cursor > self._last_seq:
            return False
        with anyio.move_on_after(timeout):
            if names is None:
                while self._last_seq <= cursor:
                    if self._appended is None:
                        self._appended = anyio.Event()
                    await self._appended.wait()
            else:
                while not self._beyond(cursor, names):
                    waiter = (names, anyio.Event())
                    self._waiters.append(waiter)
                    try:
                        await waiter[1].wait()
                    finally:
                        if waiter in self._waiters:  # cancelled, or timed out
                            self._waiters.remove(waiter)
        return self._beyond(cursor, names)

    def _beyond(self, cursor: int, names: Collection[str] | None) -> bool:
        if names is None:
            return self._last_seq > cursor
        return any(self._last_of.get(name, 0) > cursor for name in names)
