"""scripts/demo.sh: --fresh starts the demo from units/demo, without the last run's state."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # --check: dynsupd prints the plan and exits, nothing is started.
    return subprocess.run(
        ["bash", str(ROOT / "scripts/demo.sh"), *args, "--check"],
        env={**os.environ, "DYNSUP_DEMO_STATE": str(state)},
        capture_output=True,
        text=True,
        timeout=600,  # a first run installs the venv
    )


def test_demo_fresh_removes_the_last_runs_state(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    state.mkdir()
    (state / "state.toml").write_text("format = 2\n[replicas]\ntiny = 5\n# end of dynsup state\n")
    kept = run_demo(state)
    assert kept.returncode == 0, kept.stderr
    assert (state / "state.toml").exists() and "tiny-4" in kept.stdout  # the state is used
    fresh = run_demo(state, "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert not (state / "state.toml").exists()
    assert "tiny-1" in fresh.stdout and "tiny-4" not in fresh.stdout  # units/demo's 2 replicas


def test_demo_header_does_not_claim_etcd_or_nats() -> None:
    header = (ROOT / "scripts/demo.sh").read_text().split("set -euo")[0]
    assert "etcd and NATS" not in header and "no etcd, no NATS" in header
