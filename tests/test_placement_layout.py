"""Bundle layouts, over-commit checks and group names (pure, no Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynsup.placement.layout import (
    GpuRequest,
    Layout,
    LayoutError,
    OverCommitError,
    Strategy,
    check_fits,
    group_name,
    group_prefix,
    parse_group_name,
    plan_layout,
)

ONE_BOX = [("abc", 8)]
TWO_BY_FOUR = [("n1", 4), ("n2", 4)]
FOUR_BY_TWO = [("n1", 2), ("n2", 2), ("n3", 2), ("n4", 2)]


def test_packs_on_one_node_when_a_node_has_enough() -> None:
    layout = plan_layout(2, ONE_BOX)
    assert layout == Layout(Strategy.STRICT_PACK, gpus_per_bundle=2, bundle_count=1)
    assert layout.bundles() == [{"GPU": 2.0}]


def test_packs_on_the_one_large_node_of_a_mixed_cluster() -> None:
    assert plan_layout(4, [("small", 2), ("big", 4)]).strategy is Strategy.STRICT_PACK


def test_spreads_8_over_two_nodes_of_4() -> None:
    layout = plan_layout(8, TWO_BY_FOUR)
    assert layout == Layout(Strategy.STRICT_SPREAD, gpus_per_bundle=4, bundle_count=2)
    assert layout.bundles() == [{"GPU": 4.0}, {"GPU": 4.0}]
    assert layout.total_gpus == 8


def test_spreads_8_over_four_nodes_of_2() -> None:
    layout = plan_layout(8, FOUR_BY_TWO)
    assert layout == Layout(Strategy.STRICT_SPREAD, gpus_per_bundle=2, bundle_count=4)


def test_spreads_over_the_fewest_nodes() -> None:
    # Two nodes of 4 would do; the six nodes of 2 are not needed.
    nodes = [("a", 4), ("b", 4), *[(f"s{i}", 2) for i in range(6)]]
    assert plan_layout(8, nodes) == Layout(Strategy.STRICT_SPREAD, 4, 2)


def test_refuses_an_uneven_split() -> None:
    # 6 = 4 + 2 would use every GPU, but ranks need equal shares: 3 + 3
    # needs two nodes of 3, 2 + 2 + 2 three nodes of 2.
    with pytest.raises(LayoutError, match=r"6 GPUs .*node a: 4, node b: 2"):
        plan_layout(6, [("a", 4), ("b", 2)])


def test_splits_6_evenly_over_two_nodes_of_4() -> None:
    assert plan_layout(6, TWO_BY_FOUR) == Layout(Strategy.STRICT_SPREAD, 3, 2)


def test_refuses_more_gpus_than_any_split_of_the_cluster() -> None:
    with pytest.raises(LayoutError):
        plan_layout(16, ONE_BOX)
    with pytest.raises(LayoutError):
        plan_layout(1, [("cpu-only", 0)])


def test_a_replica_needs_at_least_one_gpu() -> None:
    with pytest.raises(ValueError):
        plan_layout(0, ONE_BOX)


def test_fits_when_the_groups_fill_the_cluster_exactly() -> None:
    check_fits([GpuRequest("llama", 4, 2)], ONE_BOX)
    check_fits([GpuRequest("big", 1, 8), GpuRequest("cpu", 3, 0)], TWO_BY_FOUR)
    check_fits([GpuRequest("a", 2, 4), GpuRequest("b", 4, 2)], [("x", 8), ("y", 8)])


def test_over_commit_names_the_ask_and_the_capacity_per_node() -> None:
    with pytest.raises(OverCommitError) as caught:
        check_fits([GpuRequest("llama", 5, 2)], ONE_BOX)
    assert str(caught.value) == (
        "unit 'llama' asks for 5 replicas x 2 GPUs = 10 GPUs; the cluster has 8 GPUs: node abc: 8"
    )
    assert caught.value.asked == {"llama": 10}
    assert caught.value.capacity == {"abc": 8}


def test_over_commit_of_several_units_lists_each() -> None:
    with pytest.raises(OverCommitError) as caught:
        check_fits([GpuRequest("a", 2, 4), GpuRequest("b", 1, 2), GpuRequest("c", 0, 4)], ONE_BOX)
    message = str(caught.value)
    assert message.startswith("units ask for 10 GPUs in all: ")
    assert "unit 'a' asks for 2 replicas x 4 GPUs = 8 GPUs" in message
    assert "unit 'b' asks for 1 replica x 2 GPUs = 2 GPUs" in message
    assert "'c'" not in message  # zero replicas ask for nothing
    assert message.endswith("the cluster has 8 GPUs: node abc: 8")


def test_over_commit_when_the_total_fits_but_the_groups_do_not() -> None:
    # 3 + 3 + 2 = 8 GPUs on 2 x 4, but each group of 3 leaves 1 GPU behind.
    requests = [GpuRequest("a", 1, 3), GpuRequest("b", 1, 3), GpuRequest("c", 1, 2)]
    with pytest.raises(OverCommitError, match=r"unit 'c'.*node n1: 4, node n2: 4"):
        check_fits(requests, TWO_BY_FOUR)


def test_over_commit_when_one_replica_fits_no_layout() -> None:
    with pytest.raises(OverCommitError, match=r"unit 'odd' .*3 GPUs.*no node has 3"):
        check_fits([GpuRequest("odd", 1, 3)], [("x", 2), ("y", 2)])


def test_spread_groups_take_one_bundle_per_node() -> None:
    # Two 8-GPU replicas on four nodes of 4: each takes two distinct nodes.
    nodes = [(f"n{i}", 4) for i in range(4)]
    check_fits([GpuRequest("big", 2, 8)], nodes)
    with pytest.raises(OverCommitError):
        check_fits([GpuRequest("big", 2, 8), GpuRequest("one", 1, 1)], nodes)


def test_group_names_round_trip() -> None:
    name = group_name("prod", "llama-70b", 3)
    assert name == "dynsup/prod/llama-70b/3"
    assert name.startswith(group_prefix("prod"))
    assert not name.startswith(group_prefix("pro"))  # the prefix ends at the '/'
    assert parse_group_name(name) == ("prod", "llama-70b", 3)
    assert parse_group_name("someone-elses-group") is None


@pytest.mark.parametrize(("instance", "unit"), [("", "u"), ("a/b", "u"), ("i", "x/y")])
def test_group_names_refuse_parts_with_slashes(instance: str, unit: str) -> None:
    with pytest.raises(ValueError):
        group_name(instance, unit, 0)


def test_the_package_does_not_import_ray() -> None:
    # The CLI may import dynsup.placement; Ray (0.6 s) must stay unloaded.
    code = "import sys, dynsup.placement; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
