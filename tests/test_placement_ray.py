"""Placement groups against a real Ray: an embedded one with 8 logical GPUs, and a
three-raylet cluster on this machine.

Every test runs on asyncio (ObjectRefs awaited directly) and on trio
(``ray.get`` in a worker thread), both in real time.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from dynsup.placement import (
    GroupExists,
    GroupLost,
    Layout,
    OverCommitError,
    RayConnectError,
    RayHandle,
    ReservationTimeout,
    Strategy,
    check_fits,
    connect,
    find,
    gpu_ids,
    group_name,
    list_groups,
    plan_layout,
    release,
    reserve,
)
from dynsup.placement.layout import GpuRequest
from tests.ray_fixtures import (
    EMBEDDED_GPUS,
    WORKER_GPUS,
    LocalCluster,
    ray_embedded,
    ray_instance,
    ray_multinode,
    run_driver,
    run_python,
)

__all__ = ["ray_embedded", "ray_instance", "ray_multinode"]  # fixtures, used by name

pytestmark = [pytest.mark.ray, pytest.mark.anyio]

TWO = Layout(Strategy.STRICT_PACK, gpus_per_bundle=2, bundle_count=1)
ALL = Layout(Strategy.STRICT_PACK, gpus_per_bundle=EMBEDDED_GPUS, bundle_count=1)
PLACED = 30.0  # generous: placing a group takes ~0.2 s here


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def _states(prefix: str) -> dict[str, list[str]]:
    from ray.util.placement_group import placement_group_table

    states: dict[str, list[str]] = {}
    for info in placement_group_table().values():
        if info["name"].startswith(prefix):
            states.setdefault(info["name"], []).append(info["state"])
    return states


def test_the_embedded_node_declares_its_logical_gpus(ray_embedded: RayHandle) -> None:
    (node,) = ray_embedded.nodes()
    assert node.alive and node.gpus_total == EMBEDDED_GPUS
    assert ray_embedded.embedded
    assert plan_layout(EMBEDDED_GPUS, [(node.node_id, node.gpus_total)]) == ALL
    with pytest.raises(OverCommitError, match=f"= 10 GPUs; .*node {node.node_id}: 8$"):
        check_fits([GpuRequest("llama", 5, 2)], [(node.node_id, node.gpus_total)])


def test_a_second_connection_is_refused(ray_embedded: RayHandle) -> None:
    with pytest.raises(RayConnectError, match="already connected"):
        connect("", num_gpus=1, namespace="other")


async def test_four_groups_get_disjoint_gpus_and_a_fifth_is_refused_cleanly(
    ray_instance: str,
) -> None:
    names = [group_name(ray_instance, "llama", r) for r in range(5)]
    reservations = [await reserve(name, TWO, PLACED) for name in names[:4]]
    try:
        probes = [await gpu_ids(r) for r in reservations]
        ids = [set(bundle.gpu_ids) for (bundle,) in probes]
        assert all(len(s) == 2 for s in ids)
        assert set().union(*ids) == {str(i) for i in range(EMBEDDED_GPUS)}

        refused = pytest.raises(ReservationTimeout, match=r"llama/4.*free now: 0 of 8 GPUs")
        with anyio.fail_after(PLACED), refused:
            await reserve(names[4], TWO, timeout=0.5)
        assert _states(names[4]) == {names[4]: ["REMOVED"]}  # not left pending
        assert await find(names[4]) is None
        listed = await list_groups(ray_instance)
        assert [(g.name, g.state) for g in listed] == [(n, "CREATED") for n in names[:4]]
    finally:
        for reservation in reservations:
            await release(reservation)


async def test_probing_again_gives_the_same_gpus(ray_instance: str) -> None:
    first = await reserve(group_name(ray_instance, "a", 0), TWO, PLACED)
    second = await reserve(group_name(ray_instance, "b", 0), TWO, PLACED)
    try:
        seen = {r.name: [await gpu_ids(r) for _ in range(3)] for r in (first, second)}
        for probes in seen.values():
            assert probes[0] == probes[1] == probes[2]
        # A daemon restart finds the group by name and reads the same GPUs.
        found = await find(first.name)
        assert found == first
        assert found is not None and await gpu_ids(found) == seen[first.name][0]
        (bundle,) = seen[first.name][0]
        assert bundle.cuda_visible_devices == ",".join(bundle.gpu_ids)
    finally:
        await release(first)
        await release(second)


async def test_release_frees_the_gpus(ray_instance: str) -> None:
    whole = await reserve(group_name(ray_instance, "whole", 0), ALL, PLACED)
    released_ids = (await gpu_ids(whole))[0].gpu_ids
    await release(whole)
    await release(whole)  # twice is harmless
    assert await find(whole.name) is None
    assert await list_groups(ray_instance) == []

    again = await reserve(group_name(ray_instance, "whole", 1), ALL, PLACED)
    try:
        assert (await gpu_ids(again))[0].gpu_ids == released_ids
    finally:
        await release(again)
    with pytest.raises(GroupLost):
        await gpu_ids(again, timeout=PLACED)


async def test_a_taken_name_is_refused_and_the_group_kept(ray_instance: str) -> None:
    name = group_name(ray_instance, "llama", 0)
    held = await reserve(name, TWO, PLACED)
    try:
        with pytest.raises(GroupExists, match="llama/0"):
            await reserve(name, TWO, PLACED)
        assert await find(name) == held
    finally:
        await release(held)


async def test_a_cancelled_reservation_leaves_no_group(ray_instance: str) -> None:
    name = group_name(ray_instance, "too-big", 0)
    too_big = Layout(Strategy.STRICT_PACK, EMBEDDED_GPUS * 2, 1)
    with anyio.move_on_after(0.5) as scope:
        await reserve(name, too_big, timeout=3600)
    assert scope.cancelled_caught
    assert _states(name) == {name: ["REMOVED"]}


async def test_list_groups_lists_only_its_instance(ray_instance: str) -> None:
    mine = await reserve(group_name(ray_instance, "u", 0), TWO, PLACED)
    other = await reserve(group_name(ray_instance + "-x", "u", 0), TWO, PLACED)
    try:
        listed = await list_groups(ray_instance)
        assert [g.name for g in listed] == [mine.name]
        (info,) = listed
        assert info.group_id == mine.group_id
        assert info.strategy == "STRICT_PACK" and info.bundles == ({"GPU": 2.0},)
        assert info.node_ids[0] is not None
    finally:
        await release(mine)
        await release(other)


OPEN_RAY_DRIVER = """
import anyio, psutil
from dynsup.placement import Layout, Strategy, gpu_ids, open_ray, reserve

async def main():
    with anyio.CancelScope() as scope:
        async with open_ray("", num_gpus=2, num_cpus=1, namespace="dynsup-open") as handle:
            nodes = [(n.gpus_total, n.alive) for n in handle.nodes()]
            group = await reserve("dynsup/open/u/0", Layout(Strategy.STRICT_PACK, 2, 1), 60)
            (bundle,) = await gpu_ids(group)
            # Stopping is cancellation: leaving by cancel must still end Ray.
            scope.cancel()
            await anyio.sleep_forever()
    children = psutil.Process().children(recursive=True)
    left = [p.name() for p in children if p.status() != psutil.STATUS_ZOMBIE]
    report({"nodes": nodes, "ids": list(bundle.gpu_ids), "left": left})

anyio.run(main)
"""


def test_open_ray_serves_async_code_and_ends_ray_when_cancelled() -> None:
    result = run_python(OPEN_RAY_DRIVER)
    assert result["nodes"] == [[2, True]]
    assert sorted(result["ids"]) == ["0", "1"]
    assert result["left"] == []


# The multi-node cluster is driven from subprocesses (see ray_fixtures).

SPREAD_DRIVER = """
import asyncio, time
from dynsup.placement import connect, group_name, gpu_ids, plan_layout, release, reserve

async def main():
    handle = connect(ADDRESS, num_gpus=None, namespace="dynsup-spread")
    deadline = time.monotonic() + 60
    while len([n for n in handle.nodes() if n.alive]) < 3:  # worker raylets registering
        assert time.monotonic() < deadline, handle.nodes()
        await asyncio.sleep(0.1)
    nodes = [(n.node_id, n.gpus_total) for n in handle.nodes() if n.alive and n.gpus_total]
    layout = plan_layout(8, nodes)
    reservation = await reserve(group_name("spread", "llama", 0), layout, 60)
    bundles = await gpu_ids(reservation)
    await release(reservation)
    report({
        "strategy": layout.strategy.value,
        "bundles": layout.bundle_count,
        "gpu_nodes": sorted(node for node, _ in nodes),
        "placed": [[b.node_id, list(b.gpu_ids)] for b in bundles],
    })

asyncio.run(main())
"""


def test_a_spread_group_lands_on_two_nodes(ray_multinode: LocalCluster) -> None:
    result = run_driver(ray_multinode, SPREAD_DRIVER)
    assert result["strategy"] == "STRICT_SPREAD" and result["bundles"] == 2
    placed_nodes = [node for node, _ in result["placed"]]
    assert sorted(placed_nodes) == result["gpu_nodes"]  # one bundle on each GPU node
    expected = [str(i) for i in range(WORKER_GPUS)]
    assert [sorted(ids) for _, ids in result["placed"]] == [expected, expected]


RESTART_DRIVER = """
import asyncio, sys
from dynsup.placement import Layout, Strategy, connect, find, gpu_ids, list_groups
from dynsup.placement import release, reserve

STEP, NAMESPACE = sys.argv[1], sys.argv[2]
NAME = "dynsup/restart/llama/0"

async def main():
    connect("auto", num_gpus=None, namespace=NAMESPACE)  # joins RAY_ADDRESS
    if STEP == "reserve":
        reservation = await reserve(NAME, Layout(Strategy.STRICT_PACK, 4, 1), 60)
    else:
        reservation = await find(NAME)
    probe = None if reservation is None else (await gpu_ids(reservation))[0]
    listed = [(g.name, g.state) for g in await list_groups("restart")]
    if STEP == "release" and reservation is not None:
        await release(reservation)
    report({
        "found": reservation is not None,
        "probe": None if probe is None else [probe.node_id, list(probe.gpu_ids)],
        "listed": listed,
    })

asyncio.run(main())
"""


def test_a_detached_group_outlives_its_driver_in_its_namespace(
    ray_multinode: LocalCluster,
) -> None:
    def drive(step: str, namespace: str) -> Any:
        code = f"import sys; sys.argv[1:] = [{step!r}, {namespace!r}]\n" + RESTART_DRIVER
        return run_driver(ray_multinode, code)

    made = drive("reserve", "dynsup-a")  # exits without releasing: a daemon restart
    assert made["found"] and made["listed"] == [["dynsup/restart/llama/0", "CREATED"]]

    # Another instance's namespace cannot look the name up, though the
    # cluster-wide table still shows the group.
    foreign = drive("find", "dynsup-b")
    assert not foreign["found"]
    assert foreign["listed"] == [["dynsup/restart/llama/0", "CREATED"]]

    again = drive("release", "dynsup-a")
    assert again["found"] and again["probe"] == made["probe"]  # same node, same GPUs

    gone = drive("find", "dynsup-a")
    assert not gone["found"] and gone["listed"] == []
