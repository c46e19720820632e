"""The exits of many process-group leaders, watched from one task.

An agent used to keep one task per hosted process just to wait for its
leader's exit (~4 KiB each, most of a sleeping unit's memory in the
daemon). `LeaderWatch` holds every leader's pidfd in one epoll and waits
on the epoll's own descriptor: a pidfd is readable once its process has
exited, and the leader is reaped then (`ProcessGroup.reap_nowait`).
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable

import anyio
import structlog

from .agent_api import ExitStatus
from .process import ProcessGroup

log = structlog.get_logger("dynsup.leaders")

Exited = Callable[[ExitStatus], None]


class LeaderWatch:
    """Calls each leader's ``exited`` with its status once it exited and was reaped."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[ProcessGroup, Exited]] = {}  # by pidfd

    def add(self, group: ProcessGroup, exited: Exited) -> bool:
        """Watch group's leader; False when it has no pidfd (the caller waits itself).

        Sync, so that an exit right after the spawn cannot be missed.
        """
        try:
            pidfd = os.pidfd_open(group.pid)
        except OSError:  # already reaped elsewhere, or a kernel before 5.3
            return False
        try:
            self._epoll.register(pidfd, select.EPOLLIN)
        except OSError:
            os.close(pidfd)
            return False
        self._watched[pidfd] = (group, exited)
        return True

    async def run(self) -> None:
        """Report exits as long as the agent lives; then close every pidfd."""
        try:
            while True:
                ready = self._epoll.poll(0)
                if not ready:
                    await anyio.wait_readable(self._epoll.fileno())
                    continue
                for pidfd, _ in ready:
                    self._reap(pidfd)
                await anyio.sleep(0)  # let the exit handlers run
        finally:
            self.close()

    def _reap(self, pidfd: int) -> None:
        group, exited = self._watched[pidfd]
        status = group.reap_nowait()
        if status is None:
            return  # readable means exited: should not happen, look again next round
        self._drop(pidfd)
        try:
            exited(status)
        except Exception:
            # The other leaders' exits must still be heard.
            log.exception("process.exit_handler_failed", unit=group.name, pid=group.pid)

    def _drop(self, pidfd: int) -> None:
        del self._watched[pidfd]
        with contextlib.suppress(OSError):
            self._epoll.unregister(pidfd)
        os.close(pidfd)

    def close(self) -> None:
        """Close every pidfd still held and the epoll (idempotent)."""
        for pidfd in list(self._watched):
            self._drop(pidfd)
        self._epoll.close()
