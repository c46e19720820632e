"""GPU reservation overhead and the daemon's own memory, with and without Ray.

Prints:
* the time from `dynsupctl start` of a 1-GPU unit to its process being
  spawned (the STARTING event), over N start/stop cycles: each start
  creates a placement group, waits for it and probes its GPU ids; each stop
  releases it. The same for a unit without GPUs on the same daemon, for
  comparison (it runs under the node's Ray agent too);
* the resident memory of the dynsupd process itself, on a stack without
  GPU units (in-process agent, no Ray) and on one with (Ray on: the
  embedded head and agents are separate processes, reported separately).

Usage: .venv/bin/python bench/gpu_reservation.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
UNIT = """
[unit]
autostart = {autostart}
[service]
command = ["sleep", "600"]
start_seconds = 0
[resources]
gpus = {gpus}
"""


def write_units(root: Path, with_gpu: bool) -> Path:
    units = root / "units"
    units.mkdir(parents=True)
    (units / "plain.toml").write_text(textwrap.dedent(UNIT.format(autostart="false", gpus=0)))
    if with_gpu:
        (units / "gpu.toml").write_text(textwrap.dedent(UNIT.format(autostart="false", gpus=1)))
    (root / "dynsupd.toml").write_text("[ray]\nnum_gpus = 2\n")
    return units


class Daemon:
    def __init__(self, root: Path, with_gpu: bool) -> None:
        self.root = root
        self.socket = root / "dynsup.sock"
        self.log = root / "dynsupd.log"
        units = write_units(root, with_gpu)
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "dynsupd"), "--config", str(root / "dynsupd.toml"),
                    "--socket", str(self.socket), "--state-dir", str(root / "state"),
                    "--log-format", "json", str(units),
                ],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        self.wait_event(lambda e: e.get("event") == "daemon.started", 180)

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_event(self, predicate, timeout: float, since: int = 0) -> dict:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events()[since:]:
                if predicate(event):
                    return event
            if self.proc.poll() is not None:
                raise RuntimeError(f"dynsupd exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.01)  # polling the daemon's log file, bounded by the deadline
        raise TimeoutError(f"no such event within {timeout}s")

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [str(BIN / "dynsupctl"), "--socket", str(self.socket), *args],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def start_to_spawn(self, unit: str) -> float:
        since = len(self.events())
        began = time.time()
        self.ctl("start", "--no-wait", unit)
        event = self.wait_event(
            lambda e: (
                e.get("event") == "unit.state"
                and e.get("unit") == unit
                and e.get("new") == "STARTING"
            ),
            120,
            since,
        )
        spawned = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        self.ctl("stop", unit)
        return spawned - began

    def rss_mib(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ray_rss_mib(state_dir: Path) -> float:
    """Resident memory of the embedded Ray head's processes (agents included)."""
    from dynsup.placement.head import head_processes, read_head

    head = read_head(state_dir)
    if head is None:
        return 0.0
    total = 0
    for proc in head_processes(head.token, head.temp_dir):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def describe(label: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (
        f"{label:<34} runs {len(ms):>3}  median {statistics.median(ms):8.1f} ms"
        f"  min {ms[0]:8.1f}  max {ms[-1]:8.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dynsup-gpu-bench-"))
    try:
        plain_daemon = Daemon(root / "no-ray", with_gpu=False)
        try:
            plain_only = [plain_daemon.start_to_spawn("plain") for _ in range(args.runs)]
            rss_without = plain_daemon.rss_mib()
        finally:
            plain_daemon.stop()
        ray_daemon = Daemon(root / "ray", with_gpu=True)
        try:
            gpu = [ray_daemon.start_to_spawn("gpu") for _ in range(args.runs)]
            plain_under_ray = [ray_daemon.start_to_spawn("plain") for _ in range(args.runs)]
            rss_with = ray_daemon.rss_mib()
            ray_rss = ray_rss_mib(root / "ray" / "state")
        finally:
            ray_daemon.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("dynsupctl start -> process spawned (STARTING event)")
    print("  " + describe("1-GPU unit (placement group + probe)", gpu))
    print("  " + describe("no-GPU unit, Ray agent", plain_under_ray))
    print("  " + describe("no-GPU unit, in-process agent", plain_only))
    print("resident memory of the dynsupd process")
    print(f"  without Ray  {rss_without:7.1f} MiB")
    print(f"  with Ray     {rss_with:7.1f} MiB")
    print(f"  (+ {ray_rss:.0f} MiB in the embedded Ray head's own processes, agents included)")
    print(f"(dynsupctl itself is part of each figure; host: {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
