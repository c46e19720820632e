"""Draining children's pipes: one reader per agent; a quiet line at once, a flood in few reads.

`PipeReader` holds every pipe of an agent in one epoll and drains them
from a single task that sleeps on the epoll's own descriptor: no task,
no wake-up registration and no stack per pipe (two tasks per unit cost
~8 KiB each, most of a running unit's memory in the daemon).

A pipe costs its writer most when its reader waits on it: every
``write()`` then wakes the reader, and a reader that takes a few lines per
wake-up makes the writer pay for one every few lines. So once a child
writes fast, the reader stops waiting on the pipes: it reads, then sleeps
on a timer for about the time the fastest child needs to put one more
read's worth in its pipe at the rate just seen (nothing wakes the reader
meanwhile, and the 1 MiB pipe leaves the child room to go on). After a
quiet spell the first line is read the moment it comes; the pause is at
most `MAX_PAUSE`, what a `tail -f` or a log probe may lag behind a child.

In the daemon (the in-process agent) reads stay just under 128 KiB, the
daemon's malloc mmap threshold: a bigger chunk is a fresh mmap whose pages
fault in on every read, which cost three times the CPU of the rest of the
path (bench/README.md). The agent process raises its own threshold above
`BIG_READ_SIZE` and reads four times as much at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import structlog

READ_SIZE = 120 * 1024
# In a process of its own (the agent process, a Ray agent), whose malloc takes
# reads of this size from its heap and reuses them: a quarter as many reads,
# and the per-read Python work was most of the agent's CPU under a flood.
BIG_READ_SIZE = 480 * 1024
MAX_PAUSE = 0.01
_DEFAULT_PIPE = 64 * 1024  # Linux's, should F_GETPIPE_SZ fail

log = structlog.get_logger("dynsup.logs")


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


@dataclass
class _Pipe:
    deliver: Callable[[bytes], None]
    closed: Callable[[], None] | None
    read_size: int
    read_at: float = field(default_factory=time.monotonic)  # when it was last read


class PipeReader:
    """Drains many non-blocking pipes until EOF from one task (`run`), handing
    each read to the pipe's ``deliver``; closes each pipe at its EOF."""

    def __init__(self, read_size: int = READ_SIZE) -> None:
        """``read_size``: the most one read takes (and at most half a pipe)."""
        self.read_size = read_size
        self._epoll = select.epoll()
        self._pipes: dict[int, _Pipe] = {}

    def add(
        self,
        fd: int,
        deliver: Callable[[bytes], None],
        closed: Callable[[], None] | None = None,
    ) -> None:
        """Drain the non-blocking pipe fd from now on; the reader owns (and closes) it.

        ``closed`` is called once fd is closed: at its EOF, or when the reader ends.
        Sync, so that nothing a child prints can come before its pipe is watched.
        """
        # Half the pipe at most: the child keeps room to write during a pause.
        self._pipes[fd] = _Pipe(deliver, closed, min(self.read_size, pipe_size(fd) // 2))
        self._epoll.register(fd, select.EPOLLIN)

    def __len__(self) -> int:
        return len(self._pipes)

    async def run(self) -> None:
        """Drain every pipe added, as long as the agent lives; then close them all."""
        try:
            while True:
                # Level-triggered: a pipe with data left (a read of read_size)
                # is ready again on the next round.
                ready = self._epoll.poll(0)
                if not ready:
                    await anyio.wait_readable(self._epoll.fileno())
                    continue
                await anyio.sleep(self._read_round(ready))
        finally:
            self.close()

    def _read_round(self, ready: list[tuple[int, int]]) -> float:
        """One read of each ready pipe; returns how long to leave them all alone."""
        pause: float | None = None
        now = time.monotonic()
        for fd, _ in ready:
            pipe = self._pipes.get(fd)
            if pipe is None:
                continue
            try:
                data = os.read(fd, pipe.read_size)
            except BlockingIOError:
                continue
            except OSError as exc:  # not a pipe any more: treat as its end
                log.error("output.read_failed", fd=fd, error=str(exc))
                data = b""
            if not data:
                self._drop(fd)
                continue
            try:
                pipe.deliver(data)
            except Exception:
                # One consumer's bug must not stop every child's pipe: they would fill and block.
                log.exception("output.deliver_failed", fd=fd)
            wait = flood_pause(len(data), now - pipe.read_at, pipe.read_size)
            pipe.read_at = now
            pause = wait if pause is None else min(pause, wait)
        return pause or 0.0

    def _drop(self, fd: int) -> None:
        pipe = self._pipes.pop(fd)
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        os.close(fd)
        if pipe.closed is not None:
            try:
                pipe.closed()
            except Exception:
                log.exception("output.closed_failed", fd=fd)

    def close(self) -> None:
        """Close every pipe still held and the epoll (idempotent)."""
        for fd in list(self._pipes):
            self._drop(fd)
        self._epoll.close()
