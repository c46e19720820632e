#!/usr/bin/env python3
"""Restart latency: time from a child's exit to its replacement's start.

    .venv/bin/python bench/restart_latency.py [--runs 50] [--only dynsup|supervisord]
                                              [--program c|bash] [--idle-procs N] [--keep]

A benchmark, not a test. The supervised program appends two wall-clock
stamps to a file and exits 1:

    start <CLOCK_REALTIME>     (first thing it does)
    exit  <CLOCK_REALTIME>     (last thing before exit)

The latency of restart i is start(i+1) - exit(i). Both supervisors run the
very same program with "restart at once, whatever the exit status": dynsup
with `restart = "always"`, `restart_delay = 0`, `start_seconds = 0`,
supervisord with `autorestart=true`, `startsecs=0`. The figure includes the
kernel's process exit, the supervisor noticing it, fork/exec and the
program's own start-up up to its first stamp; the last two are the same for
both supervisors, so the "bare start-up" line (same program, started from a
tight Python loop: stamp minus the time just before Popen) is printed for
readers to subtract.

The program is by default a tiny C program compiled here with `gcc -static`
(about 0.8 ms from Popen to its first stamp on the 2-core dev box); `--program
bash` uses `bash -c 'echo "start $EPOCHREALTIME" >> F; ...; exit 1'` instead
(no extra fork either, but about 1.8-2.5 ms of start-up with a much longer
tail). Without gcc the bash program is used.

`--idle-procs N` keeps N idle `sleep` processes (children of this script, not
of the supervisor) alive meanwhile, to see what a busy node does to the figure.

supervisord (PyPI `supervisor`) is installed on first use into its own venv,
bench/.venv-supervisord, never into the project's venv.

Exit status: 0; 1 when dynsup's median is 20 ms or more (so the script
doubles as a check); 2 when a run could not be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DYNSUPD = REPO / ".venv" / "bin" / "dynsupd"
SV_VENV = BENCH_DIR / ".venv-supervisord"
SV_REQUIREMENT = "supervisor==4.3.0"
THRESHOLD_MS = 20.0

C_SOURCE = r"""
#include <stdio.h>
#include <time.h>
static void stamp(FILE *f, const char *what) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    fprintf(f, "%s %lld.%06ld\n", what, (long long)ts.tv_sec, ts.tv_nsec / 1000);
    fflush(f);
}
int main(int argc, char **argv) {
    FILE *f;
    if (argc < 2 || !(f = fopen(argv[1], "a"))) return 2;
    stamp(f, "start");
    stamp(f, "exit");
    fclose(f);
    return 1;
}
"""


class BenchError(RuntimeError):
    """A run could not be measured."""


@dataclass
class Program:
    kind: str  # "c" or "bash"
    argv: Callable[[Path], list[str]]  # stamp file -> argv
    version: str


@dataclass
class Result:
    name: str
    latencies_ms: list[float]
    note: str = ""


# -- the supervised program ---------------------------------------------------


def build_program(kind: str, tmp: Path) -> Program:
    if kind == "c":
        gcc = shutil.which("gcc")
        if gcc is None:
            print("gcc not found: using the bash program", file=sys.stderr)
            kind = "bash"
        else:
            src = tmp / "stamp.c"
            exe = tmp / "stamp"
            src.write_text(C_SOURCE)
            linkage = "static"
            built = subprocess.run(
                [gcc, "-O2", "-static", "-o", str(exe), str(src)], capture_output=True
            )
            if built.returncode != 0:  # no static libc: dynamic is fine too
                linkage = "dynamic"
                subprocess.run([gcc, "-O2", "-o", str(exe), str(src)], check=True)
            version = subprocess.run(
                [gcc, "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0]
            return Program("c", lambda f: [str(exe), str(f)], f"C, {linkage}, {version}")
    bash = shutil.which("bash") or "/bin/bash"
    version = subprocess.run(
        [bash, "--version"], capture_output=True, text=True
    ).stdout.splitlines()[0]

    def bash_argv(f: Path) -> list[str]:
        script = f'echo "start $EPOCHREALTIME" >> {f}; echo "exit $EPOCHREALTIME" >> {f}; exit 1'
        return [bash, "-c", script]

    return Program("bash", bash_argv, version)


def read_stamps(path: Path) -> tuple[list[float], list[float]]:
    starts: list[float] = []
    exits: list[float] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return starts, exits
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue  # a line being written right now
        with contextlib.suppress(ValueError):
            (starts if parts[0] == "start" else exits).append(float(parts[1]))
    return starts, exits


def latencies(path: Path, runs: int) -> list[float]:
    """start(i+1) - exit(i) for the first `runs` restarts, in ms."""
    starts, exits = read_stamps(path)
    if len(starts) < runs + 1 or len(exits) < runs:
        raise BenchError(f"{path.name}: {len(starts)} starts, {len(exits)} exits recorded")
    return [(starts[i + 1] - exits[i]) * 1e3 for i in range(runs)]


def bare_startup(program: Program, tmp: Path, count: int) -> list[float]:
    """Popen -> first stamp of the same program, from a tight loop, in ms."""
    stamp = tmp / "bare.ts"
    argv = program.argv(stamp)
    out: list[float] = []
    for _ in range(count):
        stamp.write_text("")
        t0 = time.time()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True
        )
        proc.wait()
        starts, _ = read_stamps(stamp)
        if not starts:
            raise BenchError("the program wrote no start stamp")
        out.append((starts[0] - t0) * 1e3)
    return out


# -- running a supervisor ------------------------------------------------------


def wait_for_starts(
    proc: subprocess.Popen[bytes], stamp: Path, want: int, timeout: float, name: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        starts, _ = read_stamps(stamp)
        if len(starts) >= want:
            return
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with status {proc.returncode} after {len(starts)} starts"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: only {len(starts)} of {want} starts in {timeout:g}s")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes], name: str, timeout: float = 15.0) -> int | None:
    """SIGTERM, wait; SIGKILL its process group if it does not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{name} ignored SIGTERM for {timeout:g}s: SIGKILL", file=sys.stderr)
            _kill_group(proc)
        except BaseException:  # Ctrl-C while waiting: do not leave it behind
            _kill_group(proc)
            raise
    return proc.returncode


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: start_new_session=True
    proc.wait()


def leftovers(tmp: Path) -> list[tuple[int, str]]:
    """Processes whose command line mentions our temp dir: started by this script."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(tmp) in cmdline:
            found.append((int(entry), cmdline.strip()))
    return found


def reap_leftovers(tmp: Path) -> None:
    for pid, cmdline in leftovers(tmp):
        print(f"warning: left over after the run, killing pid {pid}: {cmdline}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def run_dynsup(program: Program, tmp: Path, runs: int, attempts: int, retry_wait: float) -> Result:
    if not DYNSUPD.exists():
        raise BenchError(f"{DYNSUPD} not found: create the project venv first")
    work = tmp / "dynsup"
    units = work / "units"
    units.mkdir(parents=True)
    stamp = work / "stamps"
    command = ", ".join(_toml_str(a) for a in program.argv(stamp))
    (units / "flap.toml").write_text(
        "[service]\n"
        f"command = [{command}]\n"
        'restart = "always"\n'
        "restart_delay = 0\n"
        "start_limit_burst = 1000\n"
        "start_limit_interval = 1\n"
        "start_seconds = 0\n"
    )
    argv = [
        str(DYNSUPD),
        "--state-dir", str(work / "state"),
        "--socket", str(work / "sock"),
        str(units),
    ]  # fmt: skip
    for attempt in range(1, attempts + 1):
        stamp.unlink(missing_ok=True)
        log_path = work / f"dynsupd.{attempt}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it with SIGTERM
            )
        try:
            wait_for_starts(proc, stamp, runs + 1, timeout=max(30.0, runs * 0.5), name="dynsupd")
        except BenchError as exc:
            stop(proc, "dynsupd")
            started, _ = read_stamps(stamp)
            if started or attempt == attempts:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"{exc}\n--- dynsupd output (tail) ---\n{tail}") from None
            # Exited before starting anything: the unit loader may be mid-change.
            print(
                f"dynsupd did not start (attempt {attempt}/{attempts}, status {proc.returncode});"
                f" retrying in {retry_wait:g}s",
                file=sys.stderr,
            )
            time.sleep(retry_wait)
            continue
        finally:
            status = stop(proc, "dynsupd") if proc.poll() is None else proc.returncode
        note = ""
        if status != 0:
            how = "hung: SIGKILLed 15 s later" if status == -9 else f"exit status {status}"
            note = f"dynsupd did not stop cleanly on SIGTERM ({how}); --keep keeps its log"
            print(f"warning: {note}", file=sys.stderr)
        return Result("dynsup", latencies(stamp, runs), note)
    raise BenchError("dynsupd never started")


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ensure_venv(venv: Path, requirement: str, program: str) -> Path:
    """venv/bin/program, installing requirement into a venv of its own on first use
    (a peer supervisor is never installed into the project's venv)."""
    exe = venv / "bin" / program
    if exe.exists():
        return exe
    print(f"installing {requirement} into {venv} ...", file=sys.stderr)
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", requirement], check=True)
    return exe


def ensure_supervisord() -> Path:
    return ensure_venv(SV_VENV, SV_REQUIREMENT, "supervisord")


def run_supervisord(program: Program, tmp: Path, runs: int) -> Result:
    exe = ensure_supervisord()
    work = tmp / "supervisord"
    work.mkdir()
    stamp = work / "stamps"
    command = shlex.join(program.argv(stamp)).replace("%", "%%")
    conf = work / "supervisord.conf"
    conf.write_text(
        f"""\
[unix_http_server]
file={work}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
nodaemon=true
logfile={work}/supervisord.log
pidfile={work}/supervisord.pid
childlogdir={work}
loglevel=info

[program:flap]
command={command}
autostart=true
autorestart=true
startsecs=0
startretries=1000
stdout_logfile={work}/flap.out
stderr_logfile={work}/flap.err
"""
    )
    log_path = work / "supervisord.stdout"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(exe), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # About 1 s per restart: leave it room.
        wait_for_starts(proc, stamp, runs + 1, timeout=runs * 2.0 + 30, name="supervisord")
    except BenchError as exc:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise BenchError(f"{exc}\n--- supervisord output (tail) ---\n{tail}") from None
    finally:
        status = stop(proc, "supervisord")
    note = ""
    if status != 0:
        note = f"supervisord exited with status {status} on SIGTERM"
        print(f"warning: {note}", file=sys.stderr)
    return Result("supervisord", latencies(stamp, runs), note)


# -- report --------------------------------------------------------------------


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def row(name: str, values: list[float]) -> str:
    v = sorted(values)
    return (
        f"{name:<22} {len(v):>5} {statistics.median(v):>10.2f} {quantile(v, 0.1):>8.2f}"
        f" {quantile(v, 0.9):>8.2f} {v[-1]:>9.2f}"
    )


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    if out.returncode != 0:
        return (
            f"unavailable ({Path(argv[0]).name} exited {out.returncode}: {text.splitlines()[-1:]})"
        )
    return text.splitlines()[0] if text else "?"


def versions(program: Program, which: list[str]) -> list[str]:
    rev = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    lines = [
        f"python {platform.python_version()}, {platform.system()} {platform.release()},"
        f" {os.cpu_count()} CPUs, {sum(e.isdigit() for e in os.listdir('/proc'))} processes",
        f"program: {program.version}",
    ]
    if "dynsup" in which:
        lines.append(
            f"dynsup: {_first_line([str(DYNSUPD), '--version'])}, tree {rev}"
            f"{' (with uncommitted changes)' if dirty else ''}"
        )
    if "supervisord" in which:
        exe = SV_VENV / "bin" / "supervisord"
        lines.append(f"supervisord: {_first_line([str(exe), '--version'])} ({exe})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="restarts measured (default 50)")
    parser.add_argument("--only", choices=["dynsup", "supervisord"])
    parser.add_argument(
        "--program", choices=["c", "bash"], default="c", help="supervised program (default c)"
    )
    parser.add_argument("--bare", type=int, default=200, help="bare start-up samples")
    parser.add_argument("--attempts", type=int, default=5, help="dynsupd start attempts")
    parser.add_argument("--retry-wait", type=float, default=10.0, help="seconds between them")
    parser.add_argument(
        "--idle-procs",
        type=int,
        default=0,
        help="keep N idle `sleep` processes alive meanwhile (a busy node; default 0)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stamps)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    which = [args.only] if args.only else ["dynsup", "supervisord"]

    tmp = Path(tempfile.mkdtemp(prefix="dynsup-restart-bench-"))
    results: list[Result] = []
    failed = False
    idle: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(args.idle_procs):  # children of ours, not of the supervisor
            idle.append(subprocess.Popen(["sleep", "86400"], stdin=subprocess.DEVNULL))
        program = build_program(args.program, tmp)
        if "supervisord" in which:
            try:
                ensure_supervisord()
            except (OSError, subprocess.CalledProcessError) as exc:
                print(f"supervisord: not measured: cannot install it: {exc}", file=sys.stderr)
                which.remove("supervisord")
                failed = True
        # Versions before the runs: others may change the tree meanwhile.
        print("restart latency: child's exit -> replacement's first stamp (ms)")
        for line in versions(program, which):
            print(f"  {line}")
        if idle:
            print(f"  with {len(idle)} idle processes alive (--idle-procs)")
        print(flush=True)
        bare = bare_startup(program, tmp, args.bare)
        for name in which:
            print(f"measuring {name}: {args.runs} restarts ...", file=sys.stderr, flush=True)
            try:
                if name == "dynsup":
                    results.append(
                        run_dynsup(program, tmp, args.runs, args.attempts, args.retry_wait)
                    )
                else:
                    results.append(run_supervisord(program, tmp, args.runs))
            except BenchError as exc:
                print(f"{name}: not measured: {exc}", file=sys.stderr)
                failed = True
    finally:
        for proc in idle:
            proc.kill()
        for proc in idle:
            proc.wait()
        reap_leftovers(tmp)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'supervisor':<22} {'runs':>5} {'median ms':>10} {'p10':>8} {'p90':>8} {'max':>9}")
    for result in results:
        print(row(result.name, result.latencies_ms))
    print(row("(bare start-up)", bare))
    print(
        "\n(bare start-up: Popen -> first stamp of the same program from a tight Python"
        " loop;\n included in every restart figure above, whatever the supervisor)"
    )

    for result in results:
        if result.note:
            print(f"note: {result.note}")
    status = 2 if failed else 0
    for result in results:
        if result.name == "dynsup":
            median = statistics.median(result.latencies_ms)
            verdict = "OK" if median < THRESHOLD_MS else "FAIL"
            print(f"\ndynsup median {median:.2f} ms (< {THRESHOLD_MS:g} ms required): {verdict}")
            if median >= THRESHOLD_MS and not failed:
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
