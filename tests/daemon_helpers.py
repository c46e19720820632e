"""Run a real dynsupd (and dynsupctl) in tests."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynsup.dynamo.ports import model_blocks, worker_ports

BIN = Path(sys.executable).parent
DYNSUPD = str(BIN / "dynsupd")
DYNSUPCTL = str(BIN / "dynsupctl")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, also: int | None = None) -> int:
    """A port the OS says is free; with ``also``, port + also must be free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if also is None or (port + also <= 65535 and port_is_free(port + also)):
            return port
    raise RuntimeError("no free port pair found")


def free_port_base(unit: str, roles: list[tuple[str, int]]) -> int:
    """A [dynamo] port_base (worker ports stay below 32768) whose worker ports are free."""
    for _ in range(200):
        base = random.randrange(22000, 30000)
        block = model_blocks([unit], base)[unit]
        ports = [
            port
            for role, count in roles
            for replica in range(count)
            for port in worker_ports(block, role, replica, 1).all(1)
        ]
        if all(port_is_free(port) for port in ports):
            return base
    raise RuntimeError("no free port_base found")


def write_unit(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(textwrap.dedent(body))
    return path


def py_command(code: str) -> str:
    """A TOML array literal running code with this interpreter."""
    return json.dumps([sys.executable, "-c", textwrap.dedent(code)])


class Dynsupd:
    def __init__(self, proc: subprocess.Popen[str], socket: Path, stderr: Path) -> None:
        self.proc = proc
        self.socket = socket
        self.stderr_path = stderr

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DYNSUPCTL, "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ctl_json(self, *args: str) -> dict:
        done = self.ctl("--json", *args)
        assert done.returncode in (0, 3), done.stderr
        return json.loads(done.stdout)

    def events(self) -> list[dict]:
        out = []
        for line in self.stderr_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_event(self, predicate, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            assert self.proc.poll() is None, f"dynsupd exited: {self.stderr_path.read_text()}"
            time.sleep(0.05)  # polling the daemon's log file, bounded by the deadline
        raise AssertionError(f"no such event within {timeout}s:\n{self.stderr_path.read_text()}")

    def wait_state(self, unit: str, state: str, timeout: float = 60) -> dict:
        return self.wait_event(
            lambda e: (
                e.get("event") == "unit.state" and e.get("unit") == unit and e.get("new") == state
            ),
            timeout,
        )

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextmanager
def run_dynsupd(
    tmp: Path, *unit_dirs: Path, extra: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[Dynsupd]:
    socket = tmp / "dynsup.sock"
    state = tmp / "state"
    stderr = tmp / "dynsupd.log"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [
                DYNSUPD,
                "--socket",
                str(socket),
                "--state-dir",
                str(state),
                "--log-format",
                "json",
                *(extra or []),
                *map(str, unit_dirs),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            env={**os.environ, **(env or {})},
        )
    daemon = Dynsupd(proc, socket, stderr)
    try:
        daemon.wait_event(lambda e: e.get("event") == "daemon.started")
        yield daemon
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
