"""`RelocatingAgent`: a GPU unit's agent, which follows its group when a node dies.

A unit's placement group outlives the node it was placed on: when a
raylet dies, Ray places the group's bundles again, on a node that has the
GPUs free (the node back, or a replacement). The unit's processes died
with the node (its agent's warden saw to that), and the engine restarts
the unit by its policy, on the placement it already has. This agent makes
that restart land where the group is now: before each spawn it asks
``locate`` (the placer) where the unit's bundles are and spawns there,
with that place's environment (the bundle's ``CUDA_VISIBLE_DEVICES``).
Every other call goes to the agent of the last spawn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace

from ..agent_api import Agent, ChunkBatch, ExitStatus, LogRead, Spawned, SpawnRequest
from ..engine.placement import Placement

# Where the unit's bundles are now; raises SpawnError when they cannot be placed again.
Locate = Callable[[], Awaitable[Placement]]


class RelocatingAgent:
    def __init__(self, locate: Locate, placement: Placement) -> None:
        self._locate = locate
        self._current = placement

    @property
    def current(self) -> Agent:
        """The agent (a node's, or a gang) the unit was last spawned on."""
        return self._current.agent

    async def spawn(self, request: SpawnRequest) -> Spawned:
        self._current = await self._locate()
        request = replace(request, env={**request.env, **self._current.env})
        return await self._current.agent.spawn(request)

    async def wait_leader_exit(self, name: str) -> ExitStatus:
        return await self.current.wait_leader_exit(name)

    async def wait_exit(self, name: str) -> ExitStatus:
        return await self.current.wait_exit(name)

    async def stop(self, name: str, stop_signal: str, timeout: float) -> ExitStatus | None:
        return await self.current.stop(name, stop_signal, timeout)

    async def send_signal(self, name: str, sig: str) -> None:
        await self.current.send_signal(name, sig)

    async def read_log(self, name: str, stream: str, offset: int, limit: int) -> LogRead:
        return await self.current.read_log(name, stream, offset, limit)

    async def tail_log(self, name: str, stream: str, lines: int) -> LogRead:
        return await self.current.tail_log(name, stream, lines)

    async def next_chunks(
        self, cursor: int, timeout: float, names: Collection[str] | None = None
    ) -> ChunkBatch:
        return await self.current.next_chunks(cursor, timeout, names)

    async def running(self) -> list[Spawned]:
        return await self.current.running()


def unwrap(agent: Agent) -> Agent:
    """The agent a `RelocatingAgent` currently speaks to; any other agent itself."""
    return agent.current if isinstance(agent, RelocatingAgent) else agent
