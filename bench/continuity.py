#!/usr/bin/env python3
"""Continuity: what the endpoint's users see while faults and operations happen.

    .venv/bin/python bench/continuity.py [--rate 20] [--hang 30] [--only ROW ...]

A benchmark, not a test. The demo stack (frontend and two mocker replicas,
file discovery, KV router; the tests' ``make_stack``: free ports, a tmp
state directory) under a real ``dynsupd``, loaded with ``--rate`` chat
requests a second (one thread per request slot, distinct prompts, 10 s
timeout) plus two looping streaming requests (max_tokens 64). Rows, one
after another, each once the stack is RUNNING and serving again:

* ``kill -9 worker``: SIGKILL of tiny-0's leader;
* ``SIGSTOP worker``: tiny-0's group stopped for ``--hang`` seconds, then
  continued (if still there); "replaced" is the time from SIGSTOP to tiny-0
  RUNNING under a new pid;
* ``restart worker``: ``dynsupctl restart tiny-1``;
* ``scale 2→1→2``: ``dynsupctl scale tiny 1``, then ``scale tiny 2``.

Per row: failed / total requests sent from the row's start until the stack
serves again (every unit RUNNING and 20 requests in a row succeeded), broken
streams (a stream that raised or ended without finish_reason), and the time
to settle. Exit status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.daemon_helpers import Dynsupd
from tests.test_demo_stack import (
    MODEL,
    make_stack,
    run_dynsupd,
    status,
    wait_running,
)

COUNTER = itertools.count()


class Load:
    """``rate`` chats a second and two looping streams; counts what failed, by time."""

    def __init__(self, base_url: str, rate: float) -> None:
        from openai import OpenAI

        self.api = OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=10)
        self.stream_api = OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
        self.rate = rate
        self.results: list[tuple[float, bool]] = []  # (sent at, ok)
        self.streams: list[tuple[float, bool]] = []  # (ended at, ok)
        self.errors: list[tuple[float, str]] = []  # (sent at, what failed)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def chat(self) -> None:
        sent = time.monotonic()
        try:
            self.api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"request {next(COUNTER)}"}],
                max_tokens=8,
            )
            ok = True
        except Exception as exc:
            ok = False
            self.errors.append((sent, f"{type(exc).__name__}: {str(exc)[:80]}"))
        self.results.append((sent, ok))

    def pace(self) -> None:
        while not self.stop.is_set():
            worker = threading.Thread(target=self.chat, daemon=True)
            worker.start()
            self.stop.wait(1 / self.rate)

    def stream_loop(self) -> None:
        while not self.stop.is_set():
            ok = False
            try:
                chunks = self.stream_api.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"stream {next(COUNTER)}"}],
                    max_tokens=64,
                    stream=True,
                )
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        ok = True
            except Exception:
                ok = False
            self.streams.append((time.monotonic(), ok))

    def __enter__(self) -> Load:
        for target in (self.pace, self.stream_loop, self.stream_loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(70)

    def since(self, start: float) -> tuple[int, int, int, int]:
        chats = [ok for at, ok in list(self.results) if at >= start]
        streams = [ok for at, ok in list(self.streams) if at >= start]
        return chats.count(False), len(chats), streams.count(False), len(streams)

    def serving(self, start: float, streak: int = 20) -> bool:
        tail = [ok for at, ok in list(self.results) if at >= start][-streak:]
        return len(tail) == streak and all(tail)


def settle(daemon: Dynsupd, load: Load, names: list[str], start: float, limit: float) -> float:
    pace = threading.Event()
    while time.monotonic() - start < limit:
        states = {n: u["state"] for n, u in status(daemon).items()}
        if all(states.get(n) == "RUNNING" for n in names) and load.serving(start):
            return time.monotonic() - start
        pace.wait(0.2)
    return float("nan")


def ctl(daemon: Dynsupd, *args: str) -> None:
    done = daemon.ctl(*args, timeout=300)
    if done.returncode not in (0, 3):
        print(f"  dynsupctl {' '.join(args)}: {done.returncode} {done.stdout}{done.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--hang", type=float, default=30.0)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dynsup-continuity-") as tmp:
        root = Path(tmp)
        stack = make_stack(root)
        names = stack.all_units
        with run_dynsupd(root, stack.units) as daemon:
            wait_running(daemon, stack)
            rows: list[tuple[str, Callable[[], None], str]] = []

            def kill_worker() -> None:
                os.kill(status(daemon)["tiny-0"]["pid"], signal.SIGKILL)

            def hang_worker() -> None:
                pid = status(daemon)["tiny-0"]["pid"]
                os.killpg(pid, signal.SIGSTOP)
                started = time.monotonic()
                replaced = float("nan")
                while time.monotonic() - started < args.hang:
                    now = status(daemon)["tiny-0"]
                    if now["state"] == "RUNNING" and now["pid"] not in (None, pid):
                        replaced = time.monotonic() - started
                        break
                    threading.Event().wait(0.1)
                print(f"  replaced after {replaced:.1f} s")
                if math.isnan(replaced):  # still hung: let it go on
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGCONT)

            def restart_worker() -> None:
                ctl(daemon, "restart", "tiny-1")

            def scale() -> None:
                ctl(daemon, "scale", "tiny", "1")
                ctl(daemon, "scale", "tiny", "2")

            model_file = stack.units / "tiny.toml"
            other_file = stack.units / "other.toml"

            def update_args() -> None:
                text = model_file.read_text()
                changed = text.replace("speedup_ratio = 0 ", "speedup_ratio = 0, block_size = 32 ")
                model_file.write_text(changed)
                ctl(daemon, "update")

            def add_model() -> None:
                other_file.write_text(
                    model_file.read_text()
                    .replace('name = "tiny"', 'name = "other"')
                    .replace("replicas = 2", "replicas = 1")
                )
                ctl(daemon, "update")
                daemon.wait_state("other-0", "RUNNING", timeout=240)

            def remove_model() -> None:
                other_file.unlink()
                ctl(daemon, "update")

            rows = [
                ("kill -9 worker", kill_worker, "kill"),
                ("SIGSTOP worker", hang_worker, "hang"),
                ("update engine_args", update_args, "update"),
                ("scale 2→1→2", scale, "scale"),
                ("add a model", add_model, "add"),
                ("remove it", remove_model, "remove"),
                ("restart worker", restart_worker, "restart"),
            ]
            table = []
            with Load(stack.base_url, args.rate) as load:
                pace = threading.Event()
                while not load.serving(0.0):
                    pace.wait(0.2)
                for label, action, key in rows:
                    if args.only and key not in args.only:
                        continue
                    start = time.monotonic()
                    print(f"{label} ...", flush=True)
                    frontend = status(daemon)["frontend"]["pid"]
                    action()
                    if status(daemon)["frontend"]["pid"] != frontend:
                        label += " (frontend restarted)"
                    took = settle(daemon, load, names, start, 240)
                    failed, total, broken, streams = load.since(start)
                    for at, error in load.errors:
                        if at >= start:
                            print(f"  +{at - start:.2f} s: {error}")
                    table.append((label, failed, total, broken, streams, took))
            daemon.stop(timeout=120)
    print("\n| row | failed / total requests | broken / total streams | settled after |")
    print("|---|---|---|---|")
    for label, failed, total, broken, streams, took in table:
        print(f"| {label} | {failed} / {total} | {broken} / {streams} | {took:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
