"""A real journald for tests: the host's, or one this session starts.

Import the fixtures into a conftest (``from tests.journald_fixture import
journald, journald_instance``) or a test module.

Where no journald listens on /run/systemd/journal/socket (containers,
systemd not PID 1), the session starts ``systemd-journald <namespace>``
with a namespace of its own (``dynsup-test-<pid>-<random>``). A journal namespace
gets its own socket, /run/systemd/journal.<namespace>/socket, and its own
files, read with ``journalctl --namespace``: sessions that run at the same
time never share (or stop) each other's journald, and the host's journal
is left alone. It runs as root, needs no systemd as PID 1 and no
configuration. Its files are removed when the session ends. (Such an
instance exits after 30 s without traffic unless a client stays
connected, so the fixture holds one stream connection open.)
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from dynsup.logs.journald import JOURNAL_SOCKET, journal_is_live

JOURNALD = "/lib/systemd/systemd-journald"
_START_TIMEOUT = 10.0
_POLL = 0.02  # journald has no "entry stored" notification; poll journalctl


@dataclass(frozen=True)
class Journald:
    """A live journald: where to send entries and how to read them back."""

    socket_path: str
    namespace: str | None  # None: the host's own journal

    def journalctl_argv(self, *args: str) -> list[str]:
        ns = [f"--namespace={self.namespace}"] if self.namespace else []
        return ["journalctl", "--no-pager", *ns, *args]

    def entries(
        self, identifier: str, *, count: int = 1, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """The entries with SYSLOG_IDENTIFIER=identifier, as ``journalctl -o json`` gives them.

        Waits until at least ``count`` are stored or ``timeout`` passes, and
        returns what is there then. Fields over 4 KiB come whole (``--all``);
        a value that is not UTF-8 comes as a list of byte values.
        """
        argv = self.journalctl_argv("-t", identifier, "-o", "json", "--all")
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(argv, capture_output=True, check=False).stdout
            found = [json.loads(line) for line in out.splitlines() if line.strip()]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(_POLL)


def _start(namespace: str, log_path: str) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [JOURNALD, namespace],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A bare environment: journald needs none, and without the test
            # session's mark the per-test leak check does not take it for a
            # process a test left behind.
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            start_new_session=True,  # stopped by teardown, not by the terminal's ^C
        )


def _stop(proc: subprocess.Popen[bytes], namespace: str) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # Its sockets and journal files; the namespace name is this session's own.
    for path in [
        f"/run/systemd/journal.{namespace}",
        *glob.glob(f"/run/log/journal/*.{namespace}"),
        *glob.glob(f"/var/log/journal/*.{namespace}"),
    ]:
        shutil.rmtree(path, ignore_errors=True)


class JournaldUnavailable(RuntimeError):
    """No journald is live and none can be started here."""


@contextlib.contextmanager
def live_journald(prefix: str = "dynsup-test") -> Iterator[Journald]:
    """The host's journald when it is live, else one started in a namespace of its own."""
    if journal_is_live(JOURNAL_SOCKET):
        yield Journald(JOURNAL_SOCKET, None)
        return
    if not os.access(JOURNALD, os.X_OK) or shutil.which("journalctl") is None:
        raise JournaldUnavailable(
            f"no live journald and no {JOURNALD} to start (apt-get install systemd)"
        )
    if os.geteuid() != 0:
        raise JournaldUnavailable("no live journald, and starting one needs root")
    # Unique even when two conftests register the fixture in one session.
    namespace = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    socket_path = f"/run/systemd/journal.{namespace}/socket"
    with tempfile.TemporaryDirectory(prefix="dynsup-journald-") as tmp:
        log_path = os.path.join(tmp, "journald.log")
        proc = _start(namespace, log_path)
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            while not journal_is_live(socket_path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(log_path, errors="replace") as f:
                        raise JournaldUnavailable(
                            f"systemd-journald {namespace} did not start:\n{f.read()}"
                        )
                time.sleep(_POLL)
            # A namespace instance exits after 30 s without traffic unless a
            # client stays connected: hold a stdout stream open (and idle).
            keepalive = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            keepalive.connect(os.path.join(os.path.dirname(socket_path), "stdout"))
            with keepalive:
                yield Journald(socket_path, namespace)
            if proc.poll() is not None:
                with open(log_path, errors="replace") as f:
                    warnings.warn(
                        f"systemd-journald {namespace} exited early ({proc.returncode}):\n"
                        + f.read(),
                        stacklevel=1,
                    )
        finally:
            with contextlib.suppress(OSError):
                _stop(proc, namespace)


@pytest.fixture(scope="session")
def journald_instance() -> Iterator[Journald]:
    """The host's journald when it is live, else one started for this session."""
    try:
        with live_journald() as instance:
            yield instance
    except JournaldUnavailable as exc:  # raised before the yield only
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def journald(journald_instance: Journald) -> str:
    """The socket path of a live journald (see `journald_instance` to read entries back)."""
    return journald_instance.socket_path
