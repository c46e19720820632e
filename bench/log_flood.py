#!/usr/bin/env python3
"""Log flood: a child printing as fast as it can, with `dynsupctl tail -f` following.

    .venv/bin/python bench/log_flood.py [--seconds 10] [--runs 1] [--journal auto|none]

A benchmark, not a test. The child is a Python loop writing 100-byte lines
to stdout (``sys.stdout.write``, Python's default block buffering) for
``--seconds``, then recording how many lines it wrote. Its rate is measured

* into /dev/null (started directly: the most it can do here);
* as a dynsup unit, its stdout a pipe read by the daemon's agent into the
  unit's ring buffer, the journal forwarder (one journald entry per line)
  and a ``dynsupctl tail -f`` follower whose output this script reads and
  counts, all at once.

* into a bare pipe of the same size (1 MiB) drained by a loop that does
  nothing else: what any supervisor that captures output could hope for.

Printed: the rates, the ratio to /dev/null (the target is at least 80 %), the daemon's
RSS (sampled every 0.2 s: before, highest, after) and what the follower got
(bytes, and the "[N bytes missed]" notices a slow follower is given instead
of slowing the child).

journald: ``auto`` (default) starts ``systemd-journald`` in a journal
namespace of its own when the host's is not live, as the tests do, and
points the daemon at it; ``none`` runs the daemon with no journal. Exit
status 0; 1 when the ratio is under 80 %; 2 when a run could not be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from dynsup.process import PIPE_SIZE  # noqa: E402
from tests.journald_fixture import JournaldUnavailable, live_journald  # noqa: E402

BIN = REPO / ".venv" / "bin"

CHILD = textwrap.dedent(
    """
    import sys, time
    result, seconds = sys.argv[1], float(sys.argv[2])
    line = "x" * 86
    write = sys.stdout.write
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            write(f"{n:012d} {line}\\n")  # 100 bytes
            n += 1
    sys.stdout.flush()
    open(result, "w").write(str(n))
    """
)
LINE_BYTES = 100


@dataclass
class Flood:
    lines: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.lines * LINE_BYTES / self.seconds / 1e6


def child_argv(tmp: Path, result: Path, seconds: float) -> list[str]:
    # A file, not -c: unit commands read braces as placeholders.
    script = tmp / "flood.py"
    script.write_text(CHILD)
    return [sys.executable, str(script), str(result), str(seconds)]


def run_child_to_devnull(tmp: Path, seconds: float) -> Flood:
    result = tmp / "null.count"
    subprocess.run(
        child_argv(tmp, result, seconds),
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return Flood(int(result.read_text()), seconds)


def run_child_into_bare_pipe(tmp: Path, seconds: float) -> Flood:
    """The child into a pipe as big as dynsup's, drained by a loop that does nothing else."""
    result = tmp / "pipe.count"
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    child = subprocess.Popen(child_argv(tmp, result, seconds), stdout=write_end)
    os.close(write_end)
    while os.read(read_end, 256 * 1024):
        pass
    os.close(read_end)
    child.wait()
    return Flood(int(result.read_text()), seconds)


@contextlib.contextmanager
def journald_socket() -> Iterator[str | None]:
    """A live journald's socket (the host's, or a namespace started as the tests do), or None."""
    try:
        with live_journald("dynsup-bench") as journal:
            print(f"journal: {journal.namespace or 'the host journal'}")
            yield journal.socket_path
    except JournaldUnavailable as exc:  # raised before the yield only
        print(f"journal: {exc}; running without")
        yield None


@dataclass
class DynsupRun:
    flood: Flood
    rss_before: int
    rss_max: int
    rss_after: int
    follower_bytes: int
    missed_notices: int
    missed_bytes: int
    cpu: dict[str, float]  # CPU seconds during the flood, per process


class Follower:
    """``dynsupctl tail -f flood``: counts what reaches its stdout and the missed notices."""

    def __init__(self, sock: Path) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "dynsupctl"), "--socket", str(sock), "tail", "-f", "flood"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.bytes = 0
        self.stderr = b""
        self._threads = [
            threading.Thread(target=self._count, daemon=True),
            threading.Thread(target=self._errors, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _count(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(1 << 16):
            self.bytes += len(chunk)

    def _errors(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def stop(self) -> tuple[int, int]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for thread in self._threads:
            thread.join(10)
        notices = [int(n) for n in re.findall(rb"\[(\d+) bytes missed\]", self.stderr)]
        return len(notices), sum(notices)


def run_under_dynsup(tmp: Path, seconds: float, journal: str | None, follow: bool) -> DynsupRun:
    units = tmp / "units"
    units.mkdir(exist_ok=True)
    result = tmp / "dynsup.count"
    result.unlink(missing_ok=True)
    argv = child_argv(tmp, result, seconds)
    (units / "flood.toml").write_text(
        f"[unit]\nautostart = false\n[service]\ncommand = {json.dumps(argv)}\n"
        'restart = "no"\nstart_seconds = 0\n'
    )
    sock = tmp / "dynsup.sock"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["DYNSUP_JOURNAL_SOCKET"] = journal or str(tmp / "no-journal")
    log = open(tmp / "dynsupd.log", "w")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen(
        [str(BIN / "dynsupd"), "--socket", str(sock), "--state-dir", str(tmp / "state"),
         "--log-format", "json", str(units)],
        stdout=subprocess.DEVNULL, stderr=log, env=env,
    )  # fmt: skip
    try:
        proc = psutil.Process(daemon.pid)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dynsupd did not start: {(tmp / 'dynsupd.log').read_text()}")
            time.sleep(0.05)
        rss_before = proc.memory_info().rss
        follower = Follower(sock) if follow else None
        watched = {"dynsupd": proc}
        if follower is not None:
            watched["dynsupctl tail -f"] = psutil.Process(follower.proc.pid)
        if journal is not None:
            watched.update({f"journald {p.pid}": p for p in journald_processes()})
        cpu_before = {name: cpu_seconds(p) for name, p in watched.items()}
        time.sleep(0.5)  # the follower is attached (it waits for the first output)
        started = subprocess.run(
            [str(BIN / "dynsupctl"), "--socket", str(sock), "start", "--no-wait", "flood"],
            capture_output=True, check=False,
        )  # fmt: skip
        if started.returncode != 0:
            raise SystemExit(f"start failed: {started.stdout!r} {started.stderr!r}")
        rss_max = rss_before
        deadline = time.monotonic() + seconds + 60
        while not result.exists():
            rss_max = max(rss_max, proc.memory_info().rss)
            if time.monotonic() > deadline:
                raise SystemExit("the flood did not finish")
            time.sleep(0.2)
        time.sleep(1.0)  # the follower drains what is left
        cpu = {name: cpu_seconds(p) - cpu_before[name] for name, p in watched.items()}
        notices, missed = follower.stop() if follower else (0, 0)
        rss_after = proc.memory_info().rss
        return DynsupRun(
            Flood(int(result.read_text()), seconds),
            rss_before, rss_max, rss_after, follower.bytes if follower else 0, notices, missed,
            cpu,
        )  # fmt: skip
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        log.close()


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def journald_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "systemd-journal"]


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--journal", choices=("auto", "none"), default="auto")
    parser.add_argument("--no-follow", action="store_true", help="no tail -f follower")
    args = parser.parse_args()
    if not (BIN / "dynsupd").exists():
        print("run bash scripts/setup.sh first", file=sys.stderr)
        return 2
    print(f"log flood: {os.cpu_count()} CPUs, {args.seconds:g} s per flood, 100-byte lines")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="dynsup-flood-") as name:
        tmp = Path(name)
        stack = contextlib.ExitStack()
        with stack:
            journal = stack.enter_context(journald_socket()) if args.journal == "auto" else None
            for run in range(1, args.runs + 1):
                null = run_child_to_devnull(tmp, args.seconds)
                bare = run_child_into_bare_pipe(tmp, args.seconds)
                got = run_under_dynsup(tmp, args.seconds, journal, not args.no_follow)
                ratio = got.flood.mb_per_s / null.mb_per_s
                ratios.append(ratio)
                print(
                    f"run {run}: /dev/null {null.mb_per_s:.1f} MB/s; bare 1 MiB pipe"
                    f" {bare.mb_per_s:.1f} MB/s ({bare.mb_per_s / null.mb_per_s:.0%});"
                    f" under dynsup {got.flood.mb_per_s:.1f} MB/s"
                    f" ({got.flood.lines:,} lines) = {ratio:.0%} of /dev/null"
                )
                print(
                    f"  dynsupd RSS: {mib(got.rss_before)} before, {mib(got.rss_max)} at most,"
                    f" {mib(got.rss_after)} after"
                )
                share = ", ".join(
                    f"{name} {seconds / args.seconds:.0%}" for name, seconds in got.cpu.items()
                )
                print(f"  CPU (of one core) during the flood: {share}")
                written = got.flood.lines * LINE_BYTES
                print(
                    f"  tail -f got {got.follower_bytes:,} of {written:,} bytes;"
                    f" {got.missed_notices} 'bytes missed' notices for {got.missed_bytes:,} bytes"
                )
    median = statistics.median(ratios)
    print(f"median ratio: {median:.0%} (target: at least 80 %)")
    return 0 if median >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
