"""A pool's replica slots: names kept across scale, moved by a surge."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynsup.dynamo.slots import pool_of, pool_slots, surge_slots
from dynsup.statefile import STATE_FILE, DesiredState


def test_without_saved_slots_a_pool_of_n_has_slots_0_to_n_minus_1() -> None:
    assert pool_slots((), 3) == (0, 1, 2)


def test_scale_keeps_the_first_saved_slots_and_adds_the_lowest_free() -> None:
    assert pool_slots((2, 0), 1) == (2,)
    assert pool_slots((2, 0), 3) == (2, 0, 1)


def test_a_surge_starts_on_the_lowest_free_slot_and_drops_the_last() -> None:
    assert surge_slots((0, 1)) == (2, 0)
    assert surge_slots((2, 0)) == (1, 2)  # the names rotate over n + 1 slots
    assert surge_slots((0,)) == (1,)


@pytest.mark.parametrize(
    ("name", "pool"),
    [
        ("tiny-2", ("tiny", 2)),
        ("tiny-decode-1", ("tiny:decode", 1)),
        ("tiny-prefill-0", ("tiny:prefill", 0)),
        ("tiny-x-1", None),
        ("tinyx-1", None),
    ],
)
def test_pool_of_a_replica_name(name: str, pool: tuple[str, int] | None) -> None:
    assert pool_of(name, "tiny") == pool


def test_slots_survive_the_daemon_in_state_toml(tmp_path: Path) -> None:
    state = DesiredState.load(tmp_path)
    state.set_slots({"tiny": (2, 0), "big:decode": (1,)})
    assert DesiredState.load(tmp_path).slots == {"tiny": (2, 0), "big:decode": (1,)}
    state.set_slots({"tiny": None})
    assert DesiredState.load(tmp_path).slots == {"big:decode": (1,)}


@pytest.mark.parametrize("slots", ["[1, 1]", "[-1]", '"0"', "[true]"])
def test_a_bad_slot_list_is_a_corrupt_state_file(tmp_path: Path, slots: str) -> None:
    (tmp_path / STATE_FILE).write_text(
        f"format = 3\n[slots]\ntiny = {slots}\n# end of dynsup state\n"
    )
    assert DesiredState.load(tmp_path).slots == {}
    assert list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
