"""The agent's contract: what the engine may ask of the host of its processes.

An agent hosts many process groups on one node. The same class runs inside
the daemon or as a detached Ray actor, so every method is async and takes
and returns plain data (str, int, float, bytes, lists, dicts and the frozen
dataclasses below, which pickle). A process is addressed by its instance
name (a unit, or a unit's replica/rank such as ``llama-0-r1``).
"""

from __future__ import annotations

import socket
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class AgentError(Exception):
    """Root of the errors an agent raises."""


class SpawnError(AgentError):
    """The program could not be started (missing binary, bad cwd, ...)."""


class PortBusy(SpawnError):
    """A port the program needs is in use on its node: a failed start, retried by policy."""


class StopFailed(AgentError):
    """SIGKILL did not end every process of a group in time (uninterruptible sleep, say).

    ``pids`` are the processes still there; the unit must stay STOPPING with a
    loud error rather than be restarted next to them.
    """

    def __init__(self, message: str, pids: list[int] | None = None) -> None:
        super().__init__(message)
        self.pids = pids or []


class NotRunning(AgentError):
    """No process of that name is hosted here."""


@dataclass(frozen=True)
class SpawnRequest:
    """Everything an agent needs to start one process group (plain data: it pickles)."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # over the node's environment
    cwd: str | None = None
    # Also applied to what the leader leaves behind when it exits by itself.
    stop_signal: str = "SIGTERM"
    stop_timeout: float = 10.0
    unset_env: tuple[str, ...] = ()  # inherited names to drop ("DYN_*" drops a prefix)
    ports: tuple[int, ...] = ()  # checked free on the node before the spawn
    tag: str = ""  # the engine's fingerprint of the spec, to adopt after a daemon restart
    # A unit spread over several nodes runs one rank per node: ranks > 0 get
    # these arguments too (vLLM's --headless).
    rank_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spawned:
    name: str
    pid: int
    pgid: int
    start_time: float  # the kernel's start time (psutil create_time), to tell a reused pid
    node: str
    token: str  # DYNSUP_TOKEN in the child's environment: finds escapees
    tag: str = ""  # the engine's fingerprint of the spec, to adopt after a daemon restart


@dataclass(frozen=True)
class ExitStatus:
    code: int | None  # exit code, or None when killed by a signal
    signal: str | None  # "SIGKILL", ...
    error: str | None = None  # never ran: why (a port in use, say)

    def describe(self) -> str:
        if self.error is not None:
            return self.error
        if self.signal is not None:
            return f"terminated by {self.signal}"
        return f"exit status {self.code}"

    def is_success(self, success_codes: tuple[int, ...]) -> bool:
        return self.error is None and self.signal is None and self.code in success_codes


@dataclass(frozen=True)
class LogChunk:
    """Bytes one process wrote to one stream, at a byte offset of that stream's log."""

    seq: int  # agent-wide sequence number, for pumps that resume
    name: str
    stream: str  # "stdout" | "stderr"
    pid: int
    offset: int  # byte offset of data[0] in the (name, stream) log
    data: bytes
    time: float  # wall clock when read


@dataclass(frozen=True)
class ChunkBatch:
    chunks: list[LogChunk]
    cursor: int  # pass back to get what follows
    lost: int  # chunks dropped since the cursor because the pump was too slow


@dataclass(frozen=True)
class LogRead:
    start: int  # offset of data[0]; > the asked offset when older bytes were dropped
    data: bytes
    end: int  # offset after data; ask again from here


class Agent(Protocol):
    async def spawn(self, request: SpawnRequest) -> Spawned:
        """Start a process group with the node's environment, minus unset_env, plus env.

        Raises PortBusy when one of the request's ports is taken, SpawnError
        when the program cannot be started.
        """
        ...

    async def wait_leader_exit(self, name: str) -> ExitStatus:
        """Wait until the leader exits and return its status; the rest of its group
        may still be going away (``wait_exit`` waits for that too)."""
        ...

    async def wait_exit(self, name: str) -> ExitStatus:
        """Wait until the process exits, its group is emptied, and return its status."""
        ...

    async def stop(self, name: str, stop_signal: str, timeout: float) -> ExitStatus | None:
        """Signal the group, wait until it is empty up to timeout, then SIGKILL everything.

        Raises StopFailed when processes outlive SIGKILL by a few seconds.
        """
        ...

    async def send_signal(self, name: str, sig: str) -> None: ...

    async def read_log(self, name: str, stream: str, offset: int, limit: int) -> LogRead: ...

    async def tail_log(self, name: str, stream: str, lines: int) -> LogRead:
        """The last `lines` lines of a stream (at most what the ring holds)."""
        ...

    async def next_chunks(
        self, cursor: int, timeout: float, names: Collection[str] | None = None
    ) -> ChunkBatch:
        """Long-poll: the chunks after cursor, waiting up to timeout for one.

        ``names``: only these processes' chunks (None: everyone's); the
        cursor returned is past the others' too. ``lost`` then counts
        dropped chunks only when some of theirs were among them.
        """
        ...

    async def running(self) -> list[Spawned]:
        """Every process hosted here now (adoption after a daemon restart)."""
        ...


@runtime_checkable
class ServesFollowers(Protocol):
    """An agent on the daemon's own host, which can write a `tail -f` straight to
    the client's socket from its rings (the daemon relays for the others)."""

    @property
    def serves_followers(self) -> bool:
        """Whether `follow` may be called (an older agent process cannot)."""
        ...

    async def follow(
        self,
        client: socket.socket,
        request_id: int | str | None,
        name: str,
        positions: dict[str, int],
        tagged: bool,
        raw: bool = False,
    ) -> bool:
        """Write ``name``'s output past ``positions`` to ``client`` as tail events until
        the client leaves (returns False) or the call is cancelled. ``tagged``
        events name their stream; ``raw`` ones carry the bytes after the line."""
        ...
