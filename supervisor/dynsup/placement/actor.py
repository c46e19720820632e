"""The per-node agent as a detached Ray actor: a `LocalAgent` hosted on the actor's loop.

One actor per node and daemon instance, named ``dynsup-agent-<node_id>`` in
the instance's namespace, pinned to its node (hard node affinity) and
taking no CPU (``num_cpus=0``), so that reserving GPUs never competes with
it. It is detached: it outlives the daemon that made it, and so do the
processes it hosts; a restarted daemon finds it by name and adopts them.

The `LocalAgent` lives in one asyncio task of the actor's event loop for
the actor's whole life (an anyio task group must be left by the task that
entered it, so it cannot be entered by whichever method call comes first).
Methods mirror the `Agent` contract and return plain data; an `AgentError`
is returned as a value, not raised, so the caller re-raises it with its own
class and message instead of Ray's wrapped traceback.

Processes outliving a dead actor: an actor killed with SIGKILL runs no
clean-up, and its children (session leaders) would be re-parented away.
Its children carry its mark and a `Warden` kills them when it dies (see
dynsup/warden.py); as a backstop, a new agent on the node first kills what
earlier incarnations of the same namespace and node left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from dataclasses import replace
from typing import Any

from ..agent import LocalAgent
from ..agent_api import AgentError, SpawnRequest
from ..warden import MARK_VAR, Warden, kill_marked
from .ray_env import raylet_env, unit_env_fix

ACTOR_PREFIX = "dynsup-agent-"
# Long-polls (wait_exit per unit, next_chunks per pump) each hold a slot.
MAX_CONCURRENCY = 1000


def actor_name(node_id: str) -> str:
    return f"{ACTOR_PREFIX}{node_id}"


class AgentActor:
    """Hosts a `LocalAgent` for the actor's lifetime. Use through ``actor_class()``."""

    def __init__(self, node_id: str, namespace: str, log_capacity: int = 1 << 20) -> None:
        self._node_id = node_id
        self._log_capacity = log_capacity
        prefix = f"{namespace}/{node_id}/"
        self._mark = f"{prefix}{uuid.uuid4().hex[:12]}"
        kill_marked(lambda mark: mark.startswith(prefix) and mark != self._mark)
        # Read before the mark is set: the mark is the agent's, not Ray's.
        self._unset, self._restore = unit_env_fix(os.environ, raylet_env(os.environ))
        # Children inherit os.environ (LocalAgent's inherited_env); the
        # actor's own /proc/<pid>/environ keeps its initial contents, so the
        # warden never finds the actor itself.
        os.environ[MARK_VAR] = self._mark
        self._warden = Warden(self._mark)
        self._agent: LocalAgent | None = None
        self._started: asyncio.Future[LocalAgent] | None = None
        self._closing = asyncio.Event()
        self._host: asyncio.Task[None] | None = None

    async def _ensure(self) -> LocalAgent:
        if self._started is None:
            loop = asyncio.get_running_loop()
            self._started = loop.create_future()
            self._host = loop.create_task(self._run_agent(self._started))
        return await asyncio.shield(self._started)

    async def _run_agent(self, started: asyncio.Future[LocalAgent]) -> None:
        try:
            async with LocalAgent(log_capacity=self._log_capacity, warden=self._warden) as agent:
                started.set_result(agent)
                await self._closing.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    # -- the Agent contract, errors returned as values -----------------------

    async def spawn(self, request: SpawnRequest) -> Any:
        agent = await self._ensure()
        # Units get the node's environment, not this Ray worker's; their own
        # `environment` still wins.
        request = replace(
            request,
            unset_env=(*request.unset_env, *self._unset),
            env={**self._restore, **request.env},
        )
        try:
            return await agent.spawn(request)
        except AgentError as exc:
            return exc

    async def wait_leader_exit(self, name: str) -> Any:
        return await self._call("wait_leader_exit", name)

    async def wait_exit(self, name: str) -> Any:
        return await self._call("wait_exit", name)

    async def stop(self, name: str, stop_signal: str, timeout: float) -> Any:
        return await self._call("stop", name, stop_signal, timeout)

    async def send_signal(self, name: str, sig: str) -> Any:
        return await self._call("send_signal", name, sig)

    async def read_log(self, name: str, stream: str, offset: int, limit: int) -> Any:
        return await self._call("read_log", name, stream, offset, limit)

    async def tail_log(self, name: str, stream: str, lines: int) -> Any:
        return await self._call("tail_log", name, stream, lines)

    async def next_chunks(
        self, cursor: int, timeout: float, names: frozenset[str] | None = None
    ) -> Any:
        return await self._call("next_chunks", cursor, timeout, names)

    async def running(self) -> Any:
        return await self._call("running")

    # -- beyond the contract -------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """Who and where this agent is (also: the first call starts the LocalAgent)."""
        import ray

        agent = await self._ensure()
        return {
            "node_id": self._node_id,
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "mark": self._mark,
            "subreaper": agent.subreaper,
            "warden_pid": self._warden.pid,
            "last_seq": agent.logs.last_seq,
        }

    async def shutdown(self) -> None:
        """Stop every hosted process, then the warden; the caller then kills the actor."""
        if self._started is not None:
            self._closing.set()
            assert self._host is not None
            with contextlib.suppress(Exception):
                await self._host
        await asyncio.to_thread(self._warden.release)

    async def _call(self, method: str, *args: Any) -> Any:
        agent = await self._ensure()
        try:
            return await getattr(agent, method)(*args)
        except AgentError as exc:
            return exc


def actor_class() -> Any:
    """``AgentActor`` as a Ray actor class (Ray imported on first use)."""
    import ray

    global _remote_class
    if _remote_class is None:
        _remote_class = ray.remote(AgentActor)
    return _remote_class


_remote_class: Any = None
