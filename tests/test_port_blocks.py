"""A model's port block is kept: a new model whose hash collides never moves it.

Moving a block changes the ports in its workers' arguments, and `update`
would then restart workers whose unit file did not change.
"""

from __future__ import annotations

import textwrap
import zlib
from pathlib import Path

import pytest

from dynsup.control.peercred import AccessPolicy
from dynsup.daemon import Daemon, parse_args, resolve_settings
from dynsup.dynamo.ports import BLOCK, MAX_PORT, model_blocks

BASE = 20000
COUNT = (MAX_PORT - BASE) // BLOCK
MODEL_DIR = Path(__file__).resolve().parents[1] / "units" / "demo" / "model"


def colliding_pair() -> tuple[str, str]:
    """Two model names with the same hash slot, the newcomer sorting first."""
    slot = zlib.crc32(b"zeta") % COUNT
    for i in range(100_000):
        name = f"alpha{i}"
        if zlib.crc32(name.encode()) % COUNT == slot:
            return name, "zeta"
    raise AssertionError("no collision found")


def test_a_newcomer_that_collides_goes_elsewhere_when_the_old_block_is_known() -> None:
    newcomer, old = colliding_pair()
    alone = model_blocks([old], BASE)
    # Without memory, the newcomer (probed first, by name) would take the old one's block.
    assert model_blocks([newcomer, old], BASE)[newcomer] == alone[old]
    kept = model_blocks([newcomer, old], BASE, previous=alone)
    assert kept[old] == alone[old]
    assert kept[newcomer] != alone[old]


@pytest.mark.parametrize("stale", [BASE - BLOCK, BASE + 7, BASE + COUNT * BLOCK, 80])
def test_a_remembered_block_that_no_longer_fits_is_reassigned(stale: int) -> None:
    # Another port_base, not on a block boundary, past the last block: hashed afresh.
    assert model_blocks(["zeta"], BASE, previous={"zeta": stale}) == model_blocks(["zeta"], BASE)


def write_model(units: Path, name: str) -> None:
    (units / f"{name}.toml").write_text(
        textwrap.dedent(
            f"""
            [model]
            name = "{name}"
            path = "{MODEL_DIR}"
            engine = "mocker"
            """
        )
    )


def test_the_daemon_remembers_blocks_across_reloads_and_restarts(tmp_path: Path) -> None:
    newcomer, old = colliding_pair()
    units = tmp_path / "units"
    units.mkdir()
    (units / "stack.toml").write_text(
        f'[dynamo]\nnamespace = "t"\ndiscovery = "file"\nport_base = {BASE}\n'
    )
    write_model(units, old)
    argv = ["--state-dir", str(tmp_path / "state"), str(units)]

    def worker_env(daemon: Daemon, name: str) -> dict[str, str]:
        return daemon.specs[f"{name}-0"].env

    first = Daemon(resolve_settings(parse_args(argv)), AccessPolicy.from_groups())
    first.specs = first.reread()
    port = worker_env(first, old)["DYN_SYSTEM_PORT"]
    assert (
        f"{old} = {BASE + (zlib.crc32(old.encode()) % COUNT) * BLOCK}"
        in (tmp_path / "state" / "state.toml").read_text()
    )

    write_model(units, newcomer)
    first.specs = first.reread()  # `dynsupctl update`
    assert worker_env(first, old)["DYN_SYSTEM_PORT"] == port
    assert worker_env(first, newcomer)["DYN_SYSTEM_PORT"] != port

    # A new daemon on the same state directory: the same blocks.
    second = Daemon(resolve_settings(parse_args(argv)), AccessPolicy.from_groups())
    second.specs = second.reread()
    assert second.specs == first.specs
