"""Placement groups: one per replica, reserved, probed for GPU ids, found again, released.

Groups are named (``layout.group_name``) and detached: they outlive the
driver that made them, so a daemon that restarts against the same cluster
finds them with ``find`` and its workers keep their GPUs. Names are looked
up per Ray namespace; ``placement_group_table`` lists every namespace's
groups, so ``list_groups`` filters on the instance's name prefix.

Every call that talks to the GCS blocks, so it runs in a worker thread,
with a deadline (``gcs.gcs_call``: `RayUnavailable` once it passes); an
ObjectRef is awaited directly on asyncio (cancellable, no thread) and
through ``ray.get`` in a thread on other backends.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from .gcs import gcs_call
from .layout import Layout, PlacementError, Strategy, group_prefix


class ReservationTimeout(PlacementError):
    """The group's bundles were not all placed in time; the group was removed."""


class GroupExists(PlacementError):
    """A group of that name already exists in this namespace: ``find`` it instead."""


class GroupLost(PlacementError):
    """The group was removed (by another caller or a sweep) while it was in use."""


@dataclass(frozen=True)
class Reservation:
    """A named placement group of this namespace, ready or (after ``find``) maybe not."""

    name: str
    group_id: str  # hex
    layout: Layout
    group: Any = field(compare=False, repr=False)  # ray.util.placement_group.PlacementGroup


@dataclass(frozen=True)
class BundleGpus:
    """What a probe task scheduled into one bundle saw."""

    bundle_index: int
    node_id: str
    node_ip: str
    # As Ray reports them: indices, or the entries of the raylet's own
    # CUDA_VISIBLE_DEVICES (which may be UUIDs). Either way they are what
    # CUDA_VISIBLE_DEVICES of the worker process takes.
    gpu_ids: tuple[str, ...]

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.gpu_ids)


@dataclass(frozen=True)
class GroupInfo:
    name: str
    group_id: str
    state: str  # Ray's: "PENDING", "CREATED", "RESCHEDULING", "REMOVED"
    strategy: str
    bundles: tuple[dict[str, float], ...]
    node_ids: tuple[str | None, ...]  # per bundle; None while not placed


async def reserve(name: str, layout: Layout, timeout: float) -> Reservation:
    """Create the detached group ``name`` and wait until every bundle is placed.

    Raises ``ReservationTimeout`` after ``timeout`` seconds and ``GroupExists``
    when the name is taken. On any failure or cancellation the group is
    removed again: a reservation is never left pending to grab GPUs later.
    """
    # Shielded: a group created after its caller was cancelled would be
    # nobody's, pending forever. Bounded all the same (a dead GCS): the
    # caller then removes the name, should the GCS make it later.
    with anyio.CancelScope(shield=True):
        reservation = await gcs_call(
            functools.partial(_create, name, layout), f"creating placement group {name!r}"
        )
    try:
        await wait_ready(reservation, timeout)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await release(reservation)
        raise
    return reservation


async def wait_ready(reservation: Reservation, timeout: float) -> None:
    """Wait until every bundle of the group is placed (a found group may be pending)."""
    import ray.exceptions

    try:
        await _resolve_all([reservation.group.ready()], timeout)
    except TimeoutError:
        free = await gcs_call(_free_gpus, "reading free GPUs")
        raise ReservationTimeout(
            f"placement group {reservation.name!r} ({_describe(reservation.layout)}) was not "
            f"placed within {timeout:g} s; free now: {free}"
        ) from None
    except ray.exceptions.TaskPlacementGroupRemoved:
        raise GroupLost(f"placement group {reservation.name!r} was removed") from None


async def gpu_ids(reservation: Reservation, timeout: float = 60.0) -> list[BundleGpus]:
    """The GPUs of each bundle, read by a probe task scheduled into it.

    The probe claims the bundle's GPUs while it runs, so it waits when
    something else (a Ray task or actor) holds them. The ids of a bundle
    stay the same for the group's life: Ray binds GPU instances to a
    bundle when it is placed.
    """
    import ray
    import ray.exceptions
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # A probe sent to a removed group stays pending instead of failing.
    if await gcs_call(functools.partial(_is_removed, reservation), _state_of(reservation)):
        raise GroupLost(f"placement group {reservation.name!r} was removed")
    probe = _probe_task()
    refs = [
        probe.options(
            num_cpus=0,
            num_gpus=reservation.layout.gpus_per_bundle,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                reservation.group, placement_group_bundle_index=index
            ),
        ).remote()
        for index in range(reservation.layout.bundle_count)
    ]
    lost = GroupLost(f"placement group {reservation.name!r} was removed")
    try:
        results = await _resolve_all(refs, timeout)
    except BaseException as exc:
        # A probe left queued would take the bundle's GPUs whenever it ran.
        for ref in refs:
            ray.cancel(ref)
        removed_errors = (
            ray.exceptions.TaskPlacementGroupRemoved,
            ray.exceptions.TaskUnschedulableError,
        )
        if isinstance(exc, removed_errors):
            raise lost from None
        if isinstance(exc, TimeoutError) and await gcs_call(
            functools.partial(_is_removed, reservation), _state_of(reservation)
        ):
            raise lost from None
        raise
    return [
        BundleGpus(index, node_id, node_ip, tuple(str(gpu) for gpu in ids))
        for index, (ids, node_id, node_ip) in enumerate(results)
    ]


async def find(name: str) -> Reservation | None:
    """The group ``name`` of this namespace, or None (never made, or removed)."""
    return await gcs_call(functools.partial(_find, name), f"looking up placement group {name!r}")


async def release(reservation: Reservation) -> None:
    """Remove the group; its GPUs are free again. Removing twice is harmless."""
    from ray.util.placement_group import remove_placement_group

    await gcs_call(
        functools.partial(remove_placement_group, reservation.group),
        f"removing placement group {reservation.name!r}",
    )


async def group_info(reservation: Reservation) -> GroupInfo:
    """The group's state now and the node of each bundle (None while not placed)."""
    return await gcs_call(functools.partial(_info_of, reservation), _state_of(reservation))


async def list_groups(instance: str, *, include_removed: bool = False) -> list[GroupInfo]:
    """The groups named for ``instance`` (see ``layout.group_name``), by name."""
    return await gcs_call(
        functools.partial(_list_groups, group_prefix(instance), include_removed),
        "listing placement groups",
    )


def _create(name: str, layout: Layout) -> Reservation:
    from ray.exceptions import RaySystemError
    from ray.util.placement_group import placement_group

    try:
        group = placement_group(
            layout.bundles(), strategy=layout.strategy.value, name=name, lifetime="detached"
        )
    except RaySystemError as exc:
        # The GCS refuses duplicate names per namespace; Ray has no
        # dedicated exception type for it.
        if "already exists" in str(exc):
            raise GroupExists(f"placement group {name!r} already exists") from None
        raise
    return Reservation(name=name, group_id=group.id.hex(), layout=layout, group=group)


def _find(name: str) -> Reservation | None:
    from ray.util.placement_group import get_placement_group, placement_group_table

    try:
        group = get_placement_group(name)
    except ValueError:  # Ray's way of saying "no such name in this namespace"
        return None
    info = placement_group_table(group)
    if info["state"] == "REMOVED":
        return None
    layout = _layout_of(info)
    if layout is None:
        raise PlacementError(f"placement group {name!r} has bundles dynsup does not make")
    return Reservation(name=name, group_id=group.id.hex(), layout=layout, group=group)


def _is_removed(reservation: Reservation) -> bool:
    from ray.util.placement_group import placement_group_table

    return placement_group_table(reservation.group)["state"] == "REMOVED"


def _layout_of(info: dict[str, Any]) -> Layout | None:
    bundles = list(info["bundles"].values())
    gpus = {bundle.get("GPU", 0.0) for bundle in bundles}
    if len(gpus) != 1 or set().union(*bundles) != {"GPU"}:
        return None
    (per_bundle,) = gpus
    return Layout(Strategy(info["strategy"]), int(per_bundle), len(bundles))


def _group_info(group_id: str, info: dict[str, Any]) -> GroupInfo:
    order = sorted(info["bundles"], key=int)
    return GroupInfo(
        name=info["name"],
        group_id=group_id,
        state=info["state"],
        strategy=info["strategy"],
        bundles=tuple(dict(info["bundles"][i]) for i in order),
        node_ids=tuple(info["bundles_to_node_id"].get(i) for i in order),
    )


def _info_of(reservation: Reservation) -> GroupInfo:
    from ray.util.placement_group import placement_group_table

    return _group_info(reservation.group_id, placement_group_table(reservation.group))


def _list_groups(prefix: str, include_removed: bool) -> list[GroupInfo]:
    from ray.util.placement_group import placement_group_table

    groups = [
        _group_info(group_id, info)
        for group_id, info in placement_group_table().items()
        if info["name"].startswith(prefix)
    ]
    groups = [g for g in groups if include_removed or g.state != "REMOVED"]
    return sorted(groups, key=lambda g: (g.name, g.group_id))


def _free_gpus() -> str:
    import ray

    free = ray.available_resources().get("GPU", 0.0)
    total = ray.cluster_resources().get("GPU", 0.0)
    return f"{free:g} of {total:g} GPUs"


def _describe(layout: Layout) -> str:
    return f"{layout.strategy.value}, {layout.bundle_count} x {layout.gpus_per_bundle} GPUs"


@functools.cache
def _probe_task() -> Any:
    import ray

    # Nested on purpose: cloudpickle sends a function it cannot import by
    # name by value, so worker nodes need no copy of dynsup.
    def probe_bundle() -> tuple[list[Any], str, str]:
        import ray

        return (
            ray.get_gpu_ids(),
            ray.get_runtime_context().get_node_id(),
            ray.util.get_node_ip_address(),
        )

    return ray.remote(probe_bundle)


def _state_of(reservation: Reservation) -> str:
    return f"reading the state of placement group {reservation.name!r}"


async def _resolve_all(refs: list[Any], timeout: float) -> list[Any]:
    """The values of ObjectRefs, or TimeoutError after ``timeout`` seconds in all."""
    if _on_asyncio():
        with anyio.fail_after(timeout):
            awaitables: list[Awaitable[Any]] = refs
            return [await ref for ref in awaitables]
    import ray

    # ray.get raises GetTimeoutError, a TimeoutError: bounded by itself.
    return await anyio.to_thread.run_sync(
        functools.partial(ray.get, refs, timeout=timeout), abandon_on_cancel=True
    )


def _on_asyncio() -> bool:
    # ObjectRefs are awaitable only on an asyncio loop (not trio).
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
