"""GPU units are admitted only where they can hold their GPUs; refusing one never
takes the daemon or the other units down.

* A daemon restarted after a crash adopts what runs, then starts only the
  units it wants; a unit that cannot be placed goes FATAL alone.
* `update` checks the GPU units it adds together, before anything starts.
* A daemon without Ray refuses GPU units instead of running them unreserved.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .daemon_helpers import py_command, run_dynsupd, write_unit
from .helpers import alive

SLEEPER = py_command("""
    import time
    print("up", flush=True)
    time.sleep(600)
""")


def gpu_unit(units: Path, name: str, gpus: int, *, autostart: bool = True) -> None:
    write_unit(
        units,
        name,
        f"""
        [unit]
        autostart = {"true" if autostart else "false"}
        [service]
        command = {SLEEPER}
        start_seconds = 0.2
        stop_timeout = 5
        [resources]
        gpus = {gpus}
        """,
    )


def states(daemon) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {u["name"]: u for u in daemon.ctl_json("status")["units"]}


def ray_config(tmp_path: Path, gpus: int) -> list[str]:
    config = tmp_path / "dynsupd.toml"
    config.write_text(f"[ray]\nenabled = true\nnum_gpus = {gpus}\n")
    return ["--config", str(config)]


@pytest.mark.ray
def test_a_restarted_daemon_adopts_first_and_a_unit_that_cannot_be_placed_fails_alone(
    tmp_path: Path,
) -> None:
    units = tmp_path / "units"
    gpu_unit(units, "a", 2)
    gpu_unit(units, "b", 2)
    extra = ray_config(tmp_path, 4)
    with run_dynsupd(tmp_path, units, extra=extra) as first:
        first.wait_state("a", "RUNNING", timeout=180)
        first.wait_state("b", "RUNNING", timeout=180)
        assert first.ctl("stop", "b").returncode == 0  # stopped by hand: state.toml says so
        pid_a = states(first)["a"]["pid"]
        first.proc.send_signal(signal.SIGKILL)  # a crash: "a" runs on, unsupervised
        first.proc.wait(30)
    assert alive(pid_a)
    # Counting b (stopped), c and d, these ask for 14 of 4 GPUs; only a and c
    # are wanted, and d can never be placed.
    gpu_unit(units, "c", 2)
    gpu_unit(units, "d", 6)
    gpu_unit(units, "e", 4, autostart=False)
    (tmp_path / "dynsupd.log").rename(tmp_path / "first.log")
    with run_dynsupd(tmp_path, units, extra=extra) as second:
        fatal = second.wait_state("d", "FATAL", timeout=180)
        second.wait_state("c", "RUNNING", timeout=180)
        now = states(second)
        assert now["a"]["pid"] == pid_a and now["a"]["state"] == "RUNNING"  # adopted
        assert now["b"]["state"] == "STOPPED" and now["e"]["state"] == "STOPPED"
        assert "6 GPUs" in fatal["reason"] and ": 4" in fatal["reason"], fatal
        assert sorted(now["a"]["gpus"] + now["c"]["gpus"]) == ["0", "1", "2", "3"]
        assert second.stop(timeout=120) == 0
    assert not alive(pid_a)


@pytest.mark.ray
def test_gpu_units_added_together_that_overcommit_are_refused_by_update(tmp_path: Path) -> None:
    units = tmp_path / "units"
    gpu_unit(units, "held", 1)
    with run_dynsupd(tmp_path, units, extra=ray_config(tmp_path, 4)) as daemon:
        daemon.wait_state("held", "RUNNING", timeout=180)
        # Each fits what is free (3 GPUs); both together do not.
        gpu_unit(units, "x", 2)
        gpu_unit(units, "y", 2)
        done = daemon.ctl("update")
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "'x'" in done.stderr and "'y'" in done.stderr and "node" in done.stderr
        # Nothing of it was applied.
        assert daemon.ctl("status", "x").returncode == 4
        assert daemon.ctl("status", "y").returncode == 4
        assert states(daemon)["held"]["state"] == "RUNNING"
        # One of them alone is admitted and runs.
        (units / "y.toml").unlink()
        assert daemon.ctl("update").returncode == 0
        daemon.wait_state("x", "RUNNING", timeout=180)
        assert daemon.stop(timeout=120) == 0


def test_update_refuses_a_gpu_unit_on_a_daemon_without_ray(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(
        units,
        "plain",
        f"""
        [service]
        command = {SLEEPER}
        start_seconds = 0.2
        """,
    )
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("plain", "RUNNING")
        gpu_unit(units, "gpu", 2)
        done = daemon.ctl("update")
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "unit gpu asks for 2 GPUs; this daemon runs without Ray" in done.stderr
        assert daemon.ctl("status", "gpu").returncode == 4
        assert states(daemon)["plain"]["state"] == "RUNNING"
        assert daemon.stop() == 0
