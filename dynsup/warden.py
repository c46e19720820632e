"""The warden: a small process that kills what an agent started once the agent is gone.

Units run as session leaders in their own process groups, so when the
process hosting their agent dies without clean-up (SIGKILL, OOM kill, a
segfault) they are re-parented away and run on as orphans: a model server
holding its GPU memory and ports, which the next daemon cannot start again.

Every child of an agent inherits ``DYNSUP_AGENT=<mark>``. The warden,
started by the agent in a session of its own, blocks reading a pipe whose
only writer is the agent; when the agent dies the pipe closes and the
warden SIGKILLs every process carrying the mark, until a scan finds none.
It is stdlib Python reading /proc, so it needs nothing of dynsup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import psutil

MARK_VAR = "DYNSUP_AGENT"

_SCRIPT = r"""
import os, signal, sys, time
var, mark = sys.argv[1], sys.argv[2]
entry = f"{var}={mark}".encode()
sys.stdin.buffer.read()  # returns at EOF: the agent is gone (or shut down)
def marked():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if entry in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass
    return found
for _ in range(500):  # again until a scan finds nothing: a victim may fork meanwhile
    pids = marked()
    if not pids:
        break
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.01)
"""


class Warden:
    """Started by the agent's host process; kills the mark's processes when that process dies."""

    def __init__(self, mark: str) -> None:
        self.mark = mark
        self._process = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, MARK_VAR, mark],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Not marked itself, and out of the host's group: a Ctrl-C or a
            # group kill aimed at the daemon does not take the warden along.
            env={k: v for k, v in os.environ.items() if k != MARK_VAR},
            start_new_session=True,
            close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def release(self) -> None:
        """An orderly end (blocking): the warden sweeps once more, then exits."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()
        self._process.wait()


def kill_marked(matches: Callable[[str], bool]) -> None:
    """SIGKILL every process whose mark satisfies matches, until none is left."""
    for _ in range(100):
        victims = []
        for proc in psutil.process_iter():
            try:
                mark = proc.environ().get(MARK_VAR)
            except (psutil.Error, OSError):
                continue
            if mark is not None and matches(mark):
                victims.append(proc)
        if not victims:
            return
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=1.0)
