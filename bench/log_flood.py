#!/usr/bin/env python3
"""Log flood: a child printing as fast as it can, under dynsup and under its peers.

    .venv/bin/python bench/log_flood.py [--seconds 10] [--runs 3] [--child block,line]
        [--only NAME,...] [--consumers]

A benchmark, not a test. The child is a Python loop writing 100-byte lines
for ``--seconds``, then recording how many it wrote; its rate is the figure.
It sets its own buffering (this environment's PYTHONUNBUFFERED=1 reaches it
through every supervisor): ``block`` writes through an 8 KiB buffer (a
Python program's default into a pipe), ``line`` flushes every line (one
``write()`` per line: line buffering, PYTHONUNBUFFERED, most loggers).

Sinks, run one after another in each run (interleaved, so that a noisy
neighbour hits all of them alike):

* ``/dev/null``, ``a file``: the child started directly;
* ``a bare pipe``: a 1 MiB pipe drained by a loop that does nothing else;
* ``supervisord``: supervisord 4.3 writing the program's stdout to its log
  file (defaults: 50 MB files, 10 backups);
* ``circus``: circusd with a ``FileStream`` (its pipe reader into a file);
* ``dynsup (rings + tail -f)``: a unit, with ``dynsupctl tail -f`` following
  it (its output read and counted by this script), no journald;
* ``dynsup + journald``: the same, and the daemon forwards to a real
  journald (a journal namespace started as the tests do when the host has
  none).

With ``--consumers``, dynsup also runs with each consumer alone: the rings
only, a log-line probe that never matches (the unit stays STARTING, every
line goes through the probe's subscription), journald only.

Peers are installed on first use into their own venvs (bench/.venv-supervisord,
bench/.venv-circus), never into the project's. Printed: per child mode, a
table of the child's median rate, its share of /dev/null, the min-max over
the runs, and the supervising daemon's CPU (share of one core during the
flood) and RSS (highest sampled); for dynsup with its agent process (the
default without Ray), that process's CPU too: it reads the child's pipes.
Exit status 0; 2 when a run could not be measured.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from dynsup.process import PIPE_SIZE  # noqa: E402
from tests.journald_fixture import JournaldUnavailable, live_journald  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from restart_latency import SV_REQUIREMENT, SV_VENV, ensure_venv  # noqa: E402
from stop_scale import CIRCUS_REQUIREMENT, CIRCUS_VENV  # noqa: E402

BIN = REPO / ".venv" / "bin"
PEERS = {  # the same venvs and versions as stop_scale.py and restart_latency.py
    "supervisord": (SV_VENV, SV_REQUIREMENT, "supervisord"),
    "circus": (CIRCUS_VENV, CIRCUS_REQUIREMENT, "circusd"),
}

CHILD = textwrap.dedent(
    """
    import sys, time
    result, seconds, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    # Buffering set here, not inherited: PYTHONUNBUFFERED may be in the environment.
    out = open(1, "w", buffering=8192 if mode == "block" else 1, closefd=False)
    line = "x" * 86
    write = out.write
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            write(f"{n:012d} {line}\\n")  # 100 bytes
            n += 1
    out.flush()
    open(result, "w").write(str(n))
    """
)
LINE_BYTES = 100


@dataclass
class Sample:
    mb_per_s: float
    cpu: float = 0.0  # the supervising daemon's CPU, share of one core
    rss_max: int = 0
    note: str = ""
    agent_cpu: float | None = None  # dynsup's agent process (it reads the pipes), same unit


class Bench:
    """One run's working directory and settings."""

    def __init__(self, tmp: Path, seconds: float, mode: str, journal: str | None) -> None:
        self.tmp = tmp
        self.seconds = seconds
        self.mode = mode
        self.journal = journal
        self.script = tmp / "flood.py"
        self.script.write_text(CHILD)

    def argv(self, result: Path) -> list[str]:
        return [sys.executable, str(self.script), str(result), str(self.seconds), self.mode]

    def result(self, name: str) -> Path:
        path = self.tmp / f"{name}.count"
        path.unlink(missing_ok=True)
        return path

    def rate(self, result: Path) -> float:
        return int(result.read_text()) * LINE_BYTES / self.seconds / 1e6

    def wait_result(
        self, result: Path, daemon: psutil.Process, agent: psutil.Process | None = None
    ) -> tuple[int, float, float | None]:
        """Wait for the child's count; the highest RSS of the daemon and its agent
        process together, the daemon's CPU share meanwhile, and the agent
        process's CPU share when there is one."""
        cpu_before = cpu_seconds(daemon)
        agent_before = cpu_seconds(agent) if agent is not None else 0.0
        started = time.monotonic()

        def rss() -> int:
            return sum(p.memory_info().rss for p in (daemon, agent) if p is not None)

        rss_max = rss()
        deadline = started + self.seconds + 60
        while not result.exists():
            rss_max = max(rss_max, rss())
            if time.monotonic() > deadline:
                raise SystemExit("the flood did not finish")
            time.sleep(0.1)  # sampling RSS; bounded by the deadline
        elapsed = time.monotonic() - started
        cpu = (cpu_seconds(daemon) - cpu_before) / elapsed
        agent_cpu = (cpu_seconds(agent) - agent_before) / elapsed if agent is not None else None
        return rss_max, cpu, agent_cpu


def agent_process(daemon: psutil.Process) -> psutil.Process | None:
    """dynsup's agent process (``python -m dynsup.agent_host``), started by the daemon
    in a session of its own; None when the agent runs inside the daemon."""
    for child in daemon.children():
        with contextlib.suppress(psutil.Error):
            if "dynsup.agent_host" in child.cmdline():
                return child
    return None


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system  # not its children's: the flood child is one


def wait_for(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the sinks -----------------------------------------------------------------


def devnull(b: Bench) -> Sample:
    result = b.result("null")
    subprocess.run(b.argv(result), stdout=subprocess.DEVNULL, check=True)
    return Sample(b.rate(result))


def a_file(b: Bench) -> Sample:
    result = b.result("file")
    out = b.tmp / "flood.out"
    with open(out, "wb") as f:
        subprocess.run(b.argv(result), stdout=f, check=True)
    out.unlink()
    return Sample(b.rate(result))


def bare_pipe(b: Bench) -> Sample:
    """The child into a pipe as big as dynsup's, drained by a loop that does nothing else."""
    result = b.result("pipe")
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    child = subprocess.Popen(b.argv(result), stdout=write_end)
    os.close(write_end)
    while os.read(read_end, PIPE_SIZE):
        pass
    os.close(read_end)
    child.wait()
    return Sample(b.rate(result))


def ensure_peer(name: str) -> Path:
    venv, requirement, program = PEERS[name]
    return ensure_venv(venv, requirement, program)


def supervisord(b: Bench) -> Sample:
    exe = ensure_peer("supervisord")
    work = b.tmp / "supervisord"
    work.mkdir(exist_ok=True)
    result = b.result("supervisord")
    conf = work / "supervisord.conf"
    conf.write_text(
        textwrap.dedent(f"""
        [supervisord]
        nodaemon=true
        logfile={work}/supervisord.log
        pidfile={work}/supervisord.pid
        childlogdir={work}
        [program:flood]
        command={" ".join(b.argv(result))}
        autostart=true
        autorestart=false
        startsecs=0
        stdout_logfile={work}/flood.log
        """)
    )
    proc = subprocess.Popen([str(exe), "-c", str(conf)], stdout=subprocess.DEVNULL)
    try:
        rss, cpu, _ = b.wait_result(result, psutil.Process(proc.pid))
    finally:
        stop(proc)
    for log in work.glob("flood.log*"):
        log.unlink()
    return Sample(b.rate(result), cpu, rss)


def circus(b: Bench) -> Sample:
    exe = ensure_peer("circus")
    work = b.tmp / "circus"
    work.mkdir(exist_ok=True)
    result = b.result("circus")
    conf = work / "circus.ini"
    conf.write_text(
        textwrap.dedent(f"""
        [circus]
        endpoint = ipc://{work}/ctl.sock
        pubsub_endpoint = ipc://{work}/pub.sock
        statsd = False
        [watcher:flood]
        cmd = {" ".join(b.argv(result))}
        numprocesses = 1
        respawn = False
        stdout_stream.class = FileStream
        stdout_stream.filename = {work}/flood.log
        """)
    )
    proc = subprocess.Popen(
        [str(exe), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        rss, cpu, _ = b.wait_result(result, psutil.Process(proc.pid))
    finally:
        stop(proc)
    (work / "flood.log").unlink(missing_ok=True)
    return Sample(b.rate(result), cpu, rss)


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

    def stop(self) -> int:
        """The bytes it was told it missed."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for thread in self._threads:
            thread.join(10)
        return sum(int(n) for n in re.findall(rb"\[(\d+) bytes missed\]", self.stderr))


def dynsup(*, follow: bool, journal: bool, probe: bool = False) -> Callable[[Bench], Sample]:
    def run(b: Bench) -> Sample:
        if journal and b.journal is None:
            return Sample(0.0, note="no journald")
        units = b.tmp / "units"
        units.mkdir(exist_ok=True)
        result = b.result("dynsup")
        ready = '[ready]\nlog = "never printed"\ntimeout = 600\n' if probe else ""
        (units / "flood.toml").write_text(
            f"[unit]\nautostart = false\n[service]\ncommand = {json.dumps(b.argv(result))}\n"
            f'restart = "no"\nstart_seconds = 0\n{ready}'
        )
        sock = b.tmp / "dynsup.sock"
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env["DYNSUP_JOURNAL_SOCKET"] = (b.journal if journal else None) or str(b.tmp / "none")
        with open(b.tmp / "dynsupd.log", "w") as log:
            daemon = subprocess.Popen(
                # DYNSUPD_PREFIX: e.g. "python -m cProfile -o FILE" to profile the daemon.
                [*os.environ.get("DYNSUPD_PREFIX", "").split(), str(BIN / "dynsupd"),
                 "--socket", str(sock), "--state-dir", str(b.tmp / "state"),
                 "--log-format", "json", str(units)],
                stdout=subprocess.DEVNULL, stderr=log, env=env,
            )  # fmt: skip
        try:
            wait_for(sock.exists, "dynsupd", daemon)
            follower = Follower(sock) if follow else None
            ctl = [str(BIN / "dynsupctl"), "--socket", str(sock)]
            subprocess.run([*ctl, "start", "--no-wait", "flood"], check=True, capture_output=True)
            # The agent process exists once `start` was answered: the daemon
            # serves its verbs only after its backend is open.
            supervisor = psutil.Process(daemon.pid)
            rss, cpu, agent_cpu = b.wait_result(result, supervisor, agent_process(supervisor))
            note = ""
            if follower is not None:
                written = int(result.read_text()) * LINE_BYTES
                # The follower drains the end; a gap it was told of never fills, so
                # stop once nothing came for a second (bounded by the deadline).
                deadline, seen, still = time.monotonic() + 30, -1, time.monotonic()
                while follower.bytes < written and time.monotonic() < deadline:
                    if follower.bytes != seen:
                        seen, still = follower.bytes, time.monotonic()
                    elif time.monotonic() - still > 1.0:
                        break
                    time.sleep(0.1)
                missed = follower.stop()
                note = f"tail -f got {follower.bytes / written:.1%}"
                note += f", told of {missed / written:.1%} missed" if missed else ""
        finally:
            stop(daemon)
            sock.unlink(missing_ok=True)
        return Sample(b.rate(result), cpu, rss, note, agent_cpu)

    return run


SINKS: dict[str, Callable[[Bench], Sample]] = {
    "/dev/null": devnull,
    "a file": a_file,
    "a bare pipe": bare_pipe,
    "supervisord": supervisord,
    "circus": circus,
    "dynsup (rings + tail -f)": dynsup(follow=True, journal=False),
    "dynsup + journald": dynsup(follow=True, journal=True),
}
CONSUMERS: dict[str, Callable[[Bench], Sample]] = {
    "dynsup: rings only": dynsup(follow=False, journal=False),
    "dynsup: log probe pending": dynsup(follow=False, journal=False, probe=True),
    "dynsup: journald only": dynsup(follow=False, journal=True),
}


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
class Row:
    samples: list[Sample] = field(default_factory=list)

    def median(self, key: Callable[[Sample], float]) -> float:
        return statistics.median(key(s) for s in self.samples)


def print_table(mode: str, rows: dict[str, Row]) -> None:
    null = rows["/dev/null"].median(lambda s: s.mb_per_s) if "/dev/null" in rows else None
    print(
        f"\nchild: {mode}-buffered writer; medians of {len(next(iter(rows.values())).samples)} runs"
    )
    print(
        "| sink | MB/s | share of /dev/null | min-max MB/s | daemon CPU | agent CPU"
        " | RSS max (daemon + agent) | notes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        rate = row.median(lambda s: s.mb_per_s)
        lo = min(s.mb_per_s for s in row.samples)
        hi = max(s.mb_per_s for s in row.samples)
        share = f"{rate / null:.0%}" if null else "-"
        cpu = f"{row.median(lambda s: s.cpu):.0%}" if row.samples[0].rss_max else "-"
        agents = [s.agent_cpu for s in row.samples if s.agent_cpu is not None]
        agent = f"{statistics.median(agents):.0%}" if agents else "-"
        rss = (
            f"{max(s.rss_max for s in row.samples) / (1 << 20):.0f} MiB"
            if row.samples[0].rss_max
            else "-"
        )
        notes = "; ".join(sorted({s.note for s in row.samples if s.note}))
        print(
            f"| {name} | {rate:.0f} | {share} | {lo:.0f}-{hi:.0f} | {cpu} | {agent} | {rss}"
            f" | {notes} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", default="block,line", help="block, line or both")
    parser.add_argument("--only", default="", help="comma-separated sink names (substrings)")
    parser.add_argument("--consumers", action="store_true", help="dynsup with each consumer alone")
    args = parser.parse_args()
    if not (BIN / "dynsupd").exists():
        print("run bash scripts/setup.sh first", file=sys.stderr)
        return 2
    sinks = {**SINKS, **(CONSUMERS if args.consumers else {})}
    if args.only:
        wanted = args.only.split(",")
        sinks = {n: f for n, f in sinks.items() if n == "/dev/null" or any(w in n for w in wanted)}
    modes = args.child.split(",")
    print(f"log flood: {os.cpu_count()} CPUs, {args.seconds:g} s per flood, 100-byte lines")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    tables = {mode: {name: Row() for name in sinks} for mode in modes}
    with tempfile.TemporaryDirectory(prefix="dynsup-flood-") as name, journald_socket() as journal:
        for run in range(1, args.runs + 1):
            for mode in modes:
                bench = Bench(Path(name), args.seconds, mode, journal)
                for sink, measure in sinks.items():
                    sample = measure(bench)
                    tables[mode][sink].samples.append(sample)
                    agent = "" if sample.agent_cpu is None else f", agent {sample.agent_cpu:.0%}"
                    print(f"run {run} {mode} {sink}: {sample.mb_per_s:.0f} MB/s, daemon CPU"
                          f" {sample.cpu:.0%}{agent} {sample.note}", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for mode, rows in tables.items():
        print_table(mode, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
