"""Draining a child's pipe: a quiet child's line at once, a flood in few reads.

A pipe costs its writer most when its reader waits on it: every
``write()`` then wakes the reader, and a reader that takes a few lines per
wake-up makes the writer pay for one every few lines. So once a child
writes fast, the pump stops waiting on the pipe: it reads, then sleeps on a
timer for about the time the child needs to put one more read's worth in
the pipe at the rate just seen (nothing wakes the pump meanwhile, and the
1 MiB pipe leaves the child room to go on). After a quiet spell the first
line is read the moment it comes; the pause is at most `MAX_PAUSE`, what a
`tail -f` or a log probe may lag behind the child.

Reads stay just under 128 KiB, the daemon's malloc mmap threshold: a
bigger chunk is a fresh mmap whose pages fault in on every read, which
cost three times the CPU of the rest of the path (bench/README.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable

import anyio

READ_SIZE = 120 * 1024
MAX_PAUSE = 0.01
_DEFAULT_PIPE = 64 * 1024  # Linux's, should F_GETPIPE_SZ fail


def pipe_size(fd: int) -> int:
    """The capacity of the pipe fd."""
    with contextlib.suppress(OSError):
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    return _DEFAULT_PIPE


def flood_pause(size: int, elapsed: float, target: int) -> float:
    """How long to leave a pipe alone after a read of ``size`` bytes that came in ``elapsed`` s.

    About the time ``target`` more bytes take at that rate, at most
    `MAX_PAUSE`; none when the read got ``target`` bytes or more (the pipe
    holds more, and the writer may be waiting).
    """
    if size >= target or elapsed <= 0:
        return 0.0
    return min(MAX_PAUSE, target * elapsed / size)


async def pump_pipe(fd: int, deliver: Callable[[bytes], None]) -> None:
    """Read the non-blocking pipe fd until EOF, handing each read to deliver; close fd."""
    try:
        # Half the pipe at most: the child keeps room to write during a pause.
        read_size = min(READ_SIZE, pipe_size(fd) // 2)
        emptied = time.monotonic()  # when the pipe was last read empty
        while True:
            try:
                data = os.read(fd, read_size)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if not data:
                return
            now = time.monotonic()
            deliver(data)
            elapsed, emptied = now - emptied, now
            # Even with no pause, let the rest of the loop run between reads.
            await anyio.sleep(flood_pause(len(data), elapsed, read_size))
    finally:
        os.close(fd)
