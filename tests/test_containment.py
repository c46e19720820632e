"""A unit is the failure boundary: each scenario here once killed, hung or fooled the daemon.

Real dynsupd, real processes, real sockets. Each test is named after the
scenario that broke the promise on 8ea02ce.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import psutil

from .daemon_helpers import DYNSUPCTL, Dynsupd, py_command, run_dynsupd, write_unit
from .helpers import alive

SLEEPER = "import time\nwhile True: time.sleep(60)"


def sleeper_unit(directory: Path, name: str, extra: str = "", requires: str = "") -> None:
    write_unit(
        directory,
        name,
        f"""
        [unit]
        requires = [{requires}]
        [service]
        command = {py_command(SLEEPER)}
        start_seconds = 0
        stop_timeout = 5
        {extra}
        """,
    )


def test_a_failed_requirement_settles_its_dependent_and_start_returns(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(
        units,
        "base",
        f"""
        [unit]
        autostart = false
        [service]
        command = {py_command("import sys; sys.exit(4)")}
        restart = "no"
        """,
    )
    sleeper_unit(units, "app", extra="", requires='"base"')
    (units / "app.toml").write_text(
        (units / "app.toml").read_text().replace("[unit]", "[unit]\nautostart = false")
    )
    with run_dynsupd(tmp_path, units) as daemon:
        done = daemon.ctl("start", "app", timeout=60)
        # Settles, with the reason, instead of waiting PENDING forever.
        assert done.returncode == 3, done.stdout + done.stderr
        status = daemon.ctl_json("status", "app")["units"][0]
        assert status["state"] == "FATAL"
        assert status["reason"].startswith("requirement base EXITED: exit status 4"), status

        # The requirement comes back RUNNING: the wanted dependent starts again.
        write_unit(
            units,
            "base",
            f"""
            [unit]
            autostart = false
            [service]
            command = {py_command(SLEEPER)}
            start_seconds = 0
            """,
        )
        assert daemon.ctl("update").returncode == 0
        assert daemon.ctl("start", "base").returncode == 0
        daemon.wait_state("app", "RUNNING")


def test_sighup_is_update_and_usr1_usr2_quit_are_ignored(tmp_path: Path) -> None:
    units = tmp_path / "units"
    sleeper_unit(units, "keep")
    with run_dynsupd(tmp_path, units) as daemon:
        keep_pid = daemon.wait_state("keep", "RUNNING")["pid"]
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
            daemon.proc.send_signal(sig)
            daemon.wait_event(
                lambda e, s=sig: e.get("event") == "daemon.signal_ignored" and e["signal"] == s.name
            )
        sleeper_unit(units, "added")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_event(lambda e: e.get("event") == "daemon.reloaded")
        daemon.wait_state("added", "RUNNING")
        # A bad file on SIGHUP is refused with the errors; nothing changes.
        write_unit(units, "broken", "[service]\ncommand = 7\n")
        daemon.proc.send_signal(signal.SIGHUP)
        refused = daemon.wait_event(lambda e: e.get("event") == "daemon.reload_refused")
        assert any("broken.toml" in line for line in refused["errors"]), refused
        assert daemon.proc.poll() is None
        assert daemon.ctl_json("status", "keep")["units"][0]["pid"] == keep_pid


def test_update_with_an_unknown_name_exits_4(tmp_path: Path) -> None:
    units = tmp_path / "units"
    sleeper_unit(units, "a")
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("a", "RUNNING")
        done = daemon.ctl("update", "nosuch")
        assert done.returncode == 4, done.stdout + done.stderr
        assert "nosuch" in done.stderr


def test_a_signal_given_as_a_bool_is_refused(tmp_path: Path) -> None:
    units = tmp_path / "units"
    sleeper_unit(units, "a")
    with run_dynsupd(tmp_path, units) as daemon:
        pid = daemon.wait_state("a", "RUNNING")["pid"]
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(daemon.socket))
            request = {"id": 1, "cmd": "signal", "args": {"names": ["a"], "signal": True}}
            conn.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(conn.makefile().readline())
        assert answer["ok"] is False and answer["error"]["code"] == "BAD_ARGUMENTS", answer
        assert alive(pid)  # not SIGHUPed


def test_two_updates_at_once_while_a_changed_unit_is_slow_to_stop(tmp_path: Path) -> None:
    units = tmp_path / "units"
    stubborn = """
    import signal, time
    signal.signal(signal.SIGTERM, lambda *_: None)
    while True: time.sleep(60)
    """
    body = f"""
    [service]
    command = {py_command(stubborn)}
    start_seconds = 0
    stop_timeout = {{timeout}}
    """
    write_unit(units, "slow", body.format(timeout=1.5))
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("slow", "RUNNING")
        write_unit(units, "slow", body.format(timeout=1.6))
        first = daemon_ctl_async(daemon, "update")
        second = daemon_ctl_async(daemon, "update")
        assert first.wait(60) == 0, first.stderr.read()
        assert second.wait(60) == 0, second.stderr.read()
        daemon.wait_state("slow", "RUNNING")
        assert daemon.proc.poll() is None
        status = daemon.ctl_json("status", "slow")["units"][0]
        assert status["state"] == "RUNNING"
        # One process of the unit, not two.
        spawned = [
            p
            for p in psutil.Process(daemon.proc.pid).children(recursive=True)
            if "SIGTERM" in " ".join(p.cmdline())
        ]
        assert [p.pid for p in spawned] == [status["pid"]]


def test_start_all_waits_and_returns_with_600_units(tmp_path: Path) -> None:
    """The waiting start watched a subscription that dropped events past 1,024
    and never re-read the states: 400 or more units and it never returned."""
    units = tmp_path / "units"
    for i in range(600):
        write_unit(
            units,
            f"s{i:03d}",
            """
            [unit]
            autostart = false
            [service]
            command = ["sleep", "600"]
            start_seconds = 0
            stop_timeout = 5
            """,
        )
    with run_dynsupd(tmp_path, units) as daemon:
        done = daemon.ctl("start", "all", timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr
        states = {u["state"] for u in daemon.ctl_json("status")["units"]}
        assert states == {"RUNNING"}
        assert daemon.ctl("stop", "all", timeout=120).returncode == 0


def daemon_ctl_async(daemon: Dynsupd, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DYNSUPCTL, "--socket", str(daemon.socket), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
