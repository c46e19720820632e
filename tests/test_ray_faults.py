"""Ray failing under a running daemon: its units' faults, never the daemon's.

A dead GCS or raylet is reported on the units it touches, with the reason;
the daemon keeps answering, stops stay bounded, and the rest runs on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dynsup.placement.gcs import GCS_TIMEOUT

from .daemon_helpers import DYNSUPCTL, py_command, run_dynsupd, write_unit
from .helpers import alive

pytestmark = pytest.mark.ray

TICKER = py_command("""
    import time
    while True:
        print("tick", flush=True)
        time.sleep(0.2)
""")


def gpu_unit(units: Path, name: str, *, autostart: bool = True, stop_timeout: float = 2) -> None:
    write_unit(
        units,
        name,
        f"""
        [unit]
        autostart = {str(autostart).lower()}
        [service]
        command = {TICKER}
        start_seconds = 0.2
        stop_timeout = {stop_timeout}
        [resources]
        gpus = 1
        """,
    )


def unit_status(daemon, name: str) -> dict:  # type: ignore[no-untyped-def]
    (unit,) = [u for u in daemon.ctl_json("status", name)["units"] if u["name"] == name]
    return unit


def test_with_the_gcs_dead_a_gpu_unit_stops_within_bounds_and_a_start_fails_with_the_reason(
    tmp_path: Path,
) -> None:
    from dynsup.placement.head import read_head, stop_head

    units = tmp_path / "units"
    gpu_unit(units, "model")
    gpu_unit(units, "spare", autostart=False)
    config = tmp_path / "dynsupd.toml"
    config.write_text("[ray]\nnum_gpus = 2\n")
    state = tmp_path / "state"
    # Each GCS call gives up after GCS_TIMEOUT; a stop makes two at most
    # (find, remove), then the agent's own stop (2 s). Room for a loaded machine.
    bound = 2 * GCS_TIMEOUT + 30
    try:
        with run_dynsupd(tmp_path, units, extra=["--config", str(config)]) as daemon:
            daemon.wait_state("model", "RUNNING", timeout=180)
            pid = unit_status(daemon, "model")["pid"]
            head = read_head(state)
            assert head is not None
            os.kill(head.gcs_pid, signal.SIGKILL)

            began = time.monotonic()
            stopping = subprocess.Popen(
                [DYNSUPCTL, "--socket", str(daemon.socket), "stop", "model"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                daemon.wait_state("model", "STOPPING", timeout=60)
                # Read verbs answer while the stop waits on Ray.
                assert unit_status(daemon, "model")["state"] in ("STOPPING", "STOPPED")
                assert stopping.wait(bound) == 0
            finally:
                if stopping.poll() is None:
                    stopping.kill()
                    stopping.wait()
            assert time.monotonic() - began < bound
            assert not alive(pid)
            assert unit_status(daemon, "model")["state"] == "STOPPED"
            failed = [e for e in daemon.events() if e.get("event") == "unit.release_failed"]
            assert failed and "Ray unavailable" in failed[0]["error"]

            # A GPU unit cannot be placed now: it says so, in bounded time.
            began = time.monotonic()
            started = daemon.ctl("start", "spare", timeout=bound)
            assert started.returncode == 1, started  # supervisorctl's "ERROR (spawn error)"
            assert "Ray unavailable" in started.stdout
            assert time.monotonic() - began < bound
            spare = unit_status(daemon, "spare")
            assert spare["state"] == "FATAL" and "Ray unavailable" in spare["reason"], spare

            assert daemon.proc.poll() is None
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(30)
    finally:
        head = read_head(state)
        if head is not None:
            stop_head(state, head)
