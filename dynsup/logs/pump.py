"""Draining a child's pipe: every byte at once when it is quiet, few large reads in a flood.

A pipe costs its writer most when the reader is waiting on it: each
``write()`` then wakes the reader, and a reader that takes a few lines at
a time makes the writer pay that wake-up for every few lines. So while a
child floods, the pump does not wait on the pipe at all: it takes the
whole pipe in one read, then sleeps on a timer for about the time the
pipe needs to fill halfway at the rate just seen (the child never blocks
on a full pipe, and nothing wakes the pump meanwhile). A quiet child's
line is read the moment it comes, as before.

Measured with bench/log_flood.py (block-buffered child, 2-core box): the
previous pump, 256 KiB reads and a fixed 1 ms pause, capped a child at
half of its /dev/null rate; see bench/README.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable

import anyio

# Below this a read is a quiet child's line or burst: wait on the pipe again.
_BUSY_READ = 32 * 1024
# A flooding child's next read should find the pipe about this full.
_TARGET_FILL = 0.5
# The longest pause: what a `tail -f` or a log probe may lag behind a flood.
_MAX_PAUSE = 0.02
_DEFAULT_PIPE = 64 * 1024  # Linux's, should F_GETPIPE_SZ fail


def pipe_size(fd: int) -> int:
    """The capacity of the pipe fd (what one read can take at most)."""
    with contextlib.suppress(OSError):
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    return _DEFAULT_PIPE


def flood_pause(size: int, elapsed: float, capacity: int) -> float:
    """How long to leave a pipe alone after reading ``size`` bytes that came in ``elapsed`` s.

    Zero when the pipe was (nearly) full: the writer may already be waiting.
    """
    if size >= capacity * _TARGET_FILL or elapsed <= 0:
        return 0.0
    rate = size / elapsed
    return min(_MAX_PAUSE, capacity * _TARGET_FILL / rate)


async def pump_pipe(fd: int, deliver: Callable[[bytes], None]) -> None:
    """Read the non-blocking pipe fd until EOF, handing each read to deliver; close fd."""
    try:
        capacity = pipe_size(fd)
        emptied = time.monotonic()  # when the pipe was last read empty
        while True:
            try:
                data = os.read(fd, capacity)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if not data:
                return
            now = time.monotonic()
            deliver(data)
            elapsed, emptied = now - emptied, now
            if len(data) >= _BUSY_READ:
                # Even with no pause, let the rest of the loop run between reads.
                await anyio.sleep(flood_pause(len(data), elapsed, capacity))
    finally:
        os.close(fd)
