"""The systemd unit is valid: `systemd-analyze verify` is clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).parent.parent / "systemd" / "dynsupd.service"


def test_service_file_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text and "ExecReload=/usr/local/bin/dynsupctl update" in text
    # verify checks that ExecStart's binary exists: point it at this environment's.
    local = tmp_path / "dynsupd.service"
    local.write_text(text.replace("/usr/local/bin/", f"{Path(sys.executable).parent}/"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "dynsupd.service" not in done.stderr, done.stderr  # no warning about our unit
