"""`RemoteAgent`: the `Agent` contract spoken to a node's agent actor.

The engine uses a `RemoteAgent` exactly as it uses the in-process agent.
Every call is one actor method call whose ObjectRef is awaited (on
asyncio directly, cancellable, no thread); the long waits are long-polls
on the actor (``wait_exit`` returns when the process exits, ``next_chunks``
when output arrives or after its timeout), so nothing here spins.

Ray failures are translated at this boundary: a dead or unreachable actor
becomes `AgentLost` (an `AgentError`: the engine reads it from
``wait_leader_exit`` as a failed run, "agent lost: …", and restarts by
policy). A `RemoteAgent` stands for a *node*, not for one actor: after a
loss, the next ``spawn`` makes a new actor on the node (the engine's
restart), and ``next_chunks`` waits for that instead of failing, so a
pump loop needs no special case. Its cursors carry the actor's
generation, so a pump that crosses a replacement starts the new actor's
log from its beginning.

Ordering: with the in-process agent, a spawn returns to its caller before
any pump can read the child's output, so the engine subscribes a log probe
right after the spawn and misses no line. Here the spawn's reply and the
first output travel separately; ``next_chunks`` therefore holds a batch
back while a spawn on the same agent is in flight, and hands it over only
once that spawn has returned to its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Collection
from typing import Any

import anyio
import anyio.to_thread

from ..agent_api import (
    AgentError,
    ChunkBatch,
    ExitStatus,
    LogRead,
    Spawned,
    SpawnError,
    SpawnRequest,
)
from .actor import ACTOR_PREFIX, MAX_CONCURRENCY, actor_class, actor_name
from .gcs import RayUnavailable, gcs_call
from .ray_cluster import cluster_nodes, raylet_died

_GEN_SHIFT = 40  # cursor = generation << 40 | the actor's own cursor
_UNAVAILABLE_RETRIES = 3  # ActorUnavailableError is transient by Ray's definition
_START_TIMEOUT = 120.0  # a new actor: a worker process to start on a loaded node


class AgentLost(AgentError):
    """The node's agent actor died or cannot be reached; its processes are gone."""


class RemoteAgent:
    """The agent actor of one node in one namespace, found or made on demand."""

    def __init__(self, node_id: str, namespace: str, handle: Any = None) -> None:
        self.node_id = node_id
        self.namespace = namespace
        self._handle = handle
        self._generation = 1 if handle is not None else 0
        self._replaced = anyio.Event()
        self._lock = anyio.Lock()
        self._spawning = 0
        self._spawn_done = anyio.Event()
        # Set when the cluster is gone (``AgentPool.cut``): calls fail at once,
        # and those in flight are cancelled (their replies will never come).
        self._gone: str | None = None
        self._in_flight: set[anyio.CancelScope] = set()

    def __repr__(self) -> str:
        return f"RemoteAgent(node={self.node_id[:12]}, namespace={self.namespace!r})"

    @property
    def generation(self) -> int:
        """Bumped each time a new actor is found or made for the node."""
        return self._generation

    # -- the actor ------------------------------------------------------------

    async def ensure(self) -> Any:
        """The node's live actor, made when there is none (idempotent, race-free)."""
        if self._gone is not None:
            raise AgentLost(self._gone)
        async with self._lock:
            if self._handle is None:
                try:
                    handle = await gcs_call(
                        functools.partial(_get_or_create, self.node_id, self.namespace),
                        f"making the agent of node {self.node_id}",
                    )
                except RayUnavailable as exc:
                    raise AgentLost(str(exc)) from None
                try:
                    # Constructed and serving; bounded, as its creation needs the GCS.
                    with anyio.fail_after(_START_TIMEOUT):
                        await self._await(handle.info.remote())
                except TimeoutError:
                    raise AgentLost(
                        f"Ray unavailable: no agent started on node {self.node_id} "
                        f"within {_START_TIMEOUT:g} s"
                    ) from None
                except _lost_errors() as exc:
                    raise AgentLost(
                        f"no agent could start on node {self.node_id}: {_first_line(exc)}"
                    ) from None
                self._adopt(handle)
            return self._handle

    async def lookup(self) -> Any | None:
        """The node's live actor if there is one; never makes one."""
        if self._gone is not None:
            raise AgentLost(self._gone)
        async with self._lock:
            if self._handle is None:
                try:
                    handle = await gcs_call(
                        functools.partial(_get_actor, actor_name(self.node_id), self.namespace),
                        f"looking up the agent of node {self.node_id}",
                    )
                except RayUnavailable as exc:
                    raise AgentLost(str(exc)) from None
                if handle is not None:
                    self._adopt(handle)
            return self._handle

    def _adopt(self, handle: Any) -> None:
        self._handle = handle
        self._generation += 1
        replaced, self._replaced = self._replaced, anyio.Event()
        replaced.set()

    def _forget(self, handle: Any) -> None:
        if self._handle is handle:
            self._handle = None

    async def info(self) -> dict[str, Any]:
        return await self._call("info")

    async def shutdown(self) -> None:
        """Stop what the actor hosts, then kill it (it is detached: nobody else will)."""
        handle = await self.lookup()
        if handle is None:
            return
        try:
            await _resolve(handle.shutdown.remote())
        except _lost_errors():
            pass
        import ray

        try:
            await gcs_call(
                functools.partial(ray.kill, handle, no_restart=True),
                f"killing the agent of node {self.node_id}",
            )
        except RayUnavailable as exc:
            raise AgentLost(str(exc)) from None
        self._forget(handle)

    # -- the Agent contract --------------------------------------------------

    async def spawn(self, request: SpawnRequest) -> Spawned:
        self._spawning += 1
        try:
            return await self._spawn(request)
        finally:
            # Synchronous with the return: a held-back pump runs only once the
            # caller yields, after it has subscribed to the new process.
            self._spawning -= 1
            done, self._spawn_done = self._spawn_done, anyio.Event()
            done.set()

    async def _spawn(self, request: SpawnRequest) -> Spawned:
        name = request.name
        # Once more on a fresh actor: the engine restarting a unit whose
        # agent died is exactly this case.
        for attempt in range(2):
            try:
                return await self._call("spawn", request, create=True)
            except AgentLost as exc:
                if attempt == 1:
                    raise SpawnError(f"{name}: {exc}") from exc
            except AgentError as exc:
                if isinstance(exc, SpawnError):
                    raise
                raise SpawnError(f"{name}: {exc}") from exc
        raise AssertionError("unreachable")

    async def wait_leader_exit(self, name: str) -> ExitStatus:
        return await self._call("wait_leader_exit", name)

    async def wait_exit(self, name: str) -> ExitStatus:
        return await self._call("wait_exit", name)

    async def stop(self, name: str, stop_signal: str, timeout: float) -> ExitStatus | None:
        return await self._call("stop", name, stop_signal, timeout)

    async def send_signal(self, name: str, sig: str) -> None:
        await self._call("send_signal", name, sig)

    async def read_log(self, name: str, stream: str, offset: int, limit: int) -> LogRead:
        return await self._call("read_log", name, stream, offset, limit)

    async def tail_log(self, name: str, stream: str, lines: int) -> LogRead:
        return await self._call("tail_log", name, stream, lines)

    async def next_chunks(
        self, cursor: int, timeout: float, names: Collection[str] | None = None
    ) -> ChunkBatch:
        """Chunks after cursor; across a lost agent, waits (up to timeout) for its successor.

        ``names`` is passed on to the actor only when given: None asks for
        everything, as the daemon's Ray pump does.
        """
        generation, inner = cursor >> _GEN_SHIFT, cursor & ((1 << _GEN_SHIFT) - 1)
        replaced = self._replaced
        try:
            handle = await self.lookup()
            if handle is not None:
                if generation != self._generation:
                    inner = 0  # another actor's cursor: this one's log from its start
                generation = self._generation
                # The long-poll itself is the actor's: it answers by timeout.
                extra = () if names is None else (frozenset(names),)
                batch: ChunkBatch = await self._call_on(
                    handle, "next_chunks", inner, timeout, *extra
                )
                while self._spawning:
                    await self._spawn_done.wait()
                return ChunkBatch(
                    chunks=batch.chunks,
                    cursor=(generation << _GEN_SHIFT) | batch.cursor,
                    lost=batch.lost,
                )
        except AgentLost:
            pass
        with anyio.move_on_after(timeout):
            await replaced.wait()
        return ChunkBatch(chunks=[], cursor=cursor, lost=0)

    async def cursor_now(self) -> int:
        """A cursor past everything already printed: a pump that must not replay."""
        info = await self.info()
        return (self._generation << _GEN_SHIFT) | int(info["last_seq"])

    async def running(self) -> list[Spawned]:
        return await self._call("running")

    # -- calls -----------------------------------------------------------------

    def cut(self, reason: str) -> None:
        """The cluster is gone: fail every call, those in flight included, with reason."""
        self._gone = reason
        self._handle = None  # the old cluster's: submitting to it raises
        for scope in self._in_flight:
            scope.cancel()

    async def _await(self, ref: Any) -> Any:
        if self._gone is not None:
            raise AgentLost(self._gone)
        with anyio.CancelScope() as scope:
            self._in_flight.add(scope)
            try:
                return await _resolve(ref)
            finally:
                self._in_flight.discard(scope)
        raise AgentLost(self._gone or "cancelled")

    async def _call(self, method: str, *args: Any, create: bool = False) -> Any:
        handle = await (self.ensure() if create else self.lookup())
        if handle is None:
            raise AgentLost(f"no agent on node {self.node_id} in {self.namespace!r}")
        return await self._call_on(handle, method, *args)

    async def _call_on(self, handle: Any, method: str, *args: Any) -> Any:
        import ray.exceptions

        for attempt in range(_UNAVAILABLE_RETRIES + 1):
            try:
                result = await self._await(getattr(handle, method).remote(*args))
            except ray.exceptions.ActorUnavailableError as exc:
                if attempt == _UNAVAILABLE_RETRIES:
                    self._forget(handle)
                    raise AgentLost(f"agent on node {self.node_id} unreachable: {exc}") from None
                await anyio.sleep(0.5 * (attempt + 1))
            except ray.exceptions.RayTaskError as exc:  # a bug in the actor, not a lost one
                raise AgentError(f"agent on node {self.node_id}: {_first_line(exc)}") from None
            except _lost_errors() as exc:
                self._forget(handle)
                raise AgentLost(await self._why_lost(exc)) from None
            else:
                if isinstance(result, AgentError):
                    raise result
                return result
        raise AssertionError("unreachable")

    async def _why_lost(self, exc: BaseException) -> str:
        """The node's death when that is what took the actor, else Ray's word."""
        with contextlib.suppress(RayUnavailable):
            nodes = await gcs_call(cluster_nodes, "reading the cluster's nodes")
            for node in nodes:
                if node.node_id == self.node_id and not node.alive:
                    return raylet_died(node.node_id, node.address)
        return f"agent on node {self.node_id} lost: {_first_line(exc)}"


def get_or_create_agent(node_id: str, namespace: str) -> RemoteAgent:
    """The `RemoteAgent` of node_id; the actor is found or made on its first use."""
    return RemoteAgent(node_id, namespace)


async def agents_of(namespace: str) -> list[RemoteAgent]:
    """The live agent actors of namespace, one per node, as found by name."""
    found = await gcs_call(
        functools.partial(_agents_of, namespace), f"listing the agents of {namespace!r}"
    )
    # Made here, not in the thread: a RemoteAgent's events belong to the loop.
    return [
        RemoteAgent(node_id, namespace, handle)
        for node_id, handle in sorted(found, key=lambda f: f[0])
    ]


def _agents_of(namespace: str) -> list[tuple[str, Any]]:
    import ray.util

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] == namespace and name.startswith(ACTOR_PREFIX):
            handle = _get_actor(name, namespace)
            if handle is not None:
                found.append((name[len(ACTOR_PREFIX) :], handle))
    return found


def _get_actor(name: str, namespace: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:  # Ray's "no such actor"
        return None


def _get_or_create(node_id: str, namespace: str) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    if node_id not in alive:
        # Hard affinity to a dead node would leave the actor pending forever.
        raise AgentLost(f"node {node_id} is not alive")
    return (
        actor_class()
        .options(
            name=actor_name(node_id),
            namespace=namespace,
            get_if_exists=True,  # atomic: two units making the node's agent get one
            lifetime="detached",
            num_cpus=0,
            max_concurrency=MAX_CONCURRENCY,
            max_restarts=0,  # a restarted actor would have lost its processes anyway
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        .remote(node_id, namespace)
    )


def _lost_errors() -> tuple[type[BaseException], ...]:
    # Any Ray failure but a task's own exception: the actor died (RayActorError),
    # its node did, or the GCS cannot be reached. Either way the engine must
    # treat the agent's processes as gone, never crash on a Ray type.
    import ray.exceptions

    return (ray.exceptions.RayError,)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _resolve(ref: Any) -> Any:
    """An ObjectRef's value: awaited on asyncio, ``ray.get`` in a thread elsewhere (trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        import ray

        # An actor call (a long-poll, maybe): as long as it takes.
        return await anyio.to_thread.run_sync(
            functools.partial(ray.get, ref), abandon_on_cancel=True
        )
    return await ref


class AgentPool:
    """One `RemoteAgent` per node of a namespace, shared by every unit placed there.

    Sharing matters: when an actor dies, the first spawn that makes its
    successor updates the one `RemoteAgent` every unit and pump of the node
    holds. Creating an entry makes no actor; the first spawn does.
    """

    def __init__(self, namespace: str, local_node_id: str) -> None:
        self.namespace = namespace
        self.local_node_id = local_node_id
        self._agents: dict[str, RemoteAgent] = {}
        self._added = anyio.Event()

    @property
    def local(self) -> RemoteAgent:
        """The agent of the daemon's own node (units without GPUs run there)."""
        return self.get(self.local_node_id)

    def get(self, node_id: str) -> RemoteAgent:
        agent = self._agents.get(node_id)
        if agent is None:
            agent = self._agents[node_id] = RemoteAgent(node_id, self.namespace)
            added, self._added = self._added, anyio.Event()
            added.set()
        return agent

    def add(self, agent: RemoteAgent) -> RemoteAgent:
        """Keep an agent found by ``agents_of``; an entry already there wins."""
        if agent.node_id not in self._agents:
            self._agents[agent.node_id] = agent
            added, self._added = self._added, anyio.Event()
            added.set()
        return self._agents[agent.node_id]

    def all(self) -> list[RemoteAgent]:
        return list(self._agents.values())

    def cut(self, reason: str) -> None:
        """The cluster is gone: every agent's calls fail with reason, those in flight too."""
        for agent in self._agents.values():
            agent.cut(reason)

    def reset(self, local_node_id: str) -> None:
        """A new cluster (the embedded head restarted): every agent is to be made anew."""
        self.local_node_id = local_node_id
        self._agents.clear()
        self.get(local_node_id)  # announces the change to whoever waits in wait_added

    async def wait_added(self) -> None:
        """Until the next node's agent joins the pool."""
        await self._added.wait()
