"""The daemon's footprint: a running dynsupd loads nothing it never uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from .daemon_helpers import run_dynsupd, write_unit


def _imported(log: Path) -> set[str]:
    """Module names from -X importtime lines ("import time: self | cumulative | name")."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.read_text().splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def test_dynsupd_with_a_running_unit_never_imports_rich(tmp_path: Path) -> None:
    # Meaningful only where rich could be imported: here (transformers -> typer
    # brings it) as on a GPU box, where structlog imported it for 4.8 MiB of RSS.
    pytest.importorskip("rich")
    units = tmp_path / "units"
    units.mkdir()
    write_unit(units, "idle", '[service]\ncommand = ["sleep", "600"]\nstart_seconds = 0\n')
    with run_dynsupd(tmp_path, units, env={"PYTHONPROFILEIMPORTTIME": "1"}) as daemon:
        daemon.wait_state("idle", "RUNNING")
        imported = _imported(daemon.stderr_path)
        assert daemon.stop() == 0
    assert "structlog" in imported, "no import log: the check would prove nothing"
    # A refused `import rich` is logged too (as "rich", in microseconds); a
    # loaded rich shows as its submodules and pygments.
    assert sorted(m for m in imported if m.startswith(("rich.", "pygments"))) == []
