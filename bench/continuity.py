#!/usr/bin/env python3
"""Continuity: what the endpoint's users see while faults and operations happen.

    .venv/bin/python bench/continuity.py [--rate 20] [--hang 30] [--frontends N] [--only ROW ...]

A benchmark, not a test. The demo stack (frontend and two mocker replicas,
file discovery, KV router; the tests' ``make_stack``: free ports, a tmp
state directory) under a real ``dynsupd``, loaded with ``--rate`` chat
requests a second (one thread per request slot, distinct prompts, 10 s
timeout) plus two looping streaming requests (max_tokens 64). Rows, one
after another, each once the stack is RUNNING and serving again:

* ``kill -9 worker``: SIGKILL of the first replica's leader (tiny-0, or
  its name after a surge);
* ``SIGSTOP worker``: the first replica's group stopped for ``--hang`` seconds, then
  continued (if still there); "replaced" is the time from SIGSTOP to it
  RUNNING under a new pid;
* ``restart worker``: ``dynsupctl restart`` of the last replica;
* ``scale 2→1→2``: ``dynsupctl scale tiny 1``, then ``scale tiny 2``;
* ``kill -9 frontend``: SIGKILL of the first frontend's leader;
* ``kill -9 dynsupd``: SIGKILL of the daemon, then a new one on the same
  state directory; "pids kept" counts the units whose pid is the same
  after it settled (without Ray, the agent process keeps them).

``--frontends N`` runs the stack with ``frontend_replicas = N`` and makes
the load a client with a list of addresses (what a client-side list or a
proxy's upstream does): chats go round-robin over the frontends and a
failed one is retried once on each other frontend; it counts as failed
only when every address failed ("retried" counts the ones that needed
another address). Stream ``i`` goes to frontend ``i mod N`` and is retried
on the next address only when it failed before its first chunk; one cut
mid-way is broken. With one frontend nothing is retried.

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

    def __init__(self, base_urls: list[str], rate: float) -> None:
        from openai import OpenAI

        self.apis = [OpenAI(base_url=u, api_key="x", max_retries=0, timeout=10) for u in base_urls]
        self.stream_apis = [
            OpenAI(base_url=u, api_key="x", max_retries=0, timeout=60) for u in base_urls
        ]
        self.rate = rate
        self.results: list[tuple[float, bool]] = []  # (sent at, ok)
        self.retried: list[float] = []  # sent at, of the chats that needed another address
        self.streams: list[tuple[float, bool]] = []  # (ended at, ok)
        self.errors: list[tuple[float, str]] = []  # (sent at, what failed)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def chat(self) -> None:
        sent = time.monotonic()
        n = next(COUNTER)
        first = n % len(self.apis)
        ok = False
        for attempt, api in enumerate(self.apis[first:] + self.apis[:first]):
            try:
                api.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"request {n}"}],
                    max_tokens=8,
                )
                ok = True
                if attempt:
                    self.retried.append(sent)
                break
            except Exception as exc:
                self.errors.append((sent, f"{api.base_url}: {type(exc).__name__}: {str(exc)[:80]}"))
        self.results.append((sent, ok))

    def pace(self) -> None:
        while not self.stop.is_set():
            worker = threading.Thread(target=self.chat, daemon=True)
            worker.start()
            self.stop.wait(1 / self.rate)

    def stream_loop(self, index: int) -> None:
        first = index % len(self.stream_apis)
        apis = self.stream_apis[first:] + self.stream_apis[:first]
        while not self.stop.is_set():
            ok = False
            for api in apis:
                started = False
                try:
                    chunks = api.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": f"stream {next(COUNTER)}"}],
                        max_tokens=64,
                        stream=True,
                    )
                    for chunk in chunks:
                        started = True
                        if chunk.choices and chunk.choices[0].finish_reason:
                            ok = True
                except Exception:
                    ok = False
                if ok or started:  # done, or cut mid-way: a client cannot resume it
                    break
            self.streams.append((time.monotonic(), ok))

    def __enter__(self) -> Load:
        for target, args in ((self.pace, ()), (self.stream_loop, (0,)), (self.stream_loop, (1,))):
            thread = threading.Thread(target=target, args=args, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(70)

    def since(self, start: float) -> tuple[int, int, int, int, int]:
        chats = [ok for at, ok in list(self.results) if at >= start]
        streams = [ok for at, ok in list(self.streams) if at >= start]
        retried = len([at for at in list(self.retried) if at >= start])
        return chats.count(False), len(chats), streams.count(False), len(streams), retried

    def serving(self, start: float, streak: int = 20) -> bool:
        tail = [ok for at, ok in list(self.results) if at >= start][-streak:]
        return len(tail) == streak and all(tail)


def settle(daemon: Dynsupd, load: Load, names: list[str], start: float, limit: float) -> float:
    pace = threading.Event()
    while time.monotonic() - start < limit:
        # Every unit, as many as at the start: a surge moves the replicas' names.
        states = [u["state"] for u in status(daemon).values()]
        if len(states) >= len(names) and set(states) == {"RUNNING"} and load.serving(start):
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
    parser.add_argument("--frontends", type=int, default=1, help="[dynamo] frontend_replicas")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dynsup-continuity-") as tmp:
        root = Path(tmp)
        stack = make_stack(root, frontend_replicas=args.frontends)
        names = stack.all_units
        with contextlib.ExitStack() as restarts, run_dynsupd(root, stack.units) as daemon:
            wait_running(daemon, stack)
            rows: list[tuple[str, Callable[[], None], str]] = []

            def workers() -> list[str]:
                # A surge moves the replicas' names (tiny-0, tiny-1 -> tiny-2, tiny-0).
                return sorted(n for n in status(daemon) if n.startswith("tiny-"))

            def kill_worker() -> None:
                os.kill(status(daemon)[workers()[0]]["pid"], signal.SIGKILL)

            def hang_worker() -> None:
                victim = workers()[0]
                pid = status(daemon)[victim]["pid"]
                os.killpg(pid, signal.SIGSTOP)
                started = time.monotonic()
                replaced = float("nan")
                while time.monotonic() - started < args.hang:
                    now = status(daemon)[victim]
                    if now["state"] == "RUNNING" and now["pid"] not in (None, pid):
                        replaced = time.monotonic() - started
                        break
                    threading.Event().wait(0.1)
                print(f"  replaced after {replaced:.1f} s")
                if math.isnan(replaced):  # still hung: let it go on
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGCONT)

            def restart_worker() -> None:
                ctl(daemon, "restart", workers()[-1])

            def kill_frontend() -> None:
                os.kill(status(daemon)["frontend"]["pid"], signal.SIGKILL)

            def scale() -> None:
                ctl(daemon, "scale", "tiny", "1")
                ctl(daemon, "scale", "tiny", "2")

            def restart_daemon() -> None:
                nonlocal daemon
                before = {n: u["pid"] for n, u in status(daemon).items()}
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait(60)
                (root / "dynsupd.log").rename(root / f"dynsupd-{time.time_ns()}.log")
                daemon = restarts.enter_context(run_dynsupd(root, stack.units))
                for name in before:  # the names of now, not the stack's (a surge moved them)
                    daemon.wait_state(name, "RUNNING", timeout=240)
                after = {n: u["pid"] for n, u in status(daemon).items()}
                kept = [n for n, pid in before.items() if pid and after.get(n) == pid]
                print(f"  pids kept: {len(kept)} of {len(before)}")
                notes["daemon"] = f" (pids kept: {len(kept)} of {len(before)})"

            notes: dict[str, str] = {}
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
                (f"kill -9 frontend (of {args.frontends})", kill_frontend, "frontend"),
                ("kill -9 dynsupd, start it again", restart_daemon, "daemon"),
            ]
            table = []
            with Load(list(stack.frontends.values()), args.rate) as load:
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
                    if key != "frontend" and status(daemon)["frontend"]["pid"] != frontend:
                        label += " (frontend restarted)"
                    label += notes.get(key, "")
                    took = settle(daemon, load, names, start, 240)
                    failed, total, broken, streams, retried = load.since(start)
                    for at, error in load.errors:
                        if at >= start:
                            print(f"  +{at - start:.2f} s: {error}")
                    table.append((label, failed, total, retried, broken, streams, took))
            daemon.stop(timeout=120)
    print(f"\nfrontend_replicas = {args.frontends}")
    columns = ("failed / total requests", "retried elsewhere", "broken / total streams")
    print(f"| row | {' | '.join(columns)} | settled after |")
    print("|---|---|---|---|---|")
    for label, failed, total, retried, broken, streams, took in table:
        print(f"| {label} | {failed} / {total} | {retried} | {broken} / {streams} | {took:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
