"""dynsupd with Ray for real: a daemon restart (kill -9, or shutdown --detach) loses nothing.

Units ask for logical GPUs, so the daemon runs them under its node's Ray
agent; a new daemon on the same state directory adopts what still matches
its unit files (same pids, same GPUs) and replaces only what changed.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from .daemon_helpers import py_command, run_dynsupd, write_unit
from .helpers import alive

pytestmark = pytest.mark.ray

TICKER = py_command("""
    import os, time
    print("gpus", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
    i = 0
    while True:
        i += 1
        print("tick", i, flush=True)
        time.sleep(0.1)
""")


def write_units(units: Path, *, changed: bool = False) -> None:
    for name in ("model-a", "model-b"):
        write_unit(
            units,
            name,
            f"""
            [service]
            command = {TICKER}
            start_seconds = 0.2
            stop_timeout = {3 if changed and name == "model-b" else 5}
            [resources]
            gpus = 2
        """,
        )


def status(daemon) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {u["name"]: u for u in daemon.ctl_json("status")["units"]}


def ticks(daemon, unit: str) -> list[int]:  # type: ignore[no-untyped-def]
    out = daemon.ctl("tail", "-n", "100000", unit).stdout
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("tick ")]


def test_daemon_restart_adopts_unchanged_units_and_replaces_changed_ones(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_units(units)
    config = tmp_path / "dynsupd.toml"
    config.write_text("[ray]\nnum_gpus = 4\n")
    extra = ["--config", str(config)]

    with run_dynsupd(tmp_path, units, extra=extra) as first:
        for name in ("model-a", "model-b"):
            first.wait_state(name, "RUNNING", timeout=180)
        before = status(first)
        assert sorted(before["model-a"]["gpus"] + before["model-b"]["gpus"]) == ["0", "1", "2", "3"]
        gpus_table = first.ctl_json("gpus")
        assert gpus_table["ray"] and {row["unit"] for row in gpus_table["gpus"]} == {
            "model-a",
            "model-b",
        }
        last_tick = max(ticks(first, "model-a"))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        # The daemon is gone; its units are not.
        assert alive(before["model-a"]["pid"]) and alive(before["model-b"]["pid"])
        write_units(units, changed=True)  # model-b changes while no daemon runs

    (tmp_path / "dynsupd.log").rename(tmp_path / "first.log")
    with run_dynsupd(tmp_path, units, extra=extra) as second:
        second.wait_state("model-a", "RUNNING", timeout=180)
        second.wait_state("model-b", "RUNNING", timeout=180)
        after = status(second)
        assert after["model-a"]["pid"] == before["model-a"]["pid"]  # adopted
        assert after["model-a"]["gpus"] == before["model-a"]["gpus"]
        assert after["model-b"]["pid"] != before["model-b"]["pid"]  # replaced
        assert not alive(before["model-b"]["pid"])
        # Lines printed while no daemon ran are in the agent's ring.
        assert any(n > last_tick for n in ticks(second, "model-a"))
        adopted = [e for e in second.events() if e.get("event") == "unit.adopted"]
        assert [e["unit"] for e in adopted] == ["model-a"]

        # An upgrade: leave everything running for the next daemon.
        done = second.ctl("shutdown", "--detach")
        assert done.returncode == 0, done.stderr
        assert second.proc.wait(120) == 0
        assert alive(after["model-a"]["pid"]) and alive(after["model-b"]["pid"])

    (tmp_path / "dynsupd.log").rename(tmp_path / "second.log")
    with run_dynsupd(tmp_path, units, extra=extra) as third:
        third.wait_state("model-b", "RUNNING", timeout=180)
        final = status(third)
        assert final["model-a"]["pid"] == before["model-a"]["pid"]
        assert final["model-b"]["pid"] == after["model-b"]["pid"]
        pids = [final[n]["pid"] for n in ("model-a", "model-b")]
        assert third.stop(timeout=120) == 0
    assert not any(alive(pid) for pid in pids)
    # An orderly stop with nothing left running also stops the embedded Ray head.
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()
    ]
    assert not leftovers


def test_the_daemon_and_its_units_outlive_a_dead_gcs(tmp_path: Path) -> None:
    from dynsup.placement.head import read_head, stop_head

    units = tmp_path / "units"
    write_unit(
        units,
        "model",
        f"""
        [service]
        command = {TICKER}
        start_seconds = 0.2
        [resources]
        gpus = 1
        """,
    )
    config = tmp_path / "dynsupd.toml"
    config.write_text("[ray]\nnum_gpus = 2\n")
    # Ray's default is 60 s; a short one shows the same death sooner.
    env = {"RAY_gcs_rpc_server_reconnect_timeout_s": "3"}
    state = tmp_path / "state"
    try:
        with run_dynsupd(tmp_path, units, extra=["--config", str(config)], env=env) as daemon:
            daemon.wait_state("model", "RUNNING", timeout=180)
            pid = status(daemon)["model"]["pid"]
            head = read_head(state)
            assert head is not None
            os.kill(head.gcs_pid, signal.SIGKILL)
            # Nothing to wait on: surviving is the absence of an exit. Ray ends
            # the driver a few seconds after the 3 s; 30 s leaves room for load.
            with pytest.raises(subprocess.TimeoutExpired):
                daemon.proc.wait(30)
            assert alive(pid)  # the agent actor outlived it too
            assert status(daemon)["model"]["state"] == "RUNNING"
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(30)
    finally:
        head = read_head(state)
        if head is not None:
            stop_head(state, head)
