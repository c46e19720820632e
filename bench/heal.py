#!/usr/bin/env python3
"""Healing: kill -9 one process of a running demo stack while a client sends requests.

    .venv/bin/python bench/heal.py [--rounds 1] [--rate 20] [--observe 20] [--max 180]
                                   [--only demo|etcd]

A benchmark, not a test. Two stacks, one after the other, each run by a
fresh ``dynsupd`` (temporary state directory and socket):

* ``demo``: a copy of units/demo (file discovery, KV router, two mocker
  replicas) whose only changes are free ports and an absolute model path.
  Victims: one mocker worker of the two (``tiny-0``), then the frontend.
* ``etcd``: the same with ``discovery = "etcd"`` and ``event_plane =
  "nats"``, so dynsup also runs etcd and NATS. Victims: etcd, then NATS.

For each victim: wait until every unit is RUNNING and 5 chats in a row
succeed; start the client (one request at a time, distinct prompts so the
KV router spreads them over both replicas, ``--rate`` per second, 5 s
timeout each, on 127.0.0.1); after 1 s, SIGKILL the victim's pid (from
``dynsupctl --json status``); keep the client going until at least
``--observe`` seconds after the kill *and* the last 20 requests succeeded
(never more than ``--max`` seconds). Figures, all from the kill:

* **failed / sent**: requests sent after the kill that did not return 200
  with a ``usage``, with the kinds of failure;
* **back**: the victim is RUNNING again under a new pid (the daemon's
  ``unit.state`` event: its readiness probe passed, i.e. a worker's
  ``/health`` is 200, the frontend lists the model, etcd ``/health``, NATS
  ``/healthz``);
* **serving**: when "both replicas serve again": the later of *back* and
  the end of the last failed request; from then on, until the end of the
  observation, every request succeeded. With distinct prompts the KV
  router sends about half of the requests to each replica, so a failure-free
  tail after *back* means the dead instance no longer gets traffic and the
  restarted one does not fail any;
* the frontend's view (``GET /health``, counted every ~0.25 s): how many
  ``generate`` instances it knows (dynsup withdraws a SIGKILLed worker's
  records before restarting it; left alone they stay until their discovery
  TTL, 10 s, runs out);
* collateral: other units whose pid changed (restarted with the victim).

At the end each daemon is stopped with SIGTERM; its exit status and any
process of the stack still alive afterwards are printed. Exit status 0;
2 when a stack did not heal within ``--max``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_cold_start import (  # a sibling script, found through sys.path
    Daemon,
    chat,
    copy_demo,
    event_time,
    free_port,
    running_daemon,
)

STREAK = 20  # requests in a row that must succeed at the end of an observation
WARM = 5  # chats in a row that must succeed before a kill
PROMPTS = itertools.count()


@dataclass
class Sample:
    start: float  # monotonic
    end: float
    ok: bool
    what: str


@dataclass
class Client:
    """One request at a time in a thread, paced; /health of the frontend now and then."""

    port: int
    model: str
    rate: float
    samples: list[Sample] = field(default_factory=list)
    instances: list[tuple[float, int | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __enter__(self) -> Client:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)

    def _loop(self) -> None:
        interval = 1.0 / self.rate
        last_health = 0.0
        while not self.stop.is_set():
            start = time.monotonic()
            ok, what = chat(self.port, self.model, f"request {next(PROMPTS)}", timeout=5.0)
            self.samples.append(Sample(start, time.monotonic(), ok, what))
            if time.monotonic() - last_health >= 0.25:
                last_health = time.monotonic()
                self.instances.append((last_health, generate_instances(self.port)))
            self.stop.wait(max(0.0, start + interval - time.monotonic()))  # pacing

    def tail_ok(self, count: int) -> bool:
        tail = self.samples[-count:]
        return len(tail) == count and all(s.ok for s in tail)


def generate_instances(port: int) -> int | None:
    """How many ``generate`` endpoint instances the frontend knows; None: no answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    return sum(1 for i in body.get("instances", []) if i.get("endpoint") == "generate")


@dataclass
class Outcome:
    stack: str
    victim: str
    sent: int
    failed: int
    kinds: Counter[str]
    back: float | None
    serving: float | None
    last_failure: float | None
    instances: str
    collateral: list[str]


def wait_all_running(daemon: Daemon, port: int, model: str, timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    pace = threading.Event()
    streak = 0
    units: dict[str, dict] = {}
    while time.monotonic() < deadline:
        units = daemon.status()
        if units and all(u["state"] == "RUNNING" for u in units.values()):
            ok, _ = chat(port, model, f"warm-up {next(PROMPTS)}", timeout=5.0)
            streak = streak + 1 if ok else 0
            if streak >= WARM:
                return units
        pace.wait(0.1)  # polling the daemon, bounded by the deadline
    raise TimeoutError(f"stack not RUNNING and serving within {timeout:g} s: {units}")


def instance_story(client: Client, kill: float) -> str:
    """The frontend's generate-instance counts after the kill, as changes: '2, 3@+2.6, 2@+10.4'."""
    out: list[str] = []
    last: object = object()
    for at, count in client.instances:
        if at < kill - 1.0:
            continue
        if count != last:
            shown = "-" if count is None else str(count)
            out.append(shown if not out else f"{shown}@+{at - kill:.1f}")
            last = count
    return ", ".join(out) or "?"


def kill_and_watch(
    daemon: Daemon,
    stack: str,
    victim: str,
    port: int,
    model: str,
    args: argparse.Namespace,
) -> Outcome:
    before = wait_all_running(daemon, port, model, args.max)
    old_pid = before[victim]["pid"]
    with Client(port, model, args.rate) as client:
        pace = threading.Event()
        pace.wait(1.0)  # a second of traffic before the kill
        kill_wall, kill_mono = time.time(), time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        back: float | None = None
        deadline = kill_mono + args.max
        while time.monotonic() < deadline:
            if back is None:
                for event in daemon.events():
                    if (
                        event.get("event") == "unit.state"
                        and event.get("unit") == victim
                        and event.get("new") == "RUNNING"
                        and event.get("pid") not in (None, old_pid)
                        and event_time(event) >= kill_wall
                    ):
                        back = event_time(event) - kill_wall
                        break
            observed = time.monotonic() - kill_mono >= args.observe
            if back is not None and observed and client.tail_ok(STREAK):
                break
            pace.wait(0.1)  # the client works in its thread; this only watches
    after = daemon.status()
    samples = [s for s in client.samples if s.start >= kill_mono]
    failures = [s for s in samples if not s.ok]
    last_failure = max((s.end - kill_mono for s in failures), default=None)
    healed = back is not None and client.tail_ok(STREAK)
    serving = None
    if healed and back is not None:
        serving = max(back, last_failure or 0.0)
    collateral = [
        f"{name} (restarts {unit['restarts']})"
        for name, unit in sorted(after.items())
        if name != victim and unit.get("pid") != before.get(name, {}).get("pid")
    ]
    return Outcome(
        stack=stack,
        victim=victim,
        sent=len(samples),
        failed=len(failures),
        kinds=Counter(s.what for s in failures),
        back=back,
        serving=serving,
        last_failure=last_failure,
        instances=instance_story(client, kill_mono),
        collateral=collateral,
    )


def stack_processes(daemon: Daemon) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for unit in daemon.status().values():
        if unit.get("pid"):
            with contextlib.suppress(psutil.NoSuchProcess):
                leader = psutil.Process(unit["pid"])
                procs += [leader, *leader.children(recursive=True)]
    return procs


def show(seconds: float | None) -> str:
    return "-" if seconds is None else f"+{seconds:.2f} s"


def print_outcome(o: Outcome) -> None:
    kinds = ", ".join(f"{what} x{n}" for what, n in o.kinds.most_common()) or "none"
    print(
        f"  kill -9 {o.victim}: {o.failed} of {o.sent} requests failed ({kinds}); "
        f"back {show(o.back)}; last failure {show(o.last_failure)}; "
        f"serving again {show(o.serving)}"
    )
    print(f"      frontend's generate instances: {o.instances}")
    print(f"      other units restarted: {', '.join(o.collateral) or 'none'}")


def run_stack(name: str, victims: list[str], stack_keys: dict, args: argparse.Namespace) -> list:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix=f"dynsup-heal-{name}-") as tmp:
        copy = copy_demo(Path(tmp), stack_keys=stack_keys)
        settings = ", ".join(f"{k} = {v!r}" for k, v in stack_keys.items()) or "as in units/demo"
        print(f"stack {name}: copy of units/demo ({settings}), frontend port {copy.frontend_port}")
        seen: list[psutil.Process] = []
        with running_daemon(copy.units) as daemon:
            daemon.wait_event(lambda e: e.get("event") == "daemon.started", timeout=60)
            for _round in range(args.rounds):
                for victim in victims:
                    seen += stack_processes(daemon)
                    outcome = kill_and_watch(
                        daemon, name, victim, copy.frontend_port, copy.model, args
                    )
                    print_outcome(outcome)
                    outcomes.append(outcome)
            seen += stack_processes(daemon)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            rc = daemon.proc.wait(120)
        left = []
        for proc in seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
        print(f"  orderly stop: dynsupd exit status {rc}; processes left: {left or 'none'}")
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="kills per victim")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--observe", type=float, default=20.0, help="seconds after each kill")
    parser.add_argument("--max", type=float, default=180.0, help="bound per kill, seconds")
    parser.add_argument("--only", choices=("demo", "etcd"), help="run one of the two stacks")
    args = parser.parse_args(argv)

    print(f"heal: {os.cpu_count()} CPUs, {args.rate:g} requests/s, observe {args.observe:g} s")
    outcomes: list[Outcome] = []
    if args.only in (None, "demo"):
        outcomes += run_stack("demo", ["tiny-0", "frontend"], {}, args)
    if args.only in (None, "etcd"):
        keys = {
            "discovery": "etcd",
            "event_plane": "nats",
            "etcd_port": free_port(also=1),
            "nats_port": free_port(also=4000),
        }
        outcomes += run_stack("etcd", ["etcd", "nats"], keys, args)

    print()
    print(f"{'stack':<6} {'victim':<9} {'failed/sent':>12} {'back':>9} {'serving again':>14}")
    for victim in dict.fromkeys((o.stack, o.victim) for o in outcomes):
        rows = [o for o in outcomes if (o.stack, o.victim) == victim]
        failed = sum(o.failed for o in rows)
        sent = sum(o.sent for o in rows)
        backs = [o.back for o in rows if o.back is not None]
        servings = [o.serving for o in rows if o.serving is not None]
        back = f"{statistics.median(backs):.2f} s" if backs else "never"
        serving = f"{statistics.median(servings):.2f} s" if len(servings) == len(rows) else "never"
        print(f"{victim[0]:<6} {victim[1]:<9} {f'{failed}/{sent}':>12} {back:>9} {serving:>14}")
    if args.rounds > 1:
        print(f"(medians over {args.rounds} rounds; failed/sent summed)")
    return 0 if all(o.serving is not None for o in outcomes) else 2


if __name__ == "__main__":
    sys.exit(main())
