"""Fan-out without loss of the present: the one primitive for "something changed".

Two shapes, both safe to use as *snapshot, then changes*: read the current
state, then wait, with no ``await`` in between, and nothing can be missed.

* `Pulse`: wakes every waiter on each `fire()`; the waiter looks again.
* `Feed`: an ordered stream of values for one subscriber, bounded. A
  subscriber that falls behind is never a reason to block the publisher,
  and never left with a stale picture either: on overflow its queue is
  dropped and the next `receive()` starts again from a fresh snapshot
  (process-compose's state broadcaster drops; we resynchronise).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class Pulse:
    """An event that re-arms itself: `wait()` returns at the next `fire()`."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def fire(self) -> None:
        event, self._event = self._event, anyio.Event()
        event.set()

    async def wait(self) -> None:
        await self._event.wait()


class Feed(Generic[T]):
    """One subscriber's ordered view of published values; see the module docstring.

    ``snapshot`` gives the current value of everything, for the resync after
    an overflow; values published after a resync are newer than it.
    """

    def __init__(
        self,
        snapshot: Callable[[], Iterable[T]],
        buffer: int,
        on_close: Callable[[Feed[T]], None],
    ) -> None:
        self._snapshot = snapshot
        self._buffer = max(1, buffer)
        self._on_close = on_close
        self._queue: deque[T] = deque()
        self._resync: deque[T] = deque()
        self._lagged = False
        self._closed = False
        self._pulse = Pulse()
        self.resyncs = 0  # how often this subscriber fell behind

    def publish(self, value: T) -> None:
        if self._closed:
            return
        if len(self._queue) >= self._buffer:
            # The subscriber lags: what it has queued is history now; it will
            # read the present instead.
            self._queue.clear()
            self._lagged = True
        else:
            self._queue.append(value)
        self._pulse.fire()

    def receive_nowait(self) -> T:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._lagged:
            # Synchronous with the snapshot: everything published from here on
            # is newer than what the snapshot holds.
            self._lagged = False
            self.resyncs += 1
            self._queue.clear()
            self._resync = deque(self._snapshot())
        if self._resync:
            return self._resync.popleft()
        if self._queue:
            return self._queue.popleft()
        raise anyio.WouldBlock

    async def receive(self) -> T:
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                await self._pulse.wait()

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except anyio.ClosedResourceError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.clear()
            self._resync.clear()
            self._on_close(self)
            self._pulse.fire()

    def __enter__(self) -> Feed[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
