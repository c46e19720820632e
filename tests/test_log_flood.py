"""A unit printing as fast as it can while `dynsupctl tail -f` follows: bounded memory.

The rates are bench/log_flood.py's business; this checks the behaviour: the
daemon's RSS stays bounded (the rings, the follower's queue and malloc's
arenas do not grow with what was printed), the follower gets a stream it
can trust (the text it got is the end of what was printed, gaps announced
as "[N bytes missed]"), and the daemon serves on afterwards.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

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
        rss = psutil.Process(daemon.proc.pid).memory_info
        before = rss().rss
        follower = subprocess.Popen(
            [DYNSUPCTL, "--socket", str(daemon.socket), "tail", "-f", "flood"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        got = bytearray()

        def read() -> None:
            while chunk := follower.stdout.read1(1 << 16):  # type: ignore[union-attr]
                got.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            assert daemon.ctl("start", "--no-wait", "flood").returncode == 0
            highest = before
            deadline = time.monotonic() + SECONDS + 120
            while not any(
                e.get("event") == "unit.state"
                and e.get("unit") == "flood"
                and e.get("new") == "EXITED"
                for e in daemon.events()
            ):
                highest = max(highest, rss().rss)
                assert time.monotonic() < deadline, "the flood did not end"
                time.sleep(0.1)  # sampling the daemon's RSS, bounded by the deadline
            wrote = re.search(rb"wrote (\d+) lines\n", bytes(got[-200:]))
            deadline = time.monotonic() + 30
            while wrote is None and time.monotonic() < deadline:
                time.sleep(0.1)  # the follower drains the last events
                wrote = re.search(rb"wrote (\d+) lines\n", bytes(got[-200:]))
        finally:
            follower.send_signal(signal.SIGINT)
            assert follower.wait(30) == 0
            reader.join(30)
        errors = follower.stderr.read().decode()  # type: ignore[union-attr]
        assert daemon.ctl("status", "flood").returncode == 3  # EXITED: served after the flood

    assert highest - before < GROWTH_LIMIT, (before, highest)
    assert wrote is not None, bytes(got[-200:])
    lines = int(wrote[1])
    # What the follower got ends with the last lines, in order, each whole.
    tail = bytes(got).split(b"\n")[-12:-2]
    numbers = [int(line.split()[0]) for line in tail]
    assert numbers == list(range(lines - 10, lines)), tail
    # Every byte printed reached the follower or was announced as missed.
    missed = sum(int(n) for n in re.findall(r"\[(\d+) bytes missed\]", errors))
    printed = lines * 100 + len(wrote[0])
    assert len(got) + missed >= printed
