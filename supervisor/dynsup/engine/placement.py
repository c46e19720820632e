"""Where a unit runs: the agent that hosts it and what that place adds to its environment.

The engine asks a `Placer` before the first spawn of a lifecycle and tells
it when the lifecycle ends. Restarts within one lifecycle keep their
placement (a crashing worker never loses its GPUs to another tenant).
Without Ray, every unit runs on the one in-process agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..agent_api import Agent
from ..units.spec import ServiceSpec


class PlacementFailed(Exception):
    """The unit cannot be placed (no GPUs fit, the reservation timed out, ...)."""


@dataclass(frozen=True)
class Placement:
    agent: Agent
    env: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[str, ...] = ()  # GPU ids, as CUDA_VISIBLE_DEVICES lists them
    node: str | None = None


class Placer(Protocol):
    async def place(self, spec: ServiceSpec) -> Placement:
        """Reserve what the unit needs (idempotent: a known unit gets its reservation back)."""
        ...

    async def release(self, spec: ServiceSpec) -> None:
        """The unit's lifecycle ended: free what it held."""
        ...


class SingleAgent:
    """Every unit on one agent; nothing to reserve."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def place(self, spec: ServiceSpec) -> Placement:
        return Placement(agent=self.agent)

    async def release(self, spec: ServiceSpec) -> None:
        return None
