"""A real dynsupd driven by real dynsupctl processes: every verb, output and exit code."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.journald_fixture import Journald

from .daemon_helpers import DYNSUPCTL, DYNSUPD, py_command, run_dynsupd, write_unit
from .helpers import alive

TALKER = py_command("""
    import sys, time
    i = 0
    while True:
        i += 1
        print("out", i, flush=True)
        print("err", i, file=sys.stderr, flush=True)
        time.sleep(0.05)
""")
SLEEPER = py_command("import time; time.sleep(600)")


def make_units(root: Path) -> Path:
    units = root / "units"
    write_unit(
        units,
        "base",
        f"""
        [unit]
        description = "the base service"
        [service]
        command = {SLEEPER}
        start_seconds = 0.1
    """,
    )
    write_unit(
        units,
        "talker",
        f"""
        [unit]
        requires = ["base"]
        [service]
        command = {TALKER}
        [ready]
        log = "out 3"
    """,
    )
    write_unit(
        units,
        "manual",
        f"""
        [unit]
        autostart = false
        [service]
        command = {SLEEPER}
        start_seconds = 0
    """,
    )
    return units


def status_json(daemon, *names: str) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {u["name"]: u for u in daemon.ctl_json("status", *names)["units"]}


def wait_running(daemon, *names: str) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    for name in names:
        daemon.wait_state(name, "RUNNING")
    return status_json(daemon)


def test_status_start_stop_restart_and_exit_codes(tmp_path: Path) -> None:
    with run_dynsupd(tmp_path, make_units(tmp_path)) as daemon:
        units = wait_running(daemon, "base", "talker")
        assert units["manual"]["state"] == "STOPPED"
        done = daemon.ctl("status")
        assert done.returncode == 3  # manual is not RUNNING
        lines = {line.split()[0]: line for line in done.stdout.splitlines()}
        assert lines["base"].split()[1] == "RUNNING"
        assert f"pid {units['base']['pid']}, uptime 0:00:" in lines["base"]
        assert lines["manual"].split()[1] == "STOPPED"
        assert daemon.ctl("status", "base", "talker").returncode == 0
        assert daemon.ctl("status", "nope").returncode == 4

        done = daemon.ctl("start", "manual")
        assert done.returncode == 0 and "manual: started" in done.stdout
        assert status_json(daemon, "manual")["manual"]["state"] == "RUNNING"

        talker_pid = units["talker"]["pid"]
        done = daemon.ctl("stop", "base")  # talker requires base: it stops first
        assert done.returncode == 0 and "base: stopped" in done.stdout
        after = status_json(daemon)
        assert after["base"]["state"] == "STOPPED" and after["talker"]["state"] == "STOPPED"
        assert not alive(talker_pid) and not alive(units["base"]["pid"])

        done = daemon.ctl("restart", "base")
        assert done.returncode == 0, done.stderr
        again = wait_running(daemon, "talker")
        assert again["base"]["state"] == "RUNNING"

        done = daemon.ctl("stop", "all")
        assert done.returncode == 0
        assert {u["state"] for u in status_json(daemon).values()} == {"STOPPED"}
        done = daemon.ctl("start", "all")
        assert done.returncode == 0, done.stdout + done.stderr
        assert {u["state"] for u in status_json(daemon).values()} == {"RUNNING"}

        done = daemon.ctl("stop", "nope")
        assert done.returncode == 4 and "nope: ERROR (no such unit)" in done.stdout + done.stderr
        done = daemon.ctl("start", "--no-wait", "manual")
        assert done.returncode == 0


def test_a_failing_start_reports_error(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(
        units,
        "broken",
        f"""
        [unit]
        autostart = false
        [service]
        command = {py_command("import sys; print('boom: no config', file=sys.stderr); sys.exit(3)")}
        restart_delay = 0.01
        start_limit_burst = 2
        start_seconds = 0.5
    """,
    )
    with run_dynsupd(tmp_path, units) as daemon:
        done = daemon.ctl("start", "broken")
        assert done.returncode == 1
        assert "broken: ERROR" in done.stdout
        done = daemon.ctl("status", "broken")
        assert done.returncode == 3
        assert "FATAL" in done.stdout and "exit status 3" in done.stdout
        # The last line it printed is one `-v` away (last: is how it ended).
        verbose = daemon.ctl("status", "-v", "broken")
        assert "boom: no config" in verbose.stdout, verbose.stdout


def test_pid_signal_version_avail(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(
        units,
        "sig",
        f"""
        [service]
        command = {
            py_command('''
            import signal, sys, time
            signal.signal(signal.SIGUSR1, lambda *a: sys.exit(42))
            print("up", flush=True)
            time.sleep(600)
        ''')
        }
        restart = "no"
        [ready]
        log = "up"
    """,
    )
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("sig", "RUNNING")
        assert daemon.ctl("pid").stdout.strip() == str(daemon.proc.pid)
        pid = int(daemon.ctl("pid", "sig").stdout)
        assert alive(pid)
        assert daemon.ctl_json("pid", "sig") == {"pid": pid}
        version = daemon.ctl_json("version")
        assert version["protocol"] == 1 and version["version"]
        avail = daemon.ctl_json("avail")
        assert avail["units"] == [
            {"name": "sig", "in_use": True, "autostart": True, "kind": "service"}
        ]
        done = daemon.ctl("signal", "USR1", "sig")
        assert done.returncode == 0
        daemon.wait_state("sig", "EXITED")
        assert status_json(daemon)["sig"]["exit_status"] == "exit status 42"
        assert daemon.ctl("signal", "NOTASIG", "sig").returncode != 0
        assert daemon.ctl("signal", "USR1", "sig").returncode == 1  # not running now


def test_tail_and_tail_follow(tmp_path: Path) -> None:
    with run_dynsupd(tmp_path, make_units(tmp_path)) as daemon:
        wait_running(daemon, "talker")
        done = daemon.ctl("tail", "-n", "3", "talker", "stdout")
        lines = done.stdout.splitlines()
        assert done.returncode == 0 and len(lines) == 3
        assert all(line.startswith("out ") for line in lines)
        numbers = [int(line.split()[1]) for line in lines]
        assert numbers == list(range(numbers[0], numbers[0] + 3))
        err = daemon.ctl("tail", "-n", "2", "talker", "stderr").stdout.splitlines()
        assert len(err) == 2 and all(line.startswith("err ") for line in err)

        follower = subprocess.Popen(
            [
                DYNSUPCTL,
                "--socket",
                str(daemon.socket),
                "tail",
                "-f",
                "-n",
                "1",
                "talker",
                "stdout",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            seen = []
            deadline = time.monotonic() + 30
            while len(seen) < 10 and time.monotonic() < deadline:
                ready, _, _ = select.select([follower.stdout], [], [], 1.0)
                if ready:
                    seen.append(follower.stdout.readline().strip())
            numbers = [int(line.split()[1]) for line in seen]
            assert numbers == list(range(numbers[0], numbers[0] + 10)), seen  # nothing lost
        finally:
            follower.send_signal(signal.SIGINT)
            assert follower.wait(10) == 0
        assert daemon.ctl("tail", "nope").returncode == 4
        # The daemon still serves after the follower went away.
        assert daemon.ctl("status", "talker").returncode == 0


def test_reread_update_touch_only_what_changed(tmp_path: Path) -> None:
    units = make_units(tmp_path)
    with run_dynsupd(tmp_path, units) as daemon:
        before = wait_running(daemon, "base", "talker")
        assert daemon.ctl("reread").stdout.strip() == "No config updates to processes"

        write_unit(
            units,
            "manual",
            f"""
            [unit]
            autostart = false
            [service]
            command = {SLEEPER}
            start_seconds = 0
            stop_timeout = 3
        """,
        )
        write_unit(
            units,
            "extra",
            f"""
            [service]
            command = {SLEEPER}
            start_seconds = 0
        """,
        )
        (units / "talker.toml").unlink()

        plan = daemon.ctl_json("reread")
        assert plan == {
            "added": ["extra"],
            "changed": {"manual": ["stop_timeout"]},
            "removed": ["talker"],
        }
        text = daemon.ctl("reread").stdout
        assert "extra: available" in text and "talker: disappeared" in text
        assert "manual: changed" in text

        dry = daemon.ctl_json("update", "--dry-run")
        assert dry["applied"] is False and dry["added"] == ["extra"]
        assert status_json(daemon).keys() == {"base", "talker", "manual"}
        assert status_json(daemon)["talker"]["pid"] == before["talker"]["pid"]

        done = daemon.ctl("update")
        assert done.returncode == 0, done.stderr
        after = status_json(daemon)
        assert set(after) == {"base", "manual", "extra"}
        assert after["base"]["pid"] == before["base"]["pid"]  # unchanged: not touched
        assert not alive(before["talker"]["pid"])
        daemon.wait_state("extra", "RUNNING")

        # An invalid directory is refused whole; nothing running changes.
        write_unit(
            units,
            "bad",
            """
            [service]
            command = []
        """,
        )
        write_unit(
            units,
            "extra2",
            f"""
            [service]
            command = {SLEEPER}
        """,
        )
        done = daemon.ctl("update")
        assert done.returncode == 2
        assert "bad.toml" in done.stdout + done.stderr
        assert set(status_json(daemon)) == {"base", "manual", "extra"}
        assert status_json(daemon)["base"]["pid"] == before["base"]["pid"]


def test_stopped_by_hand_stays_stopped_after_daemon_restart(tmp_path: Path) -> None:
    units = make_units(tmp_path)
    with run_dynsupd(tmp_path, units) as daemon:
        wait_running(daemon, "talker")
        assert daemon.ctl("stop", "talker").returncode == 0
        assert daemon.ctl("start", "manual").returncode == 0
        assert daemon.ctl("shutdown").stdout.strip() == "Shut down"
        assert daemon.proc.wait(60) == 0
    assert "talker" in (tmp_path / "state" / "state.toml").read_text()
    with run_dynsupd(tmp_path, units) as daemon:
        wait_running(daemon, "base", "manual")
        assert status_json(daemon)["talker"]["state"] == "STOPPED"


def test_second_daemon_on_the_same_socket_refuses(tmp_path: Path) -> None:
    units = make_units(tmp_path)
    with run_dynsupd(tmp_path, units) as daemon:
        wait_running(daemon, "base")
        done = subprocess.run(
            [
                DYNSUPD,
                "--socket",
                str(daemon.socket),
                "--state-dir",
                str(tmp_path / "s2"),
                str(units),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert "another dynsupd" in done.stderr
        assert daemon.ctl("status", "base").returncode == 0


def test_unreachable_daemon_exits_4(tmp_path: Path) -> None:
    done = subprocess.run(
        [DYNSUPCTL, "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 4 and "cannot reach dynsupd" in done.stderr


def test_unit_output_reaches_journald(tmp_path: Path, journald_instance: Journald) -> None:
    units = tmp_path / "units"
    name = f"jtalk{os.getpid()}"
    write_unit(
        units,
        name,
        f"""
        [service]
        command = {
            py_command('''
            import sys, time
            print("hello journal", flush=True)
            print("oops on stderr", file=sys.stderr, flush=True)
            time.sleep(600)
        ''')
        }
        start_seconds = 0
    """,
    )
    env = {"DYNSUP_JOURNAL_SOCKET": journald_instance.socket_path}
    with run_dynsupd(tmp_path, units, env=env) as daemon:
        daemon.wait_state(name, "RUNNING")
        pid = status_json(daemon)[name]["pid"]
        entries = journald_instance.entries(name, count=2)
        daemon_events = journald_instance.entries("dynsupd", count=3)
    by_message = {e["MESSAGE"]: e for e in entries}
    out = by_message["hello journal"]
    assert out["SYSLOG_IDENTIFIER"] == name and out["DYNSUP_UNIT"] == name
    assert out["DYNSUP_STREAM"] == "stdout" and out["DYNSUP_PID"] == str(pid)
    assert out["PRIORITY"] == "6" and out["DYNSUP_NODE"]
    assert by_message["oops on stderr"]["DYNSUP_STREAM"] == "stderr"
    started = [e for e in daemon_events if e.get("EVENT") == "unit.state"]
    assert any(e.get("UNIT") == name for e in started)


def test_sd_notify_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(30)
    env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
    messages: list[str] = []
    try:
        with run_dynsupd(tmp_path, make_units(tmp_path), env=env) as daemon:
            seen_ready = False
            while True:  # until a WATCHDOG=1 comes after READY=1
                message = listener.recv(4096).decode()
                messages.append(message)
                if seen_ready and "WATCHDOG=1" in message:
                    break
                seen_ready = seen_ready or "READY=1" in message
            daemon.stop()
            listener.settimeout(1)
            try:
                while True:
                    messages.append(listener.recv(4096).decode())
            except TimeoutError:
                pass
    finally:
        listener.close()
    lines = [line for m in messages for line in m.splitlines()]
    ready = lines.index("READY=1")
    assert any(line.startswith("STATUS=") for line in lines[ready:])
    status = next(line for line in lines[ready:] if line.startswith("STATUS="))
    assert "2 running" in status
    watchdog_after_ready = [i for i, line in enumerate(lines) if line == "WATCHDOG=1" and i > ready]
    stopping = lines.index("STOPPING=1")
    assert watchdog_after_ready and watchdog_after_ready[0] < stopping
    assert json.dumps(lines)  # all text
