"""`GangAgent`: one unit run as k ranks on k agents (multi-node tensor parallel).

A unit whose GPUs are spread over k bundles (``STRICT_SPREAD``) runs
rank 0 on bundle 0 and ranks 1…k-1 on the others. The engine sees one
process: the gang implements the `Agent` contract and returns rank 0's
`Spawned`.

* Rank 0 keeps the unit's own name, so its output, log probes, ``tail``
  and the journal are the unit's; rank k > 0 is named ``<unit>-r<k>``.
* Each rank is told where it stands, in its environment (``DYNSUP_RANK``,
  ``DYNSUP_RANKS``, ``DYNSUP_RANK0_ADDR``) and through the placeholders
  ``{rank}``, ``{ranks}`` and ``{rank0_addr}`` in the unit's command.
* Ranks live and die together: ``wait_exit`` returns when any rank exits,
  after stopping the others, so the engine's restart restarts the set.
  A rank > 0 that exits first is reported as a failure naming the rank,
  whatever its exit code: a gang missing a rank does not serve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import anyio

from ..agent_api import (
    Agent,
    AgentError,
    ChunkBatch,
    ExitStatus,
    LogRead,
    NotRunning,
    Spawned,
    SpawnRequest,
)

RANK_VAR = "DYNSUP_RANK"
RANKS_VAR = "DYNSUP_RANKS"
RANK0_ADDR_VAR = "DYNSUP_RANK0_ADDR"


@dataclass(frozen=True)
class Rank:
    agent: Agent  # the agent of the rank's node
    env: Mapping[str, str]  # what its bundle adds (CUDA_VISIBLE_DEVICES, ...)
    address: str  # its node's IP


def rank_name(unit: str, rank: int) -> str:
    return unit if rank == 0 else f"{unit}-r{rank}"


class GangAgent:
    """The ranks of one unit, started, watched and stopped as one."""

    def __init__(
        self,
        unit: str,
        ranks: Sequence[Rank],
        *,
        stop_signal: str = "SIGTERM",
        stop_timeout: float = 10.0,
    ) -> None:
        if not ranks:
            raise ValueError("a gang needs at least one rank")
        self.unit = unit
        self.ranks = tuple(ranks)
        # What stopping the others after an exit uses; spawn sets the unit's own.
        self._stop_signal = stop_signal
        self._stop_timeout = stop_timeout

    @property
    def rank0_addr(self) -> str:
        return self.ranks[0].address

    def rank_env(self, rank: int) -> dict[str, str]:
        return {
            **self.ranks[rank].env,
            RANK_VAR: str(rank),
            RANKS_VAR: str(len(self.ranks)),
            RANK0_ADDR_VAR: self.rank0_addr,
        }

    def rank_argv(self, argv: Sequence[str], rank: int) -> list[str]:
        # str.replace, not str.format: other braces (JSON arguments) stay as written.
        values = {"{rank}": str(rank), "{ranks}": str(len(self.ranks))}
        values["{rank0_addr}"] = self.rank0_addr
        out = []
        for arg in argv:
            for placeholder, value in values.items():
                arg = arg.replace(placeholder, value)
            out.append(arg)
        return out

    def rank_request(self, request: SpawnRequest, rank: int) -> SpawnRequest:
        """What rank's agent is asked to run for the unit's request (`dynsupd --check`
        prints the same)."""
        argv = self.rank_argv(request.argv, rank)
        if rank > 0:
            argv += request.rank_args
        return replace(
            request,
            name=rank_name(request.name, rank),
            argv=tuple(argv),
            env={**request.env, **self.rank_env(rank)},
        )

    # -- the Agent contract --------------------------------------------------

    async def spawn(self, request: SpawnRequest) -> Spawned:
        name = request.name
        self._check(name)
        self._stop_signal, self._stop_timeout = request.stop_signal, request.stop_timeout
        started: dict[int, Spawned] = {}
        try:
            # Rank 0 last: its output is the unit's, and the engine subscribes
            # to it when this returns; an agent holds output back only while
            # its own spawn is in flight. Ranks > 0 wait for rank 0 anyway
            # (torch.distributed's rendezvous at rank0_addr retries).
            for k in [*range(1, len(self.ranks)), 0]:
                started[k] = await self.ranks[k].agent.spawn(self.rank_request(request, k))
        except BaseException:
            # A half-started gang never serves: nothing of it may run on.
            with anyio.CancelScope(shield=True):
                await self._stop_ranks(sorted(started))
            raise
        return started[0]

    async def wait_leader_exit(self, name: str) -> ExitStatus:
        """The first rank whose leader exits ends the gang: its status, at once."""
        self._check(name)
        return self._gang_status(*await self._first_rank("wait_leader_exit"))

    async def wait_exit(self, name: str) -> ExitStatus:
        self._check(name)
        k, outcome = await self._first_rank("wait_exit")
        with anyio.CancelScope(shield=True):
            await self._stop_ranks(range(len(self.ranks)))
        return self._gang_status(k, outcome)

    async def _first_rank(self, method: str) -> tuple[int, ExitStatus | AgentError]:
        """Call method (a wait) on every rank's agent; the first rank to answer, and how."""
        first: list[tuple[int, ExitStatus | AgentError]] = []
        async with anyio.create_task_group() as tg:

            async def watch(k: int) -> None:
                outcome: ExitStatus | AgentError
                try:
                    outcome = await getattr(self.ranks[k].agent, method)(rank_name(self.unit, k))
                except AgentError as exc:
                    outcome = exc
                first.append((k, outcome))
                tg.cancel_scope.cancel()

            for k in range(len(self.ranks)):
                tg.start_soon(watch, k)
        return first[0]

    def _gang_status(self, k: int, outcome: ExitStatus | AgentError) -> ExitStatus:
        if isinstance(outcome, AgentError):
            raise outcome
        if k == 0:
            return outcome
        failed = f"rank {k} ({rank_name(self.unit, k)}) {outcome.describe()}"
        return ExitStatus(code=None, signal=None, error=failed)

    async def stop(self, name: str, stop_signal: str, timeout: float) -> ExitStatus | None:
        self._check(name)
        self._stop_signal, self._stop_timeout = stop_signal, timeout
        return await self._stop_ranks(range(len(self.ranks)))

    async def send_signal(self, name: str, sig: str) -> None:
        self._check(name)
        async with anyio.create_task_group() as tg:
            for k in range(1, len(self.ranks)):
                tg.start_soon(self._signal_rank, k, sig)
            await self.ranks[0].agent.send_signal(name, sig)

    async def read_log(self, name: str, stream: str, offset: int, limit: int) -> LogRead:
        return await self.ranks[0].agent.read_log(name, stream, offset, limit)

    async def tail_log(self, name: str, stream: str, lines: int) -> LogRead:
        return await self.ranks[0].agent.tail_log(name, stream, lines)

    async def next_chunks(
        self, cursor: int, timeout: float, names: Collection[str] | None = None
    ) -> ChunkBatch:
        return await self.ranks[0].agent.next_chunks(cursor, timeout, names)

    async def running(self) -> list[Spawned]:
        """The gang's ranks that run now, rank 0 first."""
        names = [rank_name(self.unit, k) for k in range(len(self.ranks))]
        found: dict[str, Spawned] = {}
        for k, rank in enumerate(self.ranks):
            try:
                hosted = await rank.agent.running()
            except AgentError:
                continue
            found.update({s.name: s for s in hosted if s.name == names[k]})
        return [found[n] for n in names if n in found]

    # -- internals -----------------------------------------------------------

    def _check(self, name: str) -> None:
        if name != self.unit:
            raise NotRunning(f"{name!r} is not the unit of this gang ({self.unit!r})")

    async def _stop_ranks(self, ranks: Iterable[int]) -> ExitStatus | None:
        """Stop the given ranks > 0 together, then rank 0 if given; returns rank 0's status."""
        ranks = set(ranks)
        async with anyio.create_task_group() as tg:
            for k in ranks - {0}:
                tg.start_soon(self._stop_rank, k)
        return await self._stop_rank(0) if 0 in ranks else None

    async def _stop_rank(self, k: int) -> ExitStatus | None:
        try:
            return await self.ranks[k].agent.stop(
                rank_name(self.unit, k), self._stop_signal, self._stop_timeout
            )
        except AgentError:
            return None  # never started, or its agent died and took it along

    async def _signal_rank(self, k: int, sig: str) -> None:
        # Rank 0's answer is the gang's.
        with contextlib.suppress(AgentError):
            await self.ranks[k].agent.send_signal(rank_name(self.unit, k), sig)
