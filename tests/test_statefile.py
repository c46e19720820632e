"""state.toml cannot lie: a damaged file is set aside, a failed write changes nothing."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dynsup.statefile import STATE_FILE, DesiredState, StateWriteError

from .daemon_helpers import run_dynsupd, write_unit

GOOD = b'format = 2\n\n[wanted]\nweb = false\n\n[replicas]\n"m:prefill" = 2\n'

# name of the scenario → what is found at state.toml
CORRUPT: dict[str, bytes | None] = {
    "invalid_utf8": b"[wanted]\nweb = false\n# \xff\xfe\n",
    "toml_error": b"[wanted]\nweb = fal",
    "wanted_not_a_table": b"wanted = 5\n",
    "wanted_not_a_boolean": b'[wanted]\nweb = "yes"\n',
    "negative_replicas": b"[replicas]\nm = -3\n",
    "port_block_out_of_range": b"[port_blocks]\nm = 70000\n",
    "not_a_unit_name": b'[wanted]\n"../../etc" = true\n',
    "unknown_table": b"[wnated]\nweb = true\n",
    "truncated": GOOD,  # format 2 without its end marker: cut short after a line
    "directory_in_its_place": None,
}


@pytest.mark.parametrize("scenario", sorted(CORRUPT))
def test_corrupt_state_file_is_set_aside_with_one_error_event(
    tmp_path: Path, scenario: str
) -> None:
    path = tmp_path / STATE_FILE
    content = CORRUPT[scenario]
    if content is None:
        path.mkdir()
        (path / "x").write_text("kept")
    else:
        path.write_bytes(content)
    with capture_logs() as events:
        state = DesiredState.load(tmp_path)
    assert (state.overrides, state.replicas, state.port_blocks) == ({}, {}, {})
    [aside] = list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
    assert not path.exists()
    if content is None:
        assert (aside / "x").read_text() == "kept"
    else:
        assert aside.read_bytes() == content  # kept for the operator, byte for byte
    [event] = [e for e in events if e["log_level"] == "error"]
    assert event["event"] == "state.corrupt"
    assert event["moved_to"] == str(aside) and event["path"] == str(path)
    assert event["reason"]
    # The daemon goes on: the next change writes a fresh, valid file.
    state.set("web", False, True)
    assert DesiredState.load(tmp_path).overrides == {"web": False}


def test_state_file_of_the_previous_format_still_loads(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("[wanted]\nweb = false\n[port_blocks]\nm = 21000\n")
    state = DesiredState.load(tmp_path)
    assert (state.overrides, state.port_blocks) == ({"web": False}, {"m": 21000})
    assert not list(tmp_path.glob("*.corrupt-*"))


@contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """No file can be created, renamed or removed in ``directory``, even by root."""
    done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_failed_state_write_changes_nothing_and_is_never_written_later(tmp_path: Path) -> None:
    state = DesiredState.load(tmp_path)
    state.set("kept", False, True)
    with immutable(tmp_path):
        for change in (
            lambda: state.set("web", False, True),
            lambda: state.set_replicas("m", 3),
            lambda: state.remember_port_blocks({"m": 21000}),
            lambda: state.forget_except(set()),
        ):
            with pytest.raises(StateWriteError, match="cannot write"):
                change()
            # Memory as it was: what is in memory is what is on disk.
            assert (state.overrides, state.replicas, state.port_blocks) == ({"kept": False}, {}, {})
    state.set("other", True, False)  # the next successful change carries only itself
    on_disk = DesiredState.load(tmp_path)
    assert on_disk.overrides == {"kept": False, "other": True}
    assert (on_disk.replicas, on_disk.port_blocks) == ({}, {})
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary file left


SLEEPER = '[service]\ncommand = ["sleep", "600"]\nstart_seconds = 0\n'


def test_stop_whose_state_write_fails_is_refused_and_not_remembered(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(units, "a", SLEEPER)
    write_unit(units, "b", SLEEPER)
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("a", "RUNNING")
        daemon.wait_state("b", "RUNNING")
        state_dir = tmp_path / "state"
        state_dir.mkdir(exist_ok=True)
        with immutable(state_dir):
            refused = daemon.ctl("stop", "a")
        assert refused.returncode != 0
        assert "nothing was changed" in refused.stdout + refused.stderr
        assert daemon.ctl_json("status", "a")["units"][0]["state"] == "RUNNING"
        assert daemon.ctl("stop", "b").returncode == 0
    # After a restart, the unit whose stop was refused runs; the one stopped stays stopped.
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("a", "RUNNING")
        assert daemon.ctl_json("status", "b")["units"][0]["state"] == "STOPPED"
