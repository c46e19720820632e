"""Connect the daemon to Ray: start an embedded local instance or join a cluster.

Ray is imported inside the functions, never at module level, so that the
CLI and a daemon without GPU units never pay for importing it (~0.6 s).

Ray keeps one connection per process (module-global state in ``ray``), so
a ``RayHandle`` is a receipt for that connection, not an independent
client: there is at most one live handle per process.

The calls here block (``connect`` for seconds). An async caller uses
``open_ray``, which runs ``connect`` on a thread of its own that lives as
long as the connection, and never ``anyio.to_thread.run_sync``: Ray starts
gcs_server and raylet with ``PR_SET_PDEATHSIG=SIGKILL``, which Linux fires
when the *thread* that forked them exits, and anyio's worker threads exit
after 10 s idle. The driver then loses its GCS and Ray ends the process
60 s later. Off the main thread, ``ray.init`` also leaves SIGTERM alone
(on it, it installs a handler that calls ``sys.exit``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, MutableMapping
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import anyio
import anyio.to_thread

from .layout import PlacementError


class RayConnectError(PlacementError):
    """Ray could not be started or joined."""


# Ray's core worker ends its process (the daemon, an agent actor) when the
# GCS stays unreachable this long (default 60 s): a GCS outage would take
# down the supervisor and, through the agents, every unit. Ray's config reads
# RAY_<name> from the environment when the process joins. Set, not defaulted:
# no setting may let Ray end the supervisor.
GCS_RECONNECT_VAR = "RAY_gcs_rpc_server_reconnect_timeout_s"
GCS_RECONNECT_S = str(365 * 24 * 3600)


def survive_gcs_outages(env: MutableMapping[str, str]) -> None:
    """Keep a process that joins Ray with ``env`` alive while the GCS is away."""
    env[GCS_RECONNECT_VAR] = GCS_RECONNECT_S


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str  # the node manager's IP
    gpus_total: int
    alive: bool


def cluster_nodes() -> list[NodeInfo]:
    """Every node the cluster knows, dead ones included (``alive`` False).

    One GCS call (milliseconds); async code runs it through ``gcs.gcs_call``.
    """
    import ray

    return [
        NodeInfo(
            node_id=node["NodeID"],
            address=node["NodeManagerAddress"],
            gpus_total=int(node.get("Resources", {}).get("GPU", 0)),
            alive=bool(node["Alive"]),
        )
        for node in ray.nodes()
    ]


def raylet_died(node_id: str, address: str) -> str:
    """How a unit's reason names the death of its node's raylet."""
    return f"raylet on node {address} ({node_id[:12]}) died"


def namespace_for(instance: str) -> str:
    """The Ray namespace of a daemon instance.

    Named placement groups and actors are looked up per namespace, so two
    daemons on one cluster never find (or remove) each other's.
    """
    return f"dynsup-{instance}"


@dataclass(frozen=True)
class RayHandle:
    """This process's connection to Ray."""

    address: str  # the GCS address, "host:port"
    namespace: str
    embedded: bool  # True when this process started the cluster (and ends it)
    # From ``open_ray``: leave this cluster and join the one at an address (a
    # restarted head's); the future resolves to the new handle. Blocks for
    # seconds: Ray takes that long to give up on a dead GCS.
    rejoin: Callable[[str], Future[RayHandle]] | None = field(
        default=None, compare=False, repr=False
    )

    def nodes(self) -> list[NodeInfo]:
        """Every node the cluster knows, dead ones included (``alive`` False)."""
        return cluster_nodes()

    def shutdown(self) -> None:
        """Disconnect; an embedded cluster stops with its gcs, raylet and workers.

        Detached placement groups survive a disconnect from a joined
        cluster, but not the end of an embedded one.
        """
        import ray

        ray.shutdown()


@asynccontextmanager
async def open_ray(
    address: str,
    *,
    num_gpus: int | None,
    namespace: str,
    num_cpus: int | None = None,
) -> AsyncIterator[RayHandle]:
    """``connect`` on a dedicated owner thread; ``shutdown`` on leaving, even when cancelled.

    The handle's ``rejoin`` leaves the cluster and joins another, on the
    same thread: Ray's connection is set up and torn down by one thread only.
    """
    connected: Future[RayHandle] = Future()
    # Rejoin requests, then None to leave.
    requests: queue.SimpleQueue[tuple[str, Future[RayHandle]] | None] = queue.SimpleQueue()

    def rejoin(to: str) -> Future[RayHandle]:
        done: Future[RayHandle] = Future()
        requests.put((to, done))
        return done

    def own() -> None:
        try:
            handle = connect(address, num_gpus=num_gpus, namespace=namespace, num_cpus=num_cpus)
        except BaseException as exc:
            connected.set_exception(exc)
            return
        connected.set_result(replace(handle, rejoin=rejoin))
        # Stay alive while the cluster runs: its processes die with this thread.
        while (request := requests.get()) is not None:
            to, done = request
            try:
                handle.shutdown()
                handle = connect(to, num_gpus=None, namespace=namespace)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(replace(handle, rejoin=rejoin))
        handle.shutdown()

    owner = threading.Thread(target=own, name="dynsup-ray-owner", daemon=True)
    owner.start()
    try:
        # Not abandoned on cancel: a half-started Ray must still be shut down.
        yield await anyio.to_thread.run_sync(connected.result)
    finally:
        requests.put(None)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(owner.join)


def no_auto_connect() -> None:
    """Ray calls made while this process is not connected fail, never start a Ray of their own.

    Ray's API calls ``ray.init()`` when it is not connected: a GCS call
    made while the daemon is between two clusters (a head restart) would
    start a private local Ray in the daemon, which then cannot rejoin.
    Ray reads the setting when it is first imported; set both.
    """
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    import ray._private.auto_init_hook as auto_init

    auto_init.enable_auto_connect = False


def current_node_id() -> str:
    """The node this process's Ray connection runs on."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def connect(
    address: str,
    *,
    num_gpus: int | None,
    namespace: str,
    num_cpus: int | None = None,
) -> RayHandle:
    """Start an embedded Ray (``address=""``) or join one ("auto", "ray://…", "host:port").

    ``num_gpus`` and ``num_cpus`` declare the embedded node's resources
    (logical GPUs work on a machine without any); when joining, the
    cluster's nodes declare their own and both are ignored.

    Call it from a thread that outlives the connection (see the module
    docstring); from async code use ``open_ray``.
    """
    no_auto_connect()
    import ray

    if ray.is_initialized():
        raise RayConnectError("this process is already connected to Ray")
    embedded = address == ""
    options: dict[str, object] = {
        "namespace": namespace,
        # The daemon's journal gets the children's output through the
        # agent; Ray's own forwarding of worker prints would duplicate it.
        "log_to_driver": False,
        # Quiet: Ray warns on every start (token auth on, no SIGTERM handler
        # off the main thread); the daemon reports what matters itself.
        "logging_level": logging.ERROR,
    }
    if embedded:
        # "local", not None: None would join whatever RAY_ADDRESS or the
        # last `ray start` on this machine points to.
        options.update(address="local", num_gpus=num_gpus, num_cpus=num_cpus)
        options["include_dashboard"] = False
        # A supervisor does not phone home; an operator may still opt in.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    else:
        options["address"] = address
    survive_gcs_outages(os.environ)
    # ray.init warns before it applies logging_level.
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        context = ray.init(**options)
    except Exception as exc:  # Ray raises a zoo of types here (grpc, auth, timeouts)
        where = "start an embedded Ray" if embedded else f"join Ray at {address!r}"
        raise RayConnectError(f"could not {where}: {exc}") from exc
    # A Ray Client ("ray://") context has no address_info: keep the given address.
    address_info = getattr(context, "address_info", None) or {}
    gcs_address = str(address_info.get("gcs_address") or address)
    return RayHandle(address=gcs_address, namespace=namespace, embedded=embedded)
