"""Scrape cost with many units: GET /metrics and `status --json`, and the daemon's CPU
while a scraper hits /metrics every second (see README.md).

    .venv/bin/python bench/observe_scrape.py [--units 300] [--scrapes 30] [--window 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynsup.control.client import Client

BIN = Path(sys.executable).parent


def wait_log(log: Path, event: str, deadline: float) -> dict:
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                return record
        time.sleep(0.1)
    raise SystemExit(f"no {event} in {log}")


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1000


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    p90 = ms[int(len(ms) * 0.9) - 1] if len(ms) >= 10 else ms[-1]
    return f"median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, max {ms[-1]:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=300)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of CPU measurement")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        units = root / "units"
        units.mkdir()
        for i in range(ns.units):
            (units / f"u{i:03d}.toml").write_text(
                '[service]\ncommand = ["sleep", "3600"]\nstart_seconds = 0.1\n'
            )
        log = root / "d.log"
        sock = str(root / "s.sock")
        with open(log, "w") as err:
            daemon = subprocess.Popen(
                [
                    *(str(BIN / "dynsupd"), "--socket", sock, "--state-dir", str(root / "st")),
                    *("--log-format", "json", "--metrics", "127.0.0.1:0", str(units)),
                ],
                stderr=err,
                stdout=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 300
            address = wait_log(log, "metrics.listening", deadline)["address"]
            wait_log(log, "daemon.ready", deadline)
            url = f"http://{address}/metrics"
            size = len(urllib.request.urlopen(url).read())
            scrape = []
            for _ in range(ns.scrapes):
                scrape.append(timed(lambda: urllib.request.urlopen(url).read()))
                time.sleep(1.0)  # a fresh /proc walk each time (the cache lives 0.5 s)
            status = []
            with Client(sock) as client:
                for _ in range(ns.scrapes):
                    status.append(timed(lambda: client.call("status", {"names": []})))
                    time.sleep(1.0)
            proc = psutil.Process(daemon.pid)
            idle_began, cpu0 = time.monotonic(), sum(proc.cpu_times()[:2])
            time.sleep(ns.window)
            idle_cpu = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - idle_began)
            began, cpu0 = time.monotonic(), sum(proc.cpu_times()[:2])
            while time.monotonic() - began < ns.window:
                urllib.request.urlopen(url).read()
                time.sleep(1.0)
            busy_cpu = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - began)
            print(f"{ns.units} units, /metrics {size / 1024:.0f} KiB")
            print(f"GET /metrics:   {summary(scrape)}")
            print(f"status (all):   {summary(status)}")
            print(f"daemon CPU:     idle {idle_cpu:.1%}, scraped every 1 s {busy_cpu:.1%}")
        finally:
            daemon.terminate()
            daemon.wait(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
