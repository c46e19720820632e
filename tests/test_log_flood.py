"""A unit printing as fast as it can while `dynsupctl tail -f` follows: bounded memory.

The rates are bench/log_flood.py's business; this checks the behaviour: the
RSS of the daemon and of the agent process that holds the rings and serves
the follower stays bounded (the rings and malloc's arenas do not grow with
what was printed), the follower gets a stream it can trust (every byte
printed is either received, in order and once, or announced as
"[N bytes missed]"), and the daemon serves on afterwards.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import psutil

from .daemon_helpers import DYNSUPCTL, py_command, run_dynsupd, write_unit

SECONDS = 5
GROWTH_LIMIT = 48 << 20  # seen: 8-15 MiB; before the fixes it grew by 100+ MiB in 10 s

FLOOD = py_command(f"""
    import sys, time
    line = "x" * 86
    n = 0
    end = time.monotonic() + {SECONDS}
    while time.monotonic() < end:
        for _ in range(1000):
            sys.stdout.write("%012d %s\\n" % (n, line))
            n += 1
    sys.stdout.write("wrote %d lines\\n" % n)
""")


def exited(event: dict) -> bool:
    return event.get("event") == "unit.state" and event.get("new") == "EXITED"


def test_a_flood_with_a_follower_keeps_the_daemon_bounded(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(
        units,
        "flood",
        f"""
        [unit]
        autostart = false
        [service]
        command = {FLOOD}
        restart = "no"
        start_seconds = 0
        """,
    )
    with run_dynsupd(tmp_path, units) as daemon:
        event = daemon.wait_event(lambda e: e.get("event") in ("agent.started", "agent.found"))
        processes = [psutil.Process(daemon.proc.pid), psutil.Process(event["pid"])]

        def rss() -> list[int]:
            return [p.memory_info().rss for p in processes]

        before = rss()
        follower = subprocess.Popen(
            [DYNSUPCTL, "--socket", str(daemon.socket), "tail", "-f", "flood"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        got, notices = bytearray(), bytearray()

        def read(stream: IO[bytes], into: bytearray) -> None:
            while chunk := stream.read1(1 << 16):  # type: ignore[attr-defined]
                into.extend(chunk)

        readers = [
            threading.Thread(target=read, args=(follower.stdout, got)),
            threading.Thread(target=read, args=(follower.stderr, notices)),
        ]
        for reader in readers:
            reader.start()

        def missed() -> int:
            return sum(int(n) for n in re.findall(rb"\[(\d+) bytes missed\]", bytes(notices)))

        try:
            assert daemon.ctl("start", "--no-wait", "flood").returncode == 0
            highest = before
            deadline = time.monotonic() + SECONDS + 120
            while not any(exited(e) for e in daemon.events()):
                highest = list(map(max, highest, rss()))
                assert time.monotonic() < deadline, "the flood did not end"
                time.sleep(0.1)  # sampling the daemon's RSS, bounded by the deadline
            # The ring ends with the last lines, in order, each whole.
            last = daemon.ctl("tail", "-n", "11", "flood").stdout.splitlines()
            lines = int(re.fullmatch(r"wrote (\d+) lines", last[-1])[1])  # type: ignore[index]
            assert [int(line.split()[0]) for line in last[:-1]] == list(range(lines - 10, lines))
            printed = lines * 100 + len(last[-1]) + 1
            # Let the follower catch up with the end.
            deadline = time.monotonic() + 30
            while len(got) + missed() < printed and time.monotonic() < deadline:
                time.sleep(0.1)  # the follower drains the last events, bounded by the deadline
        finally:
            follower.send_signal(signal.SIGINT)
            assert follower.wait(30) == 0
            for reader in readers:
                reader.join(30)
        assert daemon.ctl("status", "flood").returncode == 3  # EXITED: served after the flood

    for low, high in zip(before, highest, strict=True):
        assert high - low < GROWTH_LIMIT, (before, highest)
    # The follower got the flood, never a byte twice: what it got plus the
    # gaps it was told of is what was printed, and between gaps the lines
    # it got are consecutive.
    assert len(got) > 0 and len(got) + missed() == printed, (len(got), missed(), printed)
    numbers = [int(line[:12]) for line in bytes(got).split(b"\n") if len(line) == 99]
    breaks = sum(1 for a, b in itertools.pairwise(numbers) if b != a + 1)
    assert breaks <= len(re.findall(rb"bytes missed", bytes(notices))), breaks
