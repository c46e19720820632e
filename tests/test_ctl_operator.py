"""The operator's small annoyances, against a real dynsupd: `tail` of a unit that
writes only stderr, the `last:` column, scale overrides against the unit file."""

from __future__ import annotations

import select
import signal
import subprocess
import time
from pathlib import Path

from .daemon_helpers import DYNSUPCTL, py_command, run_dynsupd, write_unit

# Like every Dynamo process: all of its output on stderr.
STDERR_ONLY = py_command("""
    import sys, time
    i = 0
    while True:
        i += 1
        print("INFO step", i, file=sys.stderr, flush=True)
        time.sleep(0.05)
""")
BOTH = py_command("""
    import sys, time
    print("out 1", flush=True)
    print("err 1", file=sys.stderr, flush=True)
    time.sleep(600)
""")


def read_lines(proc: subprocess.Popen[str], count: int, timeout: float = 30) -> list[str]:
    """Up to count lines of a follower's stdout, within a deadline."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while len(seen) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            seen.append(proc.stdout.readline().rstrip("\n"))
    return seen


def test_tail_of_a_unit_that_writes_only_stderr_shows_its_lines(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(units, "worker", f'[service]\ncommand = {STDERR_ONLY}\n[ready]\nlog = "step 3"\n')
    write_unit(units, "both", f"[service]\ncommand = {BOTH}\n[ready]\nlog = 'err 1'\n")
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("worker", "RUNNING")
        daemon.wait_state("both", "RUNNING")
        done = daemon.ctl("tail", "-n", "2", "worker")
        lines = done.stdout.splitlines()
        assert done.returncode == 0 and len(lines) == 2, done
        assert all(line.startswith("INFO step ") for line in lines), lines  # no header
        # A named stream is as before: stdout of this unit is empty.
        assert daemon.ctl("tail", "worker", "stdout").stdout == ""
        # Both streams have printed: each block under its stream's header.
        both = daemon.ctl("tail", "both").stdout.splitlines()
        assert both == ["==> stdout <==", "out 1", "==> stderr <==", "err 1"], both

        follower = subprocess.Popen(
            [DYNSUPCTL, "--socket", str(daemon.socket), "tail", "-f", "-n", "1", "worker"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            seen = read_lines(follower, 5)
            numbers = [int(line.split()[-1]) for line in seen]
            assert numbers == list(range(numbers[0], numbers[0] + 5)), seen  # nothing lost
        finally:
            follower.send_signal(signal.SIGINT)
            assert follower.wait(10) == 0
