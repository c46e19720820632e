"""`dynsupctl top` in a real terminal: tmux runs it, send-keys drives it, capture-pane reads it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .daemon_helpers import DYNSUPCTL, py_command, run_dynsupd, write_unit

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

SLEEPER = py_command("import time; time.sleep(600)")


@contextmanager
def tmux(command: list[str]) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """A detached tmux server of its own (160x40) running command; killed on the way out."""
    server = f"dynsup-top-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", server, *args], capture_output=True, text=True, timeout=30
        )

    shell = " ".join(f"'{part}'" for part in command)
    started = run("new-session", "-d", "-x", "160", "-y", "40", "-s", "top", shell)
    assert started.returncode == 0, started.stderr
    try:
        yield run
    finally:
        run("kill-server")


def wait_pane(
    run: Callable[..., subprocess.CompletedProcess[str]], want: Callable[[str], bool]
) -> str:
    deadline = time.monotonic() + 60
    screen = ""
    while time.monotonic() < deadline:
        screen = run("capture-pane", "-p", "-t", "top").stdout
        if want(screen):
            return screen
        time.sleep(0.1)  # re-reading the pane, bounded by the deadline
    raise AssertionError(f"pane never matched:\n{screen}")


def row(screen: str, unit: str) -> str:
    return next((line for line in screen.splitlines() if f" {unit} " in line), "")


def test_top_shows_units_follows_a_crash_and_quits_on_q(tmp_path: Path) -> None:
    units = tmp_path / "units"
    for name in ("alpha", "beta"):
        write_unit(
            units,
            name,
            f"""
            [service]
            command = {SLEEPER}
            start_seconds = 0.1
            restart_delay = 0.05
            """,
        )
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("alpha", "RUNNING")
        daemon.wait_state("beta", "RUNNING")
        pid = daemon.ctl_json("status", "beta")["units"][0]["pid"]
        env = f"DYNSUP_TEST_SESSION={os.environ['DYNSUP_TEST_SESSION']}"
        with tmux(
            [
                "env",
                "-u",
                "COLUMNS",
                "-u",
                "LINES",
                env,
                DYNSUPCTL,
                "--socket",
                str(daemon.socket),
                "top",
            ]
        ) as run:
            screen = wait_pane(run, lambda s: "2/2 running" in s and "RUNNING" in row(s, "beta"))
            assert "UNIT" in screen and "RESTARTS" in screen and "MEM" in screen
            assert str(pid) in row(screen, "beta")
            os.kill(pid, signal.SIGKILL)
            # The restart shows up: a new pid and one restart, from the event stream.
            screen = wait_pane(
                run,
                lambda s: (
                    "RUNNING" in row(s, "beta")
                    and str(pid) not in row(s, "beta")
                    and " 1 " in row(s, "beta")
                ),
            )
            assert "M " in row(screen, "alpha")  # memory measured (e.g. "9.1M")
            run("send-keys", "-t", "top", "q")
            deadline = time.monotonic() + 30
            while run("has-session", "-t", "top").returncode == 0:
                assert time.monotonic() < deadline, "top did not quit on q"
                time.sleep(0.1)  # waiting for tmux to notice the pane's exit
