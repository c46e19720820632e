"""Chaos: a running stack under a steady stream of requests, and everything an
operator or a fault can do to its units, one after another.

The demo stack (Dynamo frontend and two mocker workers, file discovery) plus
two plain services: ``forker`` (forks short-lived children in a loop) and
``stubborn`` (ignores SIGTERM). Each unit is killed, stopped, SIGSTOPped,
has its port taken; ``forker`` is stopped mid-fork; two ``update``s run at
once; the daemon gets SIGHUP. At the end the daemon is alive, every wanted
unit is RUNNING, the endpoint serves again, and the orderly stop leaves no
process behind. Requests may fail while units are down (no liveness or
drain is asserted here); the daemon must never die, hang or lie.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .daemon_helpers import DYNSUPCTL, Dynsupd, py_command, write_unit
from .test_demo_stack import (
    HEAL_TIMEOUT,
    START_TIMEOUT,
    chat_ok,
    client,
    make_stack,
    running_stack,
    status,
    until_serving,
    wait_back,
)

pytestmark = pytest.mark.dynamo

FORKER = """
import os, time
while True:
    if os.fork() == 0:
        time.sleep(0.01)
        os._exit(0)
    time.sleep(0.005)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True: time.sleep(60)
"""


def plain_unit(units: Path, name: str, code: str, stop_timeout: float) -> None:
    write_unit(
        units,
        name,
        f"""
        [service]
        command = {py_command(code)}
        start_seconds = 0
        stop_timeout = {stop_timeout}
        restart_delay = 0.05
        restart_delay_max = 0.5
        start_limit_burst = 1000
        """,
    )


class Load:
    """A steady stream of chat requests in a thread, counting the outcomes."""

    def __init__(self, api) -> None:  # type: ignore[no-untyped-def]
        self.api = api
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if chat_ok(self.api):
                self.ok += 1
            else:
                self.failed += 1
            self._stop.wait(0.1)  # about 10 requests a second

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def ctl_ok(daemon: Dynsupd, *args: str) -> None:
    done = daemon.ctl(*args, timeout=120)
    assert done.returncode in (0, 3), f"{args}: {done.stdout}{done.stderr}"
    assert daemon.proc.poll() is None


def wait_all_running(daemon: Dynsupd, names: list[str], deadline: float) -> None:
    pace = threading.Event()  # never set: wait() is the pacing
    while True:
        states = {name: unit["state"] for name, unit in status(daemon).items()}
        if all(states[name] == "RUNNING" for name in names):
            return
        assert daemon.proc.poll() is None
        assert time.monotonic() < deadline, states
        pace.wait(0.1)  # polling the daemon's status, bounded by the deadline


def events_so_far(daemon: Dynsupd) -> int:
    return len(daemon.events())


def test_chaos_leaves_the_daemon_alive_every_unit_running_and_nothing_behind(
    tmp_path: Path,
) -> None:
    stack = make_stack(tmp_path)
    plain_unit(stack.units, "forker", FORKER, stop_timeout=2)
    plain_unit(stack.units, "stubborn", STUBBORN, stop_timeout=0.5)
    stack.workers.extend(["forker", "stubborn"])
    with running_stack(tmp_path, stack) as (daemon, units), Load(client(stack)) as load:
        # kill -9 of a worker leader and of the frontend: back under new pids.
        for name in ("tiny-0", "frontend"):
            since = events_so_far(daemon)
            os.kill(status(daemon)[name]["pid"], signal.SIGKILL)
            wait_back(daemon, name, units[name]["pid"], since)

        # Stop and start by hand; stubborn needs its SIGKILL.
        ctl_ok(daemon, "stop", "tiny-1", "stubborn")
        assert {status(daemon)[n]["state"] for n in ("tiny-1", "stubborn")} == {"STOPPED"}
        ctl_ok(daemon, "start", "tiny-1", "stubborn")

        # SIGSTOP: a stopped forker is stopped (SIGKILL reaches a stopped group),
        # a stopped worker is continued.
        forker_pid = status(daemon)["forker"]["pid"]
        os.kill(forker_pid, signal.SIGSTOP)
        ctl_ok(daemon, "stop", "forker")
        ctl_ok(daemon, "start", "forker")
        worker_pid = status(daemon)["tiny-1"]["pid"]
        os.killpg(worker_pid, signal.SIGSTOP)
        os.killpg(worker_pid, signal.SIGCONT)

        # A forker stopped while forking, several times.
        for _ in range(3):
            ctl_ok(daemon, "restart", "forker")

        # The frontend's port taken while it is down: BACKOFF, then back once freed.
        ctl_ok(daemon, "stop", "frontend")
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("0.0.0.0", stack.frontend_port))
            squatter.listen()
            since = events_so_far(daemon)
            ctl_ok(daemon, "start", "--no-wait", "frontend")
            daemon.wait_event(
                lambda e: (
                    e.get("event") == "unit.state"
                    and e.get("unit") == "frontend"
                    and e.get("new") == "BACKOFF"
                    and "already in use" in e.get("reason", "")
                ),
                timeout=START_TIMEOUT,
            )
            assert len(daemon.events()) > since
        daemon.wait_state("frontend", "RUNNING", timeout=START_TIMEOUT)

        # Two updates at once, with a changed unit that is slow to stop.
        plain_unit(stack.units, "stubborn", STUBBORN, stop_timeout=0.6)
        updates = [
            subprocess.Popen(
                [DYNSUPCTL, "--socket", str(daemon.socket), "update"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for update in updates:
            assert update.wait(120) == 0, update.stderr.read()

        # SIGHUP: reread and apply (nothing changed now), the daemon lives on.
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_event(lambda e: e.get("event") == "daemon.reloaded")

        # Every wanted unit RUNNING again, the endpoint serving, the daemon alive.
        wait_all_running(daemon, stack.all_units, time.monotonic() + HEAL_TIMEOUT)
        until_serving(load.api, time.monotonic() + HEAL_TIMEOUT)
        assert daemon.proc.poll() is None
    assert load.ok > 0
