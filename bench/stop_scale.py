#!/usr/bin/env python3
"""Stop and start at scale: `stop all` / `start all` of N `sleep` units, three supervisors.

    .venv/bin/python bench/stop_scale.py [--sizes 100,500,1000] [--runs 3] [--quick]
                                         [--only dynsup,supervisord,circus]
                                         [--timeout 300] [--keep]

A benchmark, not a test. For each size N, one daemon of each supervisor is
started on N units that all run the same program (`sleep 86400` through a
symlink in this run's temp dir, so every process it starts can be found and
killed at the end), none of them running before the first run (circus starts
only autostart watchers on `start` of several, so its watchers autostart and
are stopped once, untimed, after circusd is up). Then, in each run,
in an order rotated from run to run (interleaved, so a busy moment of the
shared box does not hit one supervisor only), each supervisor in turn gets

* `start all`, timed from launching its control command to that command's
  exit, in its waiting form: the command returns once every unit is running
  (dynsup: `dynsupctl start all`, RUNNING with `start_seconds = 0`;
  supervisord: `supervisorctl start all` with `startsecs=0`; circus:
  `circusctl start --waiting`);
* `stop all`, timed the same way (`dynsupctl stop all`, `supervisorctl stop
  all`, `circusctl stop --waiting`).

After each command the script counts the supervisor's `sleep` processes
(N after a start, 0 after a stop) and says when they do not match. It also
reads each daemon's CPU time (utime + stime of /proc/<pid>/stat, the daemon
process only) before and after each command, and its VmRSS once all N units
run. Only one supervisor has its units running at any time.

supervisord (PyPI `supervisor` 4.3.0) and circus (PyPI `circus` 0.19.0) are
installed on first use into venvs of their own, bench/.venv-supervisord and
bench/.venv-circus, never into the project's venv.

Exit status: 0; 1 when a dynsup figure misses its target (stop 500 <= 0.3 s,
start 500 <= 0.7 s, RSS with 500 units <= 50 MiB) or is behind a peer on
some row; 2 when something could not be measured.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Siblings found through sys.path (bench/ is the script's directory).
from restart_latency import (
    BENCH_DIR,
    DYNSUPD,
    SV_VENV,
    BenchError,
    _first_line,
    _toml_str,
    ensure_supervisord,
    ensure_venv,
    reap_leftovers,
    stop,
)

DYNSUPCTL = DYNSUPD.parent / "dynsupctl"
CIRCUS_VENV = BENCH_DIR / ".venv-circus"
CIRCUS_REQUIREMENT = "circus==0.19.0"
PEERS = ("dynsup", "supervisord", "circus")
VERBS = ("start", "stop")
TICK = os.sysconf("SC_CLK_TCK")

# The targets for dynsup (issue 8): seconds, and MiB of RSS.
TARGET_SECONDS = {("stop", 500): 0.3, ("start", 500): 0.7}
TARGET_RSS_UNITS = 500
TARGET_RSS_MIB = 50.0


# -- reading a daemon from /proc ----------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def count_running(program: Path) -> int:
    """Living processes whose argv[0] is program (zombies have no cmdline)."""
    prefix = str(program).encode() + b"\0"
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(prefix):
                    count += 1
        except OSError:
            continue
    return count


# -- the three supervisors -----------------------------------------------------


@dataclass
class Peer:
    """One supervisor's daemon on N units, and its control command."""

    name: str
    work: Path
    units: int
    sleep: Path  # this peer's own symlink to sleep: its processes are countable
    proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        raise NotImplementedError

    def daemon_argv(self) -> list[str]:
        raise NotImplementedError

    def ctl_argv(self, verb: str) -> list[str]:
        """The timed command for verb ("start" | "stop"), waiting form."""
        raise NotImplementedError

    def ping_argv(self) -> list[str]:
        """A cheap command that succeeds once the daemon answers."""
        raise NotImplementedError

    def launch(self, timeout: float) -> None:
        self.work.mkdir(parents=True)
        self.sleep.parent.mkdir()
        self.sleep.symlink_to(_which("sleep"))
        self.write_config()
        with open(self.work / "daemon.log", "wb") as log_file:
            self.proc = subprocess.Popen(
                self.daemon_argv(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it with SIGTERM
                cwd=self.work,
            )
        deadline = time.monotonic() + timeout
        pace = threading.Event()
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            ping = subprocess.run(self.ping_argv(), capture_output=True, timeout=timeout)
            if ping.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not answer within {timeout:g} s:\n{self.tail()}")
            pace.wait(0.1)  # polling its control socket, bounded by the deadline

    def tail(self, lines: int = 20) -> str:
        try:
            text = (self.work / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def shutdown(self) -> None:
        if self.proc is not None:
            status = stop(self.proc, self.name, timeout=120.0)
            if status not in (0, None):
                print(f"warning: {self.name} exited with {status} on SIGTERM", file=sys.stderr)


class Dynsup(Peer):
    def write_config(self) -> None:
        units = self.work / "units"
        units.mkdir()
        body = (
            "[unit]\nautostart = false\n"
            f'[service]\ncommand = [{_toml_str(str(self.sleep))}, "86400"]\n'
            'restart = "no"\nstart_seconds = 0\n'
        )
        for i in range(self.units):
            (units / f"u{i:04d}.toml").write_text(body)

    def daemon_argv(self) -> list[str]:
        return [
            str(DYNSUPD),
            "--socket", str(self.work / "sock"),
            "--state-dir", str(self.work / "state"),
            "--log-format", "json",
            str(self.work / "units"),
        ]  # fmt: skip

    def _ctl(self, *args: str) -> list[str]:
        return [str(DYNSUPCTL), "--socket", str(self.work / "sock"), *args]

    def ctl_argv(self, verb: str) -> list[str]:
        return self._ctl(verb, "all")

    def ping_argv(self) -> list[str]:
        return self._ctl("version")


class Supervisord(Peer):
    def write_config(self) -> None:
        w = self.work
        programs = "".join(
            f"\n[program:u{i:04d}]\ncommand={shlex.quote(str(self.sleep))} 86400\n"
            "autostart=false\nautorestart=false\nstartsecs=0\n"
            for i in range(self.units)
        )
        (w / "supervisord.conf").write_text(
            f"[unix_http_server]\nfile={w}/supervisor.sock\n\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{w}/supervisor.sock\n\n"
            f"[supervisord]\nnodaemon=true\nlogfile={w}/supervisord.log\n"
            f"pidfile={w}/supervisord.pid\nchildlogdir={w}\nloglevel=warn\n"
            # Two pipes and two log files per program: raise its fd floor.
            f"minfds={4 * self.units + 256}\n"
            f"{programs}"
        )

    def daemon_argv(self) -> list[str]:
        return [str(SV_VENV / "bin" / "supervisord"), "-c", str(self.work / "supervisord.conf")]

    def _ctl(self, *args: str) -> list[str]:
        return [
            str(SV_VENV / "bin" / "supervisorctl"),
            "-c",
            str(self.work / "supervisord.conf"),
            *args,
        ]

    def ctl_argv(self, verb: str) -> list[str]:
        return self._ctl(verb, "all")

    def ping_argv(self) -> list[str]:
        return self._ctl("pid")


class Circus(Peer):
    def _endpoint(self) -> str:
        return f"ipc://{self.work}/circus.sock"

    def write_config(self) -> None:
        w = self.work
        watchers = "".join(
            f"\n[watcher:u{i:04d}]\ncmd = {self.sleep}\nargs = 86400\n"
            # autostart: circus's `start` of several watchers starts only those
            # (launch() stops them all before the first run).
            "numprocesses = 1\n"
            for i in range(self.units)
        )
        (w / "circus.ini").write_text(
            f"[circus]\nendpoint = {self._endpoint()}\n"
            f"pubsub_endpoint = ipc://{w}/pubsub.sock\n"
            f"stats_endpoint = ipc://{w}/stats.sock\n"
            "statsd = false\n"
            f"{watchers}"
        )

    def daemon_argv(self) -> list[str]:
        return [str(CIRCUS_VENV / "bin" / "circusd"), str(self.work / "circus.ini")]

    def _ctl(self, *args: str) -> list[str]:
        return [
            str(CIRCUS_VENV / "bin" / "circusctl"),
            "--endpoint", self._endpoint(),
            "--timeout", "600",
            *args,
        ]  # fmt: skip

    def ctl_argv(self, verb: str) -> list[str]:
        return self._ctl(verb, "--waiting")

    def launch(self, timeout: float) -> None:
        super().launch(timeout)
        # circusd answers while it is still starting the watchers, and refuses
        # a stop meanwhile ("already running arbiter_start_watchers").
        settle(self, self.units, timeout)
        done = subprocess.run(self.ctl_argv("stop"), capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise BenchError(f"circusctl stop: exit status {done.returncode}: {done.stdout!r}")

    def ping_argv(self) -> list[str]:
        return self._ctl("list")


PEER_CLASSES: dict[str, type[Peer]] = {
    "dynsup": Dynsup,
    "supervisord": Supervisord,
    "circus": Circus,
}


def _which(program: str) -> str:
    for directory in ("/usr/bin", "/bin"):
        candidate = Path(directory) / program
        if candidate.exists():
            return str(candidate)
    raise BenchError(f"{program} not found")


def ensure_peer(name: str) -> None:
    if name == "supervisord":
        ensure_supervisord()
    elif name == "circus":
        ensure_venv(CIRCUS_VENV, CIRCUS_REQUIREMENT, "circusd")


# -- measuring -----------------------------------------------------------------


@dataclass
class Sample:
    wall: float | None  # None: the command timed out
    cpu: float
    note: str = ""


@dataclass
class Figures:
    samples: dict[tuple[str, int, str], list[Sample]] = field(default_factory=dict)
    rss: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, peer: str, units: int, verb: str, sample: Sample) -> None:
        self.samples.setdefault((peer, units, verb), []).append(sample)


def timed(peer: Peer, verb: str, timeout: float) -> Sample:
    assert peer.proc is not None
    argv = peer.ctl_argv(verb)
    cpu0 = cpu_seconds(peer.proc.pid)
    began = time.perf_counter()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Sample(None, cpu_seconds(peer.proc.pid) - cpu0, f"no exit within {timeout:g} s")
    wall = time.perf_counter() - began
    cpu = cpu_seconds(peer.proc.pid) - cpu0
    note = ""
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()[-1:]
        note = f"exit status {done.returncode} {err}"
    return Sample(wall, cpu, note)


def settle(peer: Peer, want: int, timeout: float) -> int:
    """Count the peer's sleeps until there are want of them (or timeout): after a timed
    command that returned early, the next one must not start on a half-done state."""
    deadline = time.monotonic() + timeout
    pace = threading.Event()
    while True:
        have = count_running(peer.sleep)
        if have == want or time.monotonic() > deadline:
            return have
        pace.wait(0.05)


def run_size(
    names: list[str], units: int, runs: int, timeout: float, tmp: Path, figures: Figures
) -> None:
    peers: list[Peer] = []
    try:
        for name in names:
            work = tmp / f"{name}-{units}"
            peer = PEER_CLASSES[name](name, work, units, work / "bin" / "sleep")
            peers.append(peer)
            print(f"{units} units: starting {name} ...", file=sys.stderr, flush=True)
            peer.launch(timeout=max(60.0, units * 0.2))
            if settle(peer, 0, timeout=60.0) != 0:
                raise BenchError(f"{name}: units running before the first start")
        for run in range(runs):
            order = peers[run % len(peers) :] + peers[: run % len(peers)]
            for peer in order:
                assert peer.proc is not None
                for verb in VERBS:
                    sample = timed(peer, verb, timeout)
                    want = units if verb == "start" else 0
                    have = settle(peer, want, timeout=30.0)
                    if have != want:
                        sample.note = f"{have} of {units} running after it; {sample.note}".strip(
                            "; "
                        )
                    figures.add(peer.name, units, verb, sample)
                    if verb == "start":
                        figures.rss.setdefault((peer.name, units), []).append(
                            rss_mib(peer.proc.pid)
                        )
                    shown = "timeout" if sample.wall is None else f"{sample.wall:.3f} s"
                    print(
                        f"  run {run + 1}: {peer.name:<11} {verb:<5} {units:>5}: {shown},"
                        f" cpu {sample.cpu:.2f} s {sample.note}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for peer in peers:
            peer.shutdown()


# -- report --------------------------------------------------------------------


def spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def wall_cell(samples: list[Sample]) -> str:
    walls = [s.wall for s in samples if s.wall is not None]
    cell = spread(walls)
    hung = len(samples) - len(walls)
    if hung:
        cell += f" + {hung} hung"
    if any(s.note for s in samples):
        cell += " !"
    return cell


def median_wall(samples: list[Sample]) -> float | None:
    if any(s.wall is None for s in samples):
        return None
    return statistics.median(s.wall for s in samples if s.wall is not None)


def report(names: list[str], sizes: list[int], figures: Figures) -> int:
    """Print the table; return 1 when dynsup misses a target or is behind a peer."""
    status = 0
    width = 28
    head = f"{'units':>5} {'verb':<6}" + "".join(f" {n:>{width}}" for n in names)
    if "dynsup" in names:
        head += "   dynsup target"
    print("\nwhole command, launch to exit: median (min-max) over runs")
    print(head)
    for units in sizes:
        for verb in VERBS:
            cells = [wall_cell(figures.samples.get((n, units, verb), [])) for n in names]
            line = f"{units:>5} {verb:<6}" + "".join(f" {c:>{width}}" for c in cells)
            if "dynsup" in names:
                verdict, missed = verdict_for(names, units, verb, figures)
                line += f"   {verdict}"
                status |= missed
            print(line)
    print("\ndaemon CPU time per command (utime+stime of the daemon): median (min-max)")
    print(f"{'units':>5} {'verb':<6}" + "".join(f" {n:>{width}}" for n in names))
    for units in sizes:
        for verb in VERBS:
            cells = [
                spread([s.cpu for s in figures.samples.get((n, units, verb), [])]) for n in names
            ]
            print(f"{units:>5} {verb:<6}" + "".join(f" {c:>{width}}" for c in cells))
    print("\ndaemon VmRSS with every unit running (after each start all): median (min-max)")
    print(f"{'units':>5} {'':<6}" + "".join(f" {n:>{width}}" for n in names))
    for units in sizes:
        cells = [spread(figures.rss.get((n, units), []), "MiB", 1) for n in names]
        line = f"{units:>5} {'RSS':<6}" + "".join(f" {c:>{width}}" for c in cells)
        if "dynsup" in names and units == TARGET_RSS_UNITS and figures.rss.get(("dynsup", units)):
            rss = statistics.median(figures.rss[("dynsup", units)])
            ok = rss <= TARGET_RSS_MIB
            line += f"   <= {TARGET_RSS_MIB:g} MiB: {'OK' if ok else 'MISSED'}"
            status |= 0 if ok else 1
        print(line)
    shown_notes = [
        f"{peer} {verb} {units}: run {i + 1}: {s.note}"
        for (peer, units, verb), samples in figures.samples.items()
        for i, s in enumerate(samples)
        if s.note
    ]
    if shown_notes:
        print("\n! notes:")
        for note in shown_notes:
            print(f"  {note}")
    return status


def verdict_for(names: list[str], units: int, verb: str, figures: Figures) -> tuple[str, int]:
    ours = median_wall(figures.samples.get(("dynsup", units, verb), []))
    if ours is None:
        return "hung or not measured: MISSED", 1
    parts, missed = [], 0
    target = TARGET_SECONDS.get((verb, units))
    if target is not None:
        ok = ours <= target
        parts.append(f"<= {target:g} s {'OK' if ok else 'MISSED'}")
        missed |= not ok
    peers = [median_wall(figures.samples.get((n, units, verb), [])) for n in names if n != "dynsup"]
    measured = [p for p in peers if p is not None]
    if measured:
        ahead = all(ours < p for p in measured)
        parts.append("ahead of peers" if ahead else "BEHIND a peer")
        missed |= not ahead
    return ", ".join(parts) or "-", int(missed)


def describe_box(names: list[str]) -> list[str]:
    rev = _first_line(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"])
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines = [
        f"{os.cpu_count()} CPUs, load {load},"
        f" {sum(e.isdigit() for e in os.listdir('/proc'))} processes; dynsup tree {rev}",
    ]
    versions: dict[str, Callable[[], list[str]]] = {
        "dynsup": lambda: [str(DYNSUPD), "--version"],
        "supervisord": lambda: [str(SV_VENV / "bin" / "supervisord"), "--version"],
        "circus": lambda: [str(CIRCUS_VENV / "bin" / "circusd"), "--version"],
    }
    for name in names:
        lines.append(f"{name}: {_first_line(versions[name]())}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="100,500,1000", help="unit counts (default 100,500,1000)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument("--quick", action="store_true", help="--sizes 100,500 --runs 1")
    parser.add_argument("--only", default=",".join(PEERS), help="supervisors, comma-separated")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one command may take (default 300)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.runs = "100,500", 1
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes takes numbers, e.g. 100,500")
    names = [n for n in PEERS if n in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(PEERS)
    if unknown or not names or args.runs < 1 or min(sizes) < 1:
        parser.error(f"--only takes {','.join(PEERS)}; --runs and --sizes at least 1")
    if "dynsup" in names and not DYNSUPD.exists():
        parser.error(f"{DYNSUPD} not found: run scripts/setup.sh first")

    failed = False
    for name in list(names):
        try:
            ensure_peer(name)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"{name}: not measured: cannot install it: {exc}", file=sys.stderr)
            names.remove(name)
            failed = True
    print("stop/start at scale: whole `stop all` / `start all` commands, interleaved runs")
    for line in describe_box(names):
        print(f"  {line}")
    print(flush=True)

    # Under /tmp: Unix socket paths must stay short.
    tmp = Path(tempfile.mkdtemp(prefix="dynsup-stop-bench-", dir="/tmp"))
    figures = Figures()
    # SIGTERM (a CI timeout, say) takes the same way out as Ctrl-C; and so does
    # SIGINT when a shell started us in the background with it ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for units in sizes:
            try:
                run_size(names, units, args.runs, args.timeout, tmp, figures)
            except BenchError as exc:
                print(f"{units} units: not measured: {exc}", file=sys.stderr)
                failed = True
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        failed = True
    finally:
        reap_leftovers(tmp)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    status = report(names, sizes, figures)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"\nload at the end: {load}")
    return 2 if failed else status


if __name__ == "__main__":
    sys.exit(main())
