"""The warden: a small process that kills what an agent started once the agent is gone.

The agent is the agent process (`agent_host`, the default without Ray),
the daemon itself (``agent = "inprocess"``) or a Ray agent actor. A daemon
that dies is not the agent's death in the first case: the units run on
and the next daemon adopts them; only the agent process's own death ends
them here.

Units run as session leaders in their own process groups, so when the
process hosting their agent dies without clean-up (SIGKILL, OOM kill, a
segfault) they are re-parented away and run on as orphans: a model server
holding its GPU memory and ports, which the next daemon cannot start again.

Every child of an agent inherits ``DYNSUP_AGENT=<mark>``. The warden,
started by the agent in a session of its own, blocks reading a pipe whose
only writer is the agent; when the agent dies the pipe closes and the
warden kills, until a scan finds none:

* with cgroups, everything in the agent's cgroup subtree (``cgroup.kill``
  on it): nothing escapes, whatever it did with sessions or environment;
* every process carrying the mark;
* every (pid, start time) the agent told it about as it saw them (the
  lineage of the fallback mode), so an escapee that cleared its
  environment dies too once the agent had seen it. What the agent never
  saw without cgroups (forked, orphaned and re-exec'ed with an empty
  environment between two of its scans) the warden cannot find: orphans
  of a dead daemon are re-parented to init, and nothing ties them to it.

It is stdlib Python reading /proc, so it needs nothing of dynsup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable

import psutil

MARK_VAR = "DYNSUP_AGENT"

_SCRIPT = r"""
import os, signal, sys, time
var, mark = sys.argv[1], sys.argv[2]
entry = f"{var}={mark}".encode()
cgroups, known = [], set()
for line in sys.stdin.buffer:  # ends at EOF: the agent is gone (or shut down)
    kind, _, rest = line.decode().strip().partition(" ")
    if kind == "cgroup":
        cgroups.append(rest)
    elif kind == "pid":
        known.add(tuple(rest.split()))
def start_of(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return None if fields[0] == b"Z" else fields[19].decode()  # a zombie is dead already
def marked():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                if (name, start_of(name)) in known:
                    found.append(int(name))
                    continue
                with open(f"/proc/{name}/environ", "rb") as f:
                    if entry in f.read().split(b"\0"):
                        found.append(int(name))
            except (OSError, IndexError):
                pass
    return found
def populated(path):
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return "populated 1" in f.read()
    except OSError:
        return False
for path in cgroups:
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        pass
for _ in range(500):  # again until a scan finds nothing: a victim may fork meanwhile
    pids = marked()
    if not pids and not any(populated(p) for p in cgroups):
        break
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.01)
for path in cgroups:  # leaves first, then the agent's own
    for leaf in (os.scandir(path) if os.path.isdir(path) else []):
        if leaf.is_dir():
            try:
                os.rmdir(leaf.path)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass
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

    def guard_cgroup(self, path: str) -> None:
        """Kill everything below this cgroup when the agent dies."""
        self._tell(f"cgroup {path}")

    def guard_pids(self, known: Iterable[tuple[int, int]]) -> None:
        """Kill these (pid, start ticks) too, if still the same processes."""
        self._tell("".join(f"pid {pid} {start}\n" for pid, start in known).rstrip("\n"))

    def _tell(self, text: str) -> None:
        if not text or self._process.stdin is None or self._process.stdin.closed:
            return
        # The warden reads at once, and lines are short: a full pipe means it died.
        with contextlib.suppress(OSError):
            self._process.stdin.write(text.encode() + b"\n")
            self._process.stdin.flush()

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
