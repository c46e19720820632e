"""GPUs through Ray: layouts, the cluster connection, placement groups.

* ``layout`` (pure): the bundle layout of one replica, the over-commit
  check of a unit set, group names.
* ``ray_cluster``: start an embedded Ray or join one (``open_ray`` from
  async code); list its nodes.
* ``groups``: reserve a detached named group per replica, read its GPU
  ids with a probe task, find it again after a daemon restart, release it.
* ``head``: the embedded Ray head as its own process tree, recorded in the
  state directory, so that it outlives a crashed daemon.
* ``actor`` / ``remote``: the agent as a detached actor per node, and the
  `Agent` proxy the engine talks to (Ray failures become ``AgentLost``).
* ``ray_env``: what Ray adds to its workers' environment, kept from units.
* ``gcs``: every call that needs Ray's GCS, with a deadline (`RayUnavailable`).
* ``relocating``: a unit's agent that follows its placement group when Ray
  places it again (its node died) or the cluster is new (head restarted).
* ``gang``: one unit's ranks over several nodes, living and dying together.
* ``placer``: the engine's `Placer` on Ray (reservations, GPU ids, the GPU table).
* ``runtime``: the daemon's entry point: connect, place, adopt, pump output;
  restart the embedded head when it dies and rejoin it.

Nothing here imports Ray at module level; importing this package is cheap.

Errors, all under ``PlacementError``:

* ``LayoutError``: one replica's GPUs fit no node and no even split.
* ``OverCommitError``: a unit set asks for more than the cluster holds
  (``.asked`` per unit, ``.capacity`` per node).
* ``RayConnectError``: Ray could not be started or joined.
* ``ReservationTimeout``: a group was not placed in time (and was removed).
* ``GroupExists``: the group name is taken in this namespace.
* ``GroupLost``: the group was removed while in use.
* ``RayUnavailable``: a GCS call got no answer in time (the GCS is down).
"""

from .groups import (
    BundleGpus,
    GroupExists,
    GroupInfo,
    GroupLost,
    Reservation,
    ReservationTimeout,
    find,
    gpu_ids,
    list_groups,
    release,
    reserve,
    wait_ready,
)
from .layout import (
    GpuRequest,
    Layout,
    LayoutError,
    OverCommitError,
    PlacementError,
    Strategy,
    check_fits,
    group_name,
    group_prefix,
    parse_group_name,
    plan_layout,
)
from .ray_cluster import NodeInfo, RayConnectError, RayHandle, connect, namespace_for, open_ray

__all__ = [
    "BundleGpus",
    "GpuRequest",
    "GroupExists",
    "GroupInfo",
    "GroupLost",
    "Layout",
    "LayoutError",
    "NodeInfo",
    "OverCommitError",
    "PlacementError",
    "RayConnectError",
    "RayHandle",
    "Reservation",
    "ReservationTimeout",
    "Strategy",
    "check_fits",
    "connect",
    "find",
    "gpu_ids",
    "group_name",
    "group_prefix",
    "list_groups",
    "namespace_for",
    "open_ray",
    "parse_group_name",
    "plan_layout",
    "release",
    "reserve",
    "wait_ready",
]
