"""The systemd unit is valid and its ExecStart runs: `systemd-analyze verify` is
clean, and the command line it gives starts without a config file."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "systemd" / "dynsupd.service"
VENV = "/opt/dynsup/venv/bin/"  # where scripts/install.sh puts the service's venv


def here(text: str) -> str:
    """The unit as installed from this environment's venv (what install.sh's sed does)."""
    return text.replace(VENV, f"{Path(sys.executable).parent}/")


def directive(text: str, key: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"{key}=")]
    return line.split("=", 1)[1]


def test_service_file_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text and f"ExecReload={VENV}dynsupctl update" in text
    # A bad unit directory exits 2: no restart loop every RestartSec.
    assert directive(text, "RestartPreventExitStatus") == "2"
    # verify checks that ExecStart's binary exists: point it at this environment's.
    local = tmp_path / "dynsupd.service"
    local.write_text(here(text))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "dynsupd.service" not in done.stderr, done.stderr  # no warning about our unit


def test_exec_start_needs_no_config_file(tmp_path: Path) -> None:
    """ExecStart names no file that no install step creates; run as it says (plus
    --check and the demo directory: nothing is started) it exits 0."""
    argv = shlex.split(here(directive(UNIT.read_text(), "ExecStart")))
    assert argv == [f"{Path(sys.executable).parent}/dynsupd"]  # no --config
    done = subprocess.run(
        [*argv, "--check", "--state-dir", str(tmp_path / "state"), str(ROOT / "units" / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "tiny-0" in done.stdout
