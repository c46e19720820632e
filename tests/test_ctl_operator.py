"""The operator's small annoyances, against a real dynsupd: `tail` of a unit that
writes only stderr, the `last:` column, scale overrides against the unit file."""

from __future__ import annotations

import select
import signal
import subprocess
import time
from pathlib import Path

from .daemon_helpers import DYNSUPCTL, free_port_base, py_command, run_dynsupd, write_unit

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


SLEEPER = py_command("import time; time.sleep(600)")


def write_model(units: Path, replicas: int, port_base: int) -> None:
    model_dir = Path(__file__).resolve().parent.parent / "units/demo/model"
    write_unit(
        units,
        "stack",
        f'[dynamo]\nnamespace = "ops"\ndiscovery = "file"\nport_base = {port_base}\n',
    )
    # The frontend's place is taken by a sleeper: only the replica count matters here.
    write_unit(units, "frontend", f"[service]\ncommand = {SLEEPER}\nstart_seconds = 0\n")
    write_unit(
        units,
        "tiny",
        f'[model]\nname = "tiny"\npath = "{model_dir}"\nengine = "mocker"\nreplicas = {replicas}\n',
    )


def test_a_changed_replicas_in_the_file_drops_the_scale_override(tmp_path: Path) -> None:
    units = tmp_path / "units"
    port_base = free_port_base("tiny", [("agg", 2)])
    write_model(units, 1, port_base)
    with run_dynsupd(tmp_path, units) as daemon:
        done = daemon.ctl("scale", "tiny", "0")
        assert done.returncode == 0, done.stderr
        # An update that changes nothing says the override is in force.
        done = daemon.ctl("update")
        assert done.returncode == 0, done.stderr
        assert "tiny: scale override in force: 0 replicas, the unit file says 1" in done.stderr
        assert "--reset" in done.stderr
        # The file now says 0 (not the 1 the override was made against): the file wins.
        write_model(units, 0, port_base)
        done = daemon.ctl("update")
        assert done.returncode == 0, done.stderr
        assert (
            "tiny: dropped scale override of 0: the unit file now says 0 replicas"
            " (it said 1 when scaled)" in done.stdout
        ), done.stdout
        assert "WARNING" not in done.stderr
        daemon.wait_event(lambda e: e.get("event") == "scale.override_dropped")
    state = (tmp_path / "state" / "state.toml").read_text()
    assert "tiny" not in state.split("[port_blocks]")[0], state
