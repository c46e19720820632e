"""`tail -f UNIT` written by the agent that holds the rings, not relayed by the daemon.

Both agent modes: the agent process (the default; the client's socket is
handed to it over a connection of its own) and the in-process agent. What
must hold: the follower sees the output across a restart of the unit, in
order; a client that leaves ends the agent's follow (no descriptor or
connection left behind in the agent); a daemon that stops ends the follow
(the client sees the end of the stream, not a hang).
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from dynsup.agent_wire import FOLLOW

from .daemon_helpers import DYNSUPCTL, Dynsupd, py_command, run_dynsupd, write_unit

TICKER = py_command("""
    import sys, time
    for n in range(1_000_000):
        print("tick", n, flush=True)
        time.sleep(0.02)
""")
MODES = ["process", "inprocess"]


def ticker_units(tmp_path: Path) -> Path:
    units = tmp_path / "units"
    write_unit(
        units,
        "ticker",
        f"""
        [service]
        command = {TICKER}
        stop_signal = "SIGKILL"
        """,
    )
    return units


class Follower:
    """`dynsupctl tail -f ticker`, its stdout collected by a thread."""

    def __init__(self, daemon: Dynsupd) -> None:
        self.proc = subprocess.Popen(
            [DYNSUPCTL, "--socket", str(daemon.socket), "tail", "-f", "ticker"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = bytearray()
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(1 << 16):  # type: ignore[attr-defined]
            self.out.extend(chunk)

    def ticks(self) -> list[int]:
        return [int(n) for n in re.findall(rb"^tick (\d+)$", bytes(self.out), re.M)]

    def wait_for(self, check, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"tail -f never showed {what}: {bytes(self.out)!r}"
            time.sleep(0.05)  # polling what the follower received, bounded by the deadline

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        self._reader.join(30)
        return code


def agent_process(daemon: Dynsupd, mode: str) -> psutil.Process:
    if mode == "inprocess":
        return psutil.Process(daemon.proc.pid)
    event = daemon.wait_event(lambda e: e.get("event") in ("agent.started", "agent.found"))
    return psutil.Process(event["pid"])


def sockets_of(process: psutil.Process) -> int:
    return sum(1 for fd in os.listdir(f"/proc/{process.pid}/fd") if _is_socket(process.pid, fd))


def _is_socket(pid: int, fd: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    except OSError:
        return False


@pytest.mark.parametrize("mode", MODES)
def test_a_follower_sees_the_unit_across_its_restart_and_leaving_frees_the_agent(
    tmp_path: Path, mode: str
) -> None:
    with run_dynsupd(tmp_path, ticker_units(tmp_path), env={"DYNSUP_AGENT": mode}) as daemon:
        daemon.wait_state("ticker", "RUNNING")
        agent = agent_process(daemon, mode)
        idle_sockets = sockets_of(agent)
        follower = Follower(daemon)
        try:
            follower.wait_for(lambda: len(follower.ticks()) >= 5, "five ticks")
            # The follow is served by the agent: it holds the client's socket now.
            assert sockets_of(agent) > idle_sockets
            assert daemon.ctl("restart", "ticker").returncode == 0
            # The new process starts again from tick 0, in the same stream.
            follower.wait_for(
                lambda: any(b < a for a, b in itertools.pairwise(follower.ticks())),
                "the restarted unit's first ticks",
            )
        finally:
            assert follower.close() == 0
        ticks = follower.ticks()
        # In order within each life of the process: a run of consecutive numbers,
        # then 0, 1, 2 ... again.
        drops = [(a, b) for a, b in itertools.pairwise(ticks) if b != a + 1]
        assert len(drops) == 1 and drops[0][1] == 0, drops
        # The client left: the agent's follow ended and let its socket go.
        deadline = time.monotonic() + 30
        while sockets_of(agent) > idle_sockets:
            assert time.monotonic() < deadline, "the agent kept the follower's socket"
            time.sleep(0.05)  # polling /proc, bounded by the deadline


@pytest.mark.parametrize("mode", MODES)
def test_a_daemon_that_stops_ends_the_follow(tmp_path: Path, mode: str) -> None:
    with run_dynsupd(tmp_path, ticker_units(tmp_path), env={"DYNSUP_AGENT": mode}) as daemon:
        daemon.wait_state("ticker", "RUNNING")
        follower = Follower(daemon)
        try:
            follower.wait_for(lambda: len(follower.ticks()) >= 3, "three ticks")
            assert daemon.stop() == 0
            # The stream ends: the client exits by itself, without a signal.
            follower.proc.wait(30)
        finally:
            follower.close()


BOTH_STREAMS = py_command("""
    import sys, time
    for n in range(1_000_000):
        print("out", n, flush=True)
        print("err", n, file=sys.stderr, flush=True)
        time.sleep(0.02)
""")


def test_a_follow_of_both_streams_heads_each_stream_s_text(tmp_path: Path) -> None:
    """The raw events' bytes go out as printed, each stream's text under its
    `==> stream <==` header once both have spoken (as `tail` shows the past)."""
    units = tmp_path / "units"
    write_unit(units, "ticker", f"[service]\ncommand = {BOTH_STREAMS}\nstop_signal = 'SIGKILL'\n")
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("ticker", "RUNNING")
        follower = Follower(daemon)
        try:
            follower.wait_for(lambda: bytes(follower.out).count(b"\nerr ") >= 10, "ten err lines")
        finally:
            assert follower.close() == 0
    stream = None
    seen = {"out": 0, "err": 0}
    for line in bytes(follower.out).decode().splitlines():
        if line.startswith("==> "):
            stream = line.removeprefix("==> ").removesuffix(" <==")
            continue
        if stream is None:  # before both have spoken: the first stream's text as is
            continue
        kind = line.split()[0]
        assert (kind, stream) in (("out", "stdout"), ("err", "stderr")), (line, stream)
        seen[kind] += 1
    assert seen["out"] >= 5 and seen["err"] >= 5, seen


def test_a_malformed_follow_handed_to_the_agent_costs_that_connection_only(
    tmp_path: Path,
) -> None:
    """The agent process's socket takes a follow handed over (the byte F and a
    descriptor, then one frame). Garbage there (positions that are no mapping)
    must end that connection, not the agent, whose death is every unit's."""
    with run_dynsupd(tmp_path, ticker_units(tmp_path), env={"DYNSUP_AGENT": "process"}) as daemon:
        daemon.wait_state("ticker", "RUNNING")
        agent = agent_process(daemon, "process")
        pid = daemon.ctl_json("status")["units"][0]["pid"]
        client, ours = socket.socketpair()
        with client, ours, socket.socket(socket.AF_UNIX) as side:
            side.connect(str(tmp_path / "state" / "agent.sock"))
            socket.send_fds(side, [FOLLOW], [client.fileno()])
            frame = pickle.dumps((1, "ticker", 5, True, True))
            side.sendall(struct.pack(">I", len(frame)) + frame)
            side.settimeout(30)
            assert side.recv(1) == b""  # the agent closed this connection
        assert agent.is_running()
        assert daemon.ctl_json("status")["units"][0]["pid"] == pid
        # And it still serves a follow.
        follower = Follower(daemon)
        try:
            follower.wait_for(lambda: len(follower.ticks()) >= 3, "three ticks")
        finally:
            assert follower.close() == 0
