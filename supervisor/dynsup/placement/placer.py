"""`RayPlacer`: the engine's `Placer` over Ray placement groups and per-node agents.

* A unit without GPUs runs on the agent of the daemon's own node.
* A unit with ``gpus = n`` gets the group ``group_name(instance, unit, 0)``:
  found when it exists (a restart of the unit, or a daemon restart),
  else reserved with the layout ``plan_layout`` picks. Its GPU ids are read
  by a probe task and become the process's ``CUDA_VISIBLE_DEVICES``.
  One bundle: the unit runs on that bundle's node; k bundles: a
  `GangAgent` runs rank r on bundle r.
* ``release`` removes the group: only the end of a lifecycle frees GPUs,
  so a crashing worker never loses them to another tenant.

Before reserving, the unit and every unit placed or being placed are
checked against the cluster's capacity: an ask that can never fit fails at once
with ``check_fits``'s message instead of waiting out the reservation
timeout. Every failure reaches the engine as `PlacementFailed`. A group
that ends up held by nobody (a failed or cancelled placement: the unit
was stopped meanwhile) is removed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.to_thread
import structlog

from ..agent_api import Agent, SpawnError
from ..engine.placement import Placement, PlacementFailed
from ..units.spec import ServiceSpec
from .gang import GangAgent, Rank
from .gcs import RayUnavailable, gcs_call
from .groups import (
    BundleGpus,
    GroupExists,
    Reservation,
    find,
    gpu_ids,
    group_info,
    release,
    reserve,
    wait_ready,
)
from .layout import GpuRequest, PlacementError, check_fits, group_name, plan_layout
from .ray_cluster import NodeInfo, RayHandle, raylet_died
from .relocating import RelocatingAgent
from .remote import AgentPool, RemoteAgent

log = structlog.get_logger("dynsup.placement")

GPU_ENV = "CUDA_VISIBLE_DEVICES"
# Ray's own workers (a vLLM that starts Ray inside the unit) would otherwise
# reset CUDA_VISIBLE_DEVICES to the GPUs *they* asked Ray for.
NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
_CLEANUP_TIMEOUT = 30.0
_REJOIN_TIMEOUT = 300.0  # a head restart: seconds to let go of the old, seconds to start anew


@dataclass(frozen=True)
class Held:
    """A unit's group and the GPUs of each of its bundles (bundle r = rank r)."""

    unit: str
    reservation: Reservation
    bundles: tuple[BundleGpus, ...]


def bundle_env(bundle: BundleGpus) -> dict[str, str]:
    return {GPU_ENV: bundle.cuda_visible_devices, NOSET_ENV: "1"}


class RayPlacer:
    def __init__(
        self,
        handle: RayHandle,
        instance: str,
        agents: AgentPool,
        *,
        reserve_timeout: float = 60.0,
        probe_timeout: float = 60.0,
    ) -> None:
        self.handle = handle
        self.instance = instance
        self.agents = agents
        self.reserve_timeout = reserve_timeout
        self.probe_timeout = probe_timeout
        self._held: dict[str, Held] = {}
        self._placements: dict[str, Placement] = {}
        self._nodes: list[NodeInfo] = []
        self._reserving: dict[str, int] = {}  # unit -> GPUs, while its group is being made
        # Units whose group could not be removed (Ray unavailable): removed
        # once the GCS answers again, unless the unit is placed again first.
        self._orphans: set[str] = set()
        # Set while joined; unset while the embedded head is being restarted.
        self._joined = anyio.Event()
        self._joined.set()
        # Held units whose group went with a cluster that is gone.
        self._lost: set[str] = set()

    # -- the Placer contract ---------------------------------------------------

    async def place(self, spec: ServiceSpec) -> Placement:
        if spec.gpus <= 0:
            return self._remember_plain(spec.name, self.agents.local_node_id)
        try:
            await self._wait_joined()
            held = await self._reserve(spec.name, spec.gpus)
        except PlacementError as exc:
            raise PlacementFailed(f"{spec.name}: {exc}") from exc
        except TimeoutError:
            raise PlacementFailed(
                f"{spec.name}: the GPU probe of its placement group did not run within "
                f"{self.probe_timeout:g} s; the group was removed"
            ) from None
        except _ray_errors() as exc:
            raise PlacementFailed(f"{spec.name}: Ray: {_first_line(exc)}") from exc
        return self._remember(held)

    async def release(self, spec: ServiceSpec) -> None:
        self._placements.pop(spec.name, None)
        held = self._held.pop(spec.name, None)
        if spec.name in self._lost:
            self._lost.discard(spec.name)
            return  # its group went with the old cluster
        try:
            reservation = held.reservation if held else None
            if reservation is None and spec.gpus > 0:
                reservation = await find(group_name(self.instance, spec.name, 0))
            if reservation is not None:
                await release(reservation)
        except RayUnavailable as exc:
            self._orphans.add(spec.name)
            raise PlacementFailed(
                f"{spec.name}: {exc}; its GPUs are freed once Ray is back"
            ) from exc
        except PlacementError as exc:
            raise PlacementFailed(f"{spec.name}: {exc}") from exc
        except _ray_errors() as exc:
            self._orphans.add(spec.name)
            raise PlacementFailed(f"{spec.name}: Ray: {_first_line(exc)}") from exc

    # -- checks and queries ---------------------------------------------------

    async def refresh_nodes(self) -> list[NodeInfo]:
        """The cluster's nodes now (one GCS call); also what ``gpu_table`` shows."""
        self._nodes = await gcs_call(self.handle.nodes, "reading the cluster's nodes")
        # The GCS answers: a good moment to remove what it could not remove before.
        await self._remove_orphans()
        return self._nodes

    async def check_fits(
        self, specs: Iterable[ServiceSpec], *, besides: Iterable[str] = ()
    ) -> None:
        """Raise `OverCommitError` unless the GPU units of specs fit together.

        Alongside what the other units hold or are being given now (a unit
        of specs that holds GPUs is counted with its new ask only; units in
        ``besides`` are about to free theirs and are not counted). Run it
        before starting anything: its message names what each unit asks for
        and what each node has.
        """
        specs = list(specs)
        names = {spec.name for spec in specs} | set(besides)
        others = [ask for ask in self._asks(besides="") if ask.unit not in names]
        check_fits([*others, *_requests(specs)], _gpu_nodes(await self.refresh_nodes()))

    def agent_of(self, name: str) -> Agent:
        """The agent a unit was placed on (the local one when unknown)."""
        placement = self._placements.get(name)
        return placement.agent if placement is not None else self.agents.local

    def gpus_of(self, name: str) -> list[str]:
        held = self._held.get(name)
        return [] if held is None else list(held.bundles[0].gpu_ids)

    def held(self) -> dict[str, Held]:
        return dict(self._held)

    def gpu_table(self) -> list[dict[str, Any]]:
        """Per node (as last refreshed), each GPU and the unit/replica/rank holding it.

        Only this daemon's holdings are known: a GPU another tenant holds
        shows as free here (Ray would still refuse to place on it).
        """
        rows: list[dict[str, Any]] = []
        for node in self._nodes:
            if not node.alive or node.gpus_total <= 0:
                continue
            holders: dict[str, tuple[str, int]] = {}
            for held in self._held.values():
                for rank, bundle in enumerate(held.bundles):
                    if bundle.node_id == node.node_id:
                        holders.update({gpu: (held.unit, rank) for gpu in bundle.gpu_ids})
            ids = [str(i) for i in range(node.gpus_total)]
            ids += sorted(set(holders) - set(ids))  # ids Ray reports as UUIDs
            for gpu in ids:
                unit, rank = holders.get(gpu, (None, None))
                rows.append(
                    {
                        "node": node.address,
                        "node_id": node.node_id,
                        "gpu": gpu,
                        "unit": unit,
                        "replica": None if unit is None else 0,
                        "rank": rank,
                    }
                )
        return rows

    # -- adoption ---------------------------------------------------------------

    async def attach(self, unit: str) -> Placement | None:
        """The placement of a unit whose group exists (a daemon restart), or None."""
        reservation = await find(group_name(self.instance, unit, 0))
        if reservation is None:
            return None
        bundles = await gpu_ids(reservation, self.probe_timeout)
        return self._remember(Held(unit, reservation, tuple(bundles)))

    def attach_plain(self, unit: str, agent: RemoteAgent) -> Placement:
        """The placement of an adopted unit without GPUs, on the agent hosting it."""
        return self._remember_plain(unit, agent.node_id)

    # -- a new cluster (the embedded head restarted) -----------------------------

    def left(self) -> None:
        """The cluster is gone: placements and spawns wait for ``rejoined``."""
        if self._joined.is_set():
            self._joined = anyio.Event()
        self._lost |= set(self._held)
        self._orphans.clear()  # their groups went with it
        self._nodes = []

    def rejoined(self, handle: RayHandle) -> None:
        """Joined a new cluster: units lost with the old one reserve their GPUs again."""
        self.handle = handle
        self._joined.set()

    def placement_of(self, unit: str) -> Placement | None:
        return self._placements.get(unit)

    def forget(self, unit: str) -> None:
        self._placements.pop(unit, None)
        self._held.pop(unit, None)

    # -- internals ---------------------------------------------------------------

    async def _reserve(self, unit: str, gpus: int) -> Held:
        name = group_name(self.instance, unit, 0)
        reservation: Reservation | None = None
        self._orphans.discard(unit)  # its group, if any, is found and reused below
        try:
            nodes = _gpu_nodes(await self.refresh_nodes())
            layout = plan_layout(gpus, nodes)
            # Checked against what is held and what is being reserved now, with
            # no await between the check and the entry: units placed at the same
            # time (a daemon's start, one `update`) are checked together, so one
            # of them fails at once instead of waiting out the reserve timeout.
            asks = [*self._asks(besides=unit), GpuRequest(unit, 1, gpus)]
            check_fits(asks, nodes)
            self._reserving[unit] = gpus
            reservation = await find(name)
            if reservation is not None and reservation.layout.total_gpus != gpus:
                await release(reservation)  # made for another size of the unit
                reservation = None
            if reservation is None:
                try:
                    reservation = await reserve(name, layout, self.reserve_timeout)
                except GroupExists:
                    reservation = await find(name)  # made concurrently by another call
                    if reservation is None:
                        raise
            await wait_ready(reservation, self.reserve_timeout)
            bundles = await gpu_ids(reservation, self.probe_timeout)
        except BaseException:
            # Nobody holds the group now: not placed, it would grab GPUs
            # whenever they free up; placed, it would keep them from everyone.
            # Cancellation (the unit stopped while being placed) included.
            with anyio.CancelScope(shield=True):
                if not await self._remove_group(name, reservation):
                    self._orphans.add(unit)
            raise
        finally:
            self._reserving.pop(unit, None)
        return Held(unit, reservation, tuple(bundles))

    def _asks(self, *, besides: str) -> list[GpuRequest]:
        """What every other unit holds or is being given now."""
        asks = [
            GpuRequest(h.unit, 1, h.reservation.layout.total_gpus)
            for name, h in self._held.items()
            if name != besides
        ]
        asks += [
            GpuRequest(name, 1, gpus) for name, gpus in self._reserving.items() if name != besides
        ]
        return asks

    async def _remove_group(self, name: str, reservation: Reservation | None) -> bool:
        """Whether the group is gone now; a failure is logged, never raised."""
        # Bounded: with the GCS gone this would block for as long as Ray retries.
        with anyio.move_on_after(_CLEANUP_TIMEOUT):
            try:
                if reservation is None:
                    reservation = await find(name)
                if reservation is not None:
                    await release(reservation)
                return True
            except (PlacementError, *_ray_errors()) as exc:
                log.warning("placement.remove_failed", group=name, error=_first_line(exc))
        return False

    async def _remove_orphans(self) -> None:
        for unit in sorted(self._orphans):
            if unit in self._held or unit in self._reserving:
                self._orphans.discard(unit)  # placed again: the group is its own now
            elif await self._remove_group(group_name(self.instance, unit, 0), None):
                self._orphans.discard(unit)
                log.info("placement.orphan_removed", unit=unit)

    async def locate(self, unit: str) -> Placement:
        """Where the unit's bundles are now; when Ray moved them (their node died), the new place.

        One GCS call while nothing moved. A group being placed again is
        waited for (``reserve_timeout``), then its GPU ids are read anew;
        a group lost with its cluster (the embedded head restarted) is
        reserved again. Raises `SpawnError` (the unit cannot start) naming
        the dead node when the group is not placed again in time.
        """
        try:
            await self._wait_joined()
        except RayUnavailable as exc:
            raise SpawnError(f"{unit}: {exc}") from None
        held = self._held[unit]
        if unit in self._lost:
            return await self._reserve_again(held)
        try:
            info = await group_info(held.reservation)
        except RayUnavailable as exc:
            # No news from the GCS: where it was (its node's agent will tell).
            log.warning("placement.locate_failed", unit=unit, error=str(exc))
            return self._placement(held)
        if info.state == "CREATED" and info.node_ids == tuple(b.node_id for b in held.bundles):
            return self._placement(held)
        why = await self._why_moved(held)
        log.warning("placement.moving", unit=unit, reason=why, group_state=info.state)
        try:
            await wait_ready(held.reservation, self.reserve_timeout)
            bundles = await gpu_ids(held.reservation, self.probe_timeout)
        except (PlacementError, TimeoutError, *_ray_errors()) as exc:
            detail = _first_line(exc)
            raise SpawnError(f"{unit}: {why}; its GPUs were not placed again: {detail}") from None
        moved = self._held[unit] = Held(unit, held.reservation, tuple(bundles))
        log.info("placement.moved", unit=unit, nodes=[b.node_id for b in bundles])
        with contextlib.suppress(RayUnavailable):
            await self.refresh_nodes()  # the GPU table shows the new node
        return self._placement(moved)

    async def _reserve_again(self, held: Held) -> Placement:
        try:
            again = await self._reserve(held.unit, held.reservation.layout.total_gpus)
        except (PlacementError, TimeoutError, *_ray_errors()) as exc:
            raise SpawnError(
                f"{held.unit}: Ray was restarted and its GPUs could not be reserved again: "
                f"{_first_line(exc)}"
            ) from None
        self._lost.discard(held.unit)
        self._held[held.unit] = again
        log.info("placement.reserved_again", unit=held.unit, gpus=list(again.bundles[0].gpu_ids))
        return self._placement(again)

    def _remember_plain(self, unit: str, node_id: str) -> Placement:
        first = Placement(agent=self.agents.get(node_id))
        agent = RelocatingAgent(functools.partial(self._locate_plain, node_id), first)
        placement = self._placements[unit] = Placement(agent=agent)
        return placement

    async def _locate_plain(self, node_id: str) -> Placement:
        """A unit without GPUs runs on its node while that lives, else on the daemon's."""
        try:
            await self._wait_joined()
        except RayUnavailable as exc:
            raise SpawnError(str(exc)) from None
        if node_id != self.agents.local_node_id:
            with contextlib.suppress(RayUnavailable):
                nodes = await self.refresh_nodes()
                if not any(n.node_id == node_id and n.alive for n in nodes):
                    node_id = self.agents.local_node_id
        return Placement(agent=self.agents.get(node_id))

    async def _wait_joined(self) -> None:
        joined = self._joined
        with anyio.move_on_after(_REJOIN_TIMEOUT):
            await joined.wait()
            return
        raise RayUnavailable(f"Ray unavailable: its head was not back within {_REJOIN_TIMEOUT:g} s")

    async def _why_moved(self, held: Held) -> str:
        try:
            nodes = {n.node_id: n for n in await self.refresh_nodes()}
        except RayUnavailable:
            nodes = {}
        dead = [
            raylet_died(b.node_id, b.node_ip)
            for b in held.bundles
            if b.node_id in nodes and not nodes[b.node_id].alive
        ]
        return ", ".join(dead) or "its placement group is being placed again"

    def _remember(self, held: Held) -> Placement:
        self._held[held.unit] = held
        placement = self._placement(held)
        # Restarts follow the group wherever Ray places it again.
        agent = RelocatingAgent(functools.partial(self.locate, held.unit), placement)
        placement = self._placements[held.unit] = replace(placement, agent=agent)
        return placement

    def _placement(self, held: Held) -> Placement:
        bundles = held.bundles
        if len(bundles) == 1:
            (bundle,) = bundles
            return Placement(
                agent=self.agents.get(bundle.node_id),
                env=bundle_env(bundle),
                gpus=bundle.gpu_ids,
                node=bundle.node_ip,
            )
        ranks = [Rank(self.agents.get(b.node_id), bundle_env(b), b.node_ip) for b in bundles]
        # Each rank's CUDA_VISIBLE_DEVICES is its own bundle's: the gang adds it.
        return Placement(
            agent=GangAgent(held.unit, ranks),
            gpus=bundles[0].gpu_ids,
            node=bundles[0].node_ip,
        )


def _requests(specs: Iterable[ServiceSpec]) -> list[GpuRequest]:
    return [GpuRequest(spec.name, 1, spec.gpus) for spec in specs if spec.gpus > 0]


def _gpu_nodes(nodes: list[NodeInfo]) -> list[tuple[str, int]]:
    return [(n.node_id, n.gpus_total) for n in nodes if n.alive and n.gpus_total > 0]


def _ray_errors() -> tuple[type[BaseException], ...]:
    # Ray's failures when the GCS is unreachable; anything else is a bug.
    import ray.exceptions

    return (ray.exceptions.RayError, ConnectionError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
