"""Ray failing under a running daemon: its units' faults, never the daemon's.

A dead GCS or raylet is reported on the units it touches, with the reason;
the daemon keeps answering, stops stay bounded, and the rest runs on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from dynsup.placement.ray_cluster import GCS_RECONNECT_VAR

from .daemon_helpers import DYNSUPCTL, py_command, run_dynsupd, write_unit
from .helpers import alive
from .ray_fixtures import wait_gone

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


def wait_new_event(daemon, seen: int, predicate, timeout: float) -> dict:  # type: ignore[no-untyped-def]
    """The first event after the first ``seen`` ones that satisfies predicate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in daemon.events()[seen:]:
            if predicate(event):
                return event
        assert daemon.proc.poll() is None, "dynsupd exited"
        time.sleep(0.1)  # polling the daemon's log file, bounded by the deadline
    raise AssertionError(f"no such event within {timeout}s:\n{daemon.stderr_path.read_text()}")


def unit_status(daemon, name: str) -> dict:  # type: ignore[no-untyped-def]
    (unit,) = [u for u in daemon.ctl_json("status", name)["units"] if u["name"] == name]
    return unit


def test_with_the_gcs_dead_a_gpu_unit_stops_within_bounds_and_a_start_fails_with_the_reason(
    tmp_path: Path,
) -> None:
    from dynsup.placement.gcs import GCS_TIMEOUT

    from .ray_fixtures import gcs_of, local_cluster

    units = tmp_path / "units"
    gpu_unit(units, "model")
    gpu_unit(units, "spare", autostart=False)
    # Each GCS call gives up after GCS_TIMEOUT; a stop makes two at most
    # (find, remove), then the agent's own stop (2 s). Room for a loaded machine.
    bound = 2 * GCS_TIMEOUT + 30
    # A joined cluster: its head is its operator's, the daemon does not
    # restart it. Its raylets (and the agents) outlive the GCS meanwhile.
    with local_cluster({GCS_RECONNECT_VAR: "3600"}) as cluster:
        config = tmp_path / "dynsupd.toml"
        config.write_text(f'[ray]\naddress = "{cluster.address}"\n')
        extra = ["--config", str(config)]
        with run_dynsupd(tmp_path, units, extra=extra, env=cluster.env) as daemon:
            daemon.wait_state("model", "RUNNING", timeout=180)
            pid = unit_status(daemon, "model")["pid"]
            gcs_of(cluster).kill()

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


# Node deaths noticed in seconds, not the default ~15-30 s.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


# Opt-in: alone it passes (3 of 3 runs), but inside the whole suite on this
# 2-core box the old unit outlived its dead raylet by more than 60 s (2 of 2
# runs): its agent actor, a Ray worker, was slow to notice the raylet's death,
# and only then does the actor's warden kill what it hosted. Cause not found.
@pytest.mark.ray_node_death
def test_a_dead_worker_raylet_fails_only_its_unit_which_heals_on_a_replacement_node(
    tmp_path: Path,
) -> None:
    from .ray_fixtures import add_worker, local_cluster, raylet_of

    units = tmp_path / "units"
    for name in ("a", "b"):  # a whole worker node each
        write_unit(
            units,
            name,
            f"""
            [service]
            command = {TICKER}
            start_seconds = 0.2
            [resources]
            gpus = 4
            """,
        )
    with local_cluster(FAST_HEALTH_CHECKS) as cluster:
        config = tmp_path / "dynsupd.toml"
        config.write_text(f'[ray]\naddress = "{cluster.address}"\n')
        extra = ["--config", str(config)]
        with run_dynsupd(tmp_path, units, extra=extra, env=cluster.env) as daemon:
            for name in ("a", "b"):
                daemon.wait_state(name, "RUNNING", timeout=180)
            (joined,) = [e for e in daemon.events() if e.get("event") == "ray.joined"]
            node_of = {row["unit"]: row["node_id"] for row in daemon.ctl_json("gpus")["gpus"]}
            # Not the daemon's own node: its raylet's death is another story.
            victim = next(u for u in ("a", "b") if node_of[u] != joined["node"])
            bystander = "b" if victim == "a" else "a"
            before = {name: unit_status(daemon, name) for name in ("a", "b")}
            old_proc = psutil.Process(before[victim]["pid"])
            seen = len(daemon.events())

            raylet_of(cluster, node_of[victim]).kill()

            def moved(event: dict, states: tuple[str, ...]) -> bool:
                return (
                    event.get("event") == "unit.state"
                    and event.get("unit") == victim
                    and event.get("new") in states
                )

            failed = wait_new_event(daemon, seen, lambda e: moved(e, ("BACKOFF", "FATAL")), 120)
            assert failed["new"] == "BACKOFF", failed  # to be restarted by its policy
            assert "raylet on node" in failed["reason"] and "died" in failed["reason"], failed
            assert node_of[victim][:12] in failed["reason"], failed
            assert not asyncio.run(wait_gone([old_proc], 60))

            add_worker(cluster, "dsr_worker_spare")
            healed = wait_new_event(daemon, seen, lambda e: moved(e, ("RUNNING", "FATAL")), 180)
            assert healed["new"] == "RUNNING", healed
            after = {name: unit_status(daemon, name) for name in ("a", "b")}
            assert after[victim]["pid"] != before[victim]["pid"]
            assert after[bystander]["pid"] == before[bystander]["pid"]
            assert after[bystander]["state"] == "RUNNING"
            touched = [
                e
                for e in daemon.events()[seen:]
                if e.get("event") == "unit.state" and e.get("unit") == bystander
            ]
            assert not touched, touched
            new_node = {row["unit"]: row["node_id"] for row in daemon.ctl_json("gpus")["gpus"]}
            assert new_node[victim] not in (node_of["a"], node_of["b"])
            assert daemon.stop(timeout=120) == 0


def test_a_dead_embedded_head_raylet_restarts_the_head_and_its_units_heal_by_policy(
    tmp_path: Path,
) -> None:
    # (A dead GCS alone leaves the head as it is: the units run on, see
    # test_daemon_ray's test_the_daemon_and_its_units_outlive_a_dead_gcs.)
    from dynsup.placement.head import head_processes, read_head, stop_head

    units = tmp_path / "units"
    gpu_unit(units, "model")
    write_unit(units, "plain", f"[service]\ncommand = {TICKER}\nstart_seconds = 0.2\n")
    config = tmp_path / "dynsupd.toml"
    config.write_text("[ray]\nnum_gpus = 2\nenabled = true\n")
    state = tmp_path / "state"
    try:
        with run_dynsupd(tmp_path, units, extra=["--config", str(config)]) as daemon:
            for name in ("model", "plain"):
                daemon.wait_state(name, "RUNNING", timeout=180)
            before = {name: unit_status(daemon, name) for name in ("model", "plain")}
            head = read_head(state)
            assert head is not None
            seen = len(daemon.events())
            os.kill(head.raylet_pid, signal.SIGKILL)

            def event(name: str) -> Callable[[dict], bool]:
                return lambda e: e.get("event") == name

            died = wait_new_event(daemon, seen, event("ray.head_died"), 60)
            assert died["process"] == "raylet"
            wait_new_event(daemon, seen, event("ray.head_restarted"), 240)
            for name in ("model", "plain"):
                back = wait_new_event(
                    daemon,
                    seen,
                    lambda e, name=name: (
                        e.get("event") == "unit.state"
                        and e.get("unit") == name
                        and e.get("new") in ("RUNNING", "FATAL")
                    ),
                    240,
                )
                assert back["new"] == "RUNNING", back
                lost = [
                    e
                    for e in daemon.events()[seen:]
                    if e.get("event") == "unit.state"
                    and e.get("unit") == name
                    and e.get("new") == "BACKOFF"
                ]
                assert lost and "the Ray head died" in lost[0]["reason"], lost
                assert unit_status(daemon, name)["pid"] != before[name]["pid"]
            new_head = read_head(state)
            assert new_head is not None and new_head.gcs_pid != head.gcs_pid
            table = daemon.ctl_json("gpus")["gpus"]
            assert [row["unit"] for row in table if row["unit"]] == ["model"]
            assert daemon.stop(timeout=180) == 0
        # An orderly stop with nothing left running stops the restarted head too.
        assert not head_processes(new_head.token, new_head.temp_dir)
    finally:
        head = read_head(state)
        if head is not None:
            stop_head(state, head)
