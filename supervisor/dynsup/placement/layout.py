"""Bundle layouts, over-commit checks and group names: pure, no Ray.

A replica that needs ``n`` GPUs gets one placement group. Its layout is
decided from the cluster's node capacities alone:

* ``STRICT_PACK`` with one bundle ``{"GPU": n}`` when some node has ``n``;
* else ``STRICT_SPREAD`` with ``k`` equal bundles of ``n / k`` GPUs over
  the fewest nodes ``k`` that split ``n`` evenly (tensor parallel ranks
  need the same number of GPUs each, so uneven splits are refused).

``check_fits`` runs before anything is spawned, so that asking for more
GPUs than the cluster has fails with a message instead of a placement
group that stays pending forever.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GROUP_PREFIX = "dynsup"


class PlacementError(Exception):
    """Root of the errors of the placement room."""


class LayoutError(PlacementError):
    """No node or even split of nodes can hold one replica's GPUs."""


class OverCommitError(PlacementError):
    """A set of units asks for more GPUs than the cluster can hold.

    ``asked`` maps each unit to its GPUs in all; ``capacity`` maps each
    node to its GPUs, as the message says them.
    """

    def __init__(self, message: str, asked: dict[str, int], capacity: dict[str, int]) -> None:
        super().__init__(message)
        self.asked = asked
        self.capacity = capacity


class Strategy(enum.Enum):
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


@dataclass(frozen=True)
class Layout:
    """``bundle_count`` bundles of ``gpus_per_bundle`` GPUs, placed by ``strategy``."""

    strategy: Strategy
    gpus_per_bundle: int
    bundle_count: int

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_bundle * self.bundle_count

    def bundles(self) -> list[dict[str, float]]:
        """The bundles as Ray's ``placement_group`` takes them."""
        return [{"GPU": float(self.gpus_per_bundle)} for _ in range(self.bundle_count)]


@dataclass(frozen=True)
class GpuRequest:
    """One unit's ask: ``replicas`` placement groups of ``gpus`` GPUs each."""

    unit: str
    replicas: int
    gpus: int


def plan_layout(gpus: int, nodes: Sequence[tuple[str, int]]) -> Layout:
    """The layout of one replica of ``gpus`` GPUs on nodes ``(node_id, gpus_total)``."""
    if gpus < 1:
        raise ValueError(f"a placement group needs at least one GPU, not {gpus}")
    sizes = [total for _, total in nodes]
    if any(total >= gpus for total in sizes):
        return Layout(Strategy.STRICT_PACK, gpus, 1)
    for k in range(2, gpus + 1):
        if gpus % k == 0 and sum(1 for total in sizes if total >= gpus // k) >= k:
            return Layout(Strategy.STRICT_SPREAD, gpus // k, k)
    raise LayoutError(
        f"{_plural(gpus, 'GPU')} fit no node and split evenly over no set of nodes; "
        f"{_describe_nodes(nodes)}"
    )


def check_fits(requests: Iterable[GpuRequest], nodes: Sequence[tuple[str, int]]) -> None:
    """Raise ``OverCommitError`` unless every replica's group can be placed at once.

    Each replica is laid out with ``plan_layout`` (the layout ``reserve``
    will ask Ray for) and its bundles are packed first-fit decreasing,
    the bundles of one spread group on distinct nodes. First-fit may
    refuse a few sets an exhaustive search would accept; it never
    accepts one Ray cannot place.
    """
    asked = [r for r in requests if r.replicas > 0 and r.gpus > 0]
    asked_gpus = {r.unit: r.replicas * r.gpus for r in asked}
    capacity = {node_id: total for node_id, total in nodes}

    def fail(reason: str) -> OverCommitError:
        return OverCommitError(
            f"{reason}; {_describe_nodes(nodes)}", asked=asked_gpus, capacity=capacity
        )

    total = sum(asked_gpus.values())
    if total > sum(capacity.values()):
        raise fail(_describe_asks(asked))

    layouts: list[tuple[GpuRequest, Layout]] = []
    for request in asked:
        try:
            layout = plan_layout(request.gpus, nodes)
        except LayoutError:
            raise fail(
                f"{_describe_ask(request)}; no node has {request.gpus} and they do not "
                "split evenly over the nodes"
            ) from None
        layouts.extend((request, layout) for _ in range(request.replicas))

    free = [[node_id, total] for node_id, total in nodes]
    layouts.sort(key=lambda item: item[1].gpus_per_bundle, reverse=True)
    for request, layout in layouts:
        hosts = [slot for slot in free if slot[1] >= layout.gpus_per_bundle]
        if len(hosts) < layout.bundle_count:
            raise fail(
                f"{_describe_asks(asked)}; that is no more than the cluster has, but the "
                f"groups of {_plural(layout.total_gpus, 'GPU')} of unit {request.unit!r} "
                f"({layout.strategy.value}, {layout.bundle_count} x "
                f"{layout.gpus_per_bundle}) do not fit what the larger groups leave free"
            )
        for slot in hosts[: layout.bundle_count]:
            slot[1] -= layout.gpus_per_bundle


def group_name(instance: str, unit: str, replica: int) -> str:
    """The placement group name of a unit's replica, unique per daemon instance."""
    for label, part in (("instance", instance), ("unit", unit)):
        if not part or "/" in part:
            raise ValueError(f"{label} name {part!r} must be non-empty and contain no '/'")
    return f"{group_prefix(instance)}{unit}/{replica}"


def group_prefix(instance: str) -> str:
    """The prefix every group name of ``instance`` starts with (ends with '/')."""
    return f"{GROUP_PREFIX}/{instance}/"


def parse_group_name(name: str) -> tuple[str, str, int] | None:
    """``(instance, unit, replica)`` of a name made by ``group_name``, else None."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != GROUP_PREFIX or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3])


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _describe_ask(request: GpuRequest) -> str:
    return (
        f"unit {request.unit!r} asks for {_plural(request.replicas, 'replica')} x "
        f"{_plural(request.gpus, 'GPU')} = {_plural(request.replicas * request.gpus, 'GPU')}"
    )


def _describe_asks(requests: Sequence[GpuRequest]) -> str:
    if len(requests) == 1:
        return _describe_ask(requests[0])
    total = sum(r.replicas * r.gpus for r in requests)
    return f"units ask for {_plural(total, 'GPU')} in all: " + ", ".join(
        _describe_ask(r) for r in requests
    )


def _describe_nodes(nodes: Sequence[tuple[str, int]]) -> str:
    total = sum(gpus for _, gpus in nodes)
    if not nodes:
        return "the cluster has no nodes"
    per_node = ", ".join(f"node {node_id}: {gpus}" for node_id, gpus in nodes)
    return f"the cluster has {_plural(total, 'GPU')}: {per_node}"
