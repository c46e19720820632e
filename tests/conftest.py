"""Shared fixtures. Every test is checked for leftover processes.

The session marks its environment with DYNSUP_TEST_SESSION, which every
process a test starts inherits (directly or through dynsupd). After each
test, a process carrying the mark that did not exist before the test is a
leak: the test fails and the leftover is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

pytest_plugins = ["tests.journald_fixture"]

MARK = "DYNSUP_TEST_SESSION"
os.environ.setdefault(MARK, uuid.uuid4().hex)

# A runner that starts the suite in the background (CI) hands it SIGINT
# ignored, and an ignored signal is inherited across exec: every dynsupctl a
# test starts would then ignore the Ctrl-C the test sends it (as a terminal
# would) and hang. Catch it here as an interactive run does, so that the
# processes the tests start get SIGINT's default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _marked_processes() -> dict[int, psutil.Process]:
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(MARK) == os.environ[MARK]:
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return found


def _alive(procs: dict[int, psutil.Process]) -> dict[int, psutil.Process]:
    alive = {}
    for pid, proc in procs.items():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive[pid] = proc
        except psutil.Error:
            continue
    return alive


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = set(_marked_processes())
    yield
    deadline = time.monotonic() + 5.0
    leftovers = {}
    while time.monotonic() < deadline:
        leftovers = _alive({p: q for p, q in _marked_processes().items() if p not in before})
        if not leftovers:
            break
        time.sleep(0.05)  # waiting for processes outside our control to finish exiting
    for proc in leftovers.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not leftovers, "processes left behind: " + ", ".join(
        f"{p.pid} {_cmdline(p)}" for p in leftovers.values()
    )


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:120]
    except psutil.Error:
        return "?"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
