#!/usr/bin/env python3
"""Cold start of the demo stack: from launching dynsupd to the first chat completion.

    .venv/bin/python bench/demo_cold_start.py [--runs 3] [--free-ports] [--explain]
                                              [--variant demo|lazy-transformers]

A benchmark, not a test. Each run launches a fresh ``dynsupd`` on the real
``units/demo`` directory with a temporary state directory and socket (so a
fresh discovery directory, nothing cached from a previous run except the
OS page cache), and measures, all relative to the moment just before the
daemon's ``Popen``:

* **first chat**: the end of the first ``POST /v1/chat/completions`` that
  returns 200 with a ``usage`` (polled on 127.0.0.1 with raw HTTP, one
  request at a time, 10 ms between attempts, bounded by ``--deadline``);
* the daemon's own start (its ``daemon.started`` event) and ``daemon.ready``
  (every autostart unit RUNNING);
* per unit, from the daemon's JSON events: when it was spawned (the
  ``STARTING`` event), when it became ready (``RUNNING``) and the time spent
  in STARTING in between;
* whether units that do not require one another started concurrently: their
  STARTING intervals overlap (the dependency graph comes from the unit files,
  expanded as dynsupd expands them).

The figure of merit is the median of "first chat" over ``--runs``; the
script exits 1 when it is 3 s or more, 2 when a run failed.

``--free-ports`` runs a copy of units/demo in a temporary directory whose
only differences are ``frontend_port`` and ``port_base`` (moved to ports
that are free) and the model path (made absolute): for a box where someone
else's demo already holds port 8000 or the demo's worker ports. Without it
the real directory is used and busy ports are an error.

``--explain`` also times the imports that dominate a cold start, each in a
fresh interpreter (median of 3): ``dynamo.mocker.main`` (which imports
``transformers`` at module level only to compute ``kv_bytes_per_token``),
``transformers`` alone, ``dynamo.frontend.main`` and ``dynsup.daemon``.

``--variant lazy-transformers`` measures the proposed change without
touching the supervisor: a copy of the demo (implies ``--free-ports``)
whose workers get ``PYTHONPATH`` with a ``sitecustomize`` that pre-seeds
``dynamo.mocker.utils.kv_cache`` with a stub (so ``transformers`` is never
imported) and ``--kv-bytes-per-token`` computed from the model's
config.json, as dynsup's expansion could do for mocker workers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEMO = REPO / "units" / "demo"
BIN = Path(sys.executable).parent
DYNSUPD = BIN / "dynsupd"
DYNSUPCTL = BIN / "dynsupctl"
THRESHOLD_S = 3.0

sys.path.insert(0, str(REPO))
from tests.daemon_helpers import free_port, port_is_free  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


# -- ports ---------------------------------------------------------------------


def stack_ports(units: Path) -> list[int]:
    """Every port dynsup will check for the stack in ``units`` (from its own expansion)."""
    return sorted({port for spec in load_specs(units).values() for port in spec.ports})


def free_port_base(models: list[tuple[str, list[tuple[str, int]]]]) -> int:
    """A port_base in 22000..30000 whose worker ports (for these models) are all free."""
    import random

    from dynsup.dynamo.ports import model_blocks
    from dynsup.dynamo.ports import worker_ports as ports_of

    for _ in range(200):
        base = random.randrange(22000, 30000)
        blocks = model_blocks([name for name, _ in models], base)
        wanted = [
            port
            for name, roles in models
            for role, count in roles
            for replica in range(count)
            for port in ports_of(blocks[name], role, replica, 1).all(1)
        ]
        if all(port_is_free(p) for p in wanted):
            return base
    raise RuntimeError("no free port_base found")


# -- unit directories --------------------------------------------------------------


def load_specs(units: Path, state_dir: str = "/nonexistent") -> dict:
    """The services dynsupd makes of ``units`` (implicit units and workers included)."""
    from dynsup.dynamo import StackContext, expand_stack
    from dynsup.units import load_units

    stack = StackContext(state_dir=state_dir)
    return load_units(
        [units],
        context={"state_dir": state_dir},
        expand=lambda services, others: expand_stack(services, others, stack),
    )


def requires_closure(specs: dict) -> dict[str, set[str]]:
    closure: dict[str, set[str]] = {}
    for name in specs:
        seen: set[str] = set()
        todo = list(specs[name].requires)
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(specs[dep].requires if dep in specs else ())
        closure[name] = seen
    return closure


def toml_value(value: object) -> str:
    """A TOML literal for the simple values unit files use (json is close enough)."""
    if isinstance(value, dict):
        inner = ", ".join(f"{key} = {toml_value(v)}" for key, v in value.items())
        return "{ " + inner + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def write_toml(path: Path, document: dict[str, dict], comment: str) -> None:
    lines = [f"# {comment}"]
    for table, body in document.items():
        plain = {k: v for k, v in body.items() if not (isinstance(v, dict) and k in ROLE_TABLES)}
        lines.append(f"[{table}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in plain.items()]
        for key, value in body.items():
            if key in ROLE_TABLES and isinstance(value, dict):
                lines.append(f"[{table}.{key}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")


ROLE_TABLES = ("prefill", "decode")


@dataclass
class DemoCopy:
    """units/demo copied to ``units`` with the ``[dynamo]`` and ``[model]`` keys changed."""

    units: Path
    frontend_port: int
    model: str


def demo_documents() -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """(stack file, model files by stem, their [model] tables) of units/demo."""
    stack: dict[str, dict] = {}
    models: dict[str, dict] = {}
    for path in sorted(DEMO.glob("*.toml")):
        document = tomllib.loads(path.read_text())
        if "dynamo" in document:
            stack = document
        elif "model" in document:
            models[path.stem] = document
    return stack, models, {stem: doc["model"] for stem, doc in models.items()}


def copy_demo(
    root: Path,
    *,
    stack_keys: dict[str, object] | None = None,
    model_keys: dict[str, object] | None = None,
) -> DemoCopy:
    """units/demo in ``root/units``: free frontend and worker ports, absolute model path."""
    stack, models, tables = demo_documents()
    units = root / "units"
    units.mkdir(parents=True)
    layout = []
    for stem, table in tables.items():
        if table.get("mode", "aggregated") == "disaggregated":
            roles = [(r, int(table.get(r, {}).get("replicas", 1))) for r in ROLE_TABLES]
        else:
            roles = [("agg", int(table.get("replicas", 1)))]
        layout.append((stem, roles))
    dynamo = {
        **stack["dynamo"],
        "frontend_port": free_port(),
        "port_base": free_port_base(layout),
        **(stack_keys or {}),
    }
    write_toml(units / "stack.toml", {"dynamo": dynamo}, "units/demo/stack.toml, ports moved")
    model_name = ""
    for stem, document in models.items():
        table = dict(document["model"])
        if not Path(table["path"]).is_absolute() and (DEMO / table["path"]).is_dir():
            table["path"] = str((DEMO / table["path"]).resolve())
        table.update(model_keys or {})
        model_name = model_name or table["name"]
        body = {k: v for k, v in document.items() if k != "model"}
        body["model"] = table
        write_toml(units / f"{stem}.toml", body, f"units/demo/{stem}.toml, path made absolute")
    return DemoCopy(units, int(dynamo["frontend_port"]), model_name)


def demo_port_and_model() -> tuple[int, str]:
    stack, _models, tables = demo_documents()
    model = next(iter(tables.values()))
    return int(stack["dynamo"].get("frontend_port", 8000)), model["name"]


LAZY_SITECUSTOMIZE = '''\
"""Pre-seed dynamo.mocker.utils.kv_cache so that `transformers` is never imported.

The real module imports transformers (about 1.6 s) only for AutoConfig in
compute_kv_bytes_per_token, which the mocker skips when it is given
--kv-bytes-per-token.
"""
import sys
import types

_stub = types.ModuleType("dynamo.mocker.utils.kv_cache")
_stub.DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS = 64.0


def _needs_the_flag(*args, **kwargs):
    raise RuntimeError("lazy-transformers stub: pass --kv-bytes-per-token")


_stub.compute_kv_bytes_per_token = _needs_the_flag
sys.modules[_stub.__name__] = _stub
'''


def kv_bytes_per_token(model_dir: Path) -> int:
    """2 (K and V) x layers x KV heads x head dim x dtype bytes, from config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype.removeprefix("torch."), 2)
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * width


def lazy_transformers_demo(root: Path) -> DemoCopy:
    stub = root / "stub"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(LAZY_SITECUSTOMIZE)
    _stack, _models, tables = demo_documents()
    table = next(iter(tables.values()))
    model_dir = (DEMO / table["path"]).resolve()
    args = {**table.get("engine_args", {}), "kv_bytes_per_token": kv_bytes_per_token(model_dir)}
    env = {**table.get("environment", {}), "PYTHONPATH": str(stub)}
    return copy_demo(root, model_keys={"engine_args": args, "environment": env})


# -- the daemon ----------------------------------------------------------------


def event_time(event: dict) -> float:
    """The wall-clock time (time.time()) of one of the daemon's JSON events."""
    stamp = str(event["timestamp"]).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(stamp).timestamp()


class Daemon:
    """A dynsupd in the foreground with JSON events on stderr (a file)."""

    def __init__(self, units: Path, workdir: Path) -> None:
        self.units = units
        self.socket = workdir / "dynsup.sock"
        self.state = workdir / "state"
        self.log = workdir / "dynsupd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.wall0 = 0.0
        self.mono0 = 0.0

    def start(self) -> None:
        with open(self.log, "wb") as err:
            self.wall0, self.mono0 = time.time(), time.monotonic()
            self.proc = subprocess.Popen(
                [
                    str(DYNSUPD),
                    "--socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.state),
                    "--log-format",
                    "json",
                    str(self.units),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self) -> list[dict]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and "event" in event:
                        out.append(event)
        return out

    def wait_event(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        pace = threading.Event()
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            if not self.alive():
                raise RuntimeError(f"dynsupd exited:\n{self.tail()}")
            pace.wait(0.02)  # polling the daemon's log file, bounded by the deadline
        raise TimeoutError(f"no such event within {timeout:g} s:\n{self.tail()}")

    def status(self) -> dict[str, dict]:
        done = subprocess.run(
            [str(DYNSUPCTL), "--socket", str(self.socket), "--json", "status"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode not in (0, 3):
            raise RuntimeError(f"dynsupctl status: {done.returncode} {done.stderr}")
        return {unit["name"]: unit for unit in json.loads(done.stdout)["units"]}

    def stop(self, timeout: float = 120) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def running_daemon(units: Path) -> Iterator[Daemon]:
    """dynsupd on ``units`` in a temporary directory; stopped (SIGTERM) on the way out."""
    # Under /tmp: a Unix socket path must stay short.
    with tempfile.TemporaryDirectory(prefix="dynsup-bench-", dir="/tmp") as tmp:
        daemon = Daemon(units, Path(tmp))
        daemon.start()
        try:
            yield daemon
        finally:
            rc = daemon.stop()
            if rc != 0:
                print(f"warning: dynsupd exited with {rc}", file=sys.stderr)


# -- the client ----------------------------------------------------------------


def chat(port: int, model: str, prompt: str, timeout: float = 10.0) -> tuple[bool, str]:
    """One chat completion on 127.0.0.1: (success, what happened)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return False, type(exc).__name__
    finally:
        conn.close()
    if response.status != 200:
        return False, f"HTTP {response.status}"
    try:
        usage = json.loads(data).get("usage") or {}
    except ValueError:
        return False, "bad JSON"
    if usage.get("completion_tokens", 0) > 0 and usage.get("prompt_tokens", 0) > 0:
        return True, "HTTP 200"
    return False, "HTTP 200 without usage"


# -- one cold start ------------------------------------------------------------


@dataclass
class UnitTimes:
    spawned: float  # seconds after launch: the STARTING event
    ready: float  # the RUNNING event
    requires: set[str] = field(default_factory=set)

    @property
    def starting(self) -> float:
        return self.ready - self.spawned


@dataclass
class Run:
    first_chat: float
    daemon_started: float | None
    daemon_ready: float | None
    units: dict[str, UnitTimes]
    attempts: int

    def concurrency(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(independent pairs whose STARTING overlapped, those that did not)."""
        overlapped, serial = [], []
        names = sorted(self.units)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ua, ub = self.units[a], self.units[b]
                if a in ub.requires or b in ua.requires:
                    continue
                if ua.spawned < ub.ready and ub.spawned < ua.ready:
                    overlapped.append((a, b))
                else:
                    serial.append((a, b))
        return overlapped, serial


def cold_start(units: Path, port: int, model: str, deadline: float) -> Run:
    closure = requires_closure(load_specs(units))
    with running_daemon(units) as daemon:
        first = None
        attempts = 0
        pace = threading.Event()
        while time.monotonic() - daemon.mono0 < deadline:
            attempts += 1
            ok, _what = chat(port, model, "Hello there", timeout=5.0)
            if ok:
                first = time.monotonic() - daemon.mono0
                break
            if not daemon.alive():
                raise RuntimeError(f"dynsupd exited:\n{daemon.tail()}")
            pace.wait(0.01)  # pacing the polls; each failed attempt returns at once
        if first is None:
            raise TimeoutError(f"no chat completion within {deadline:g} s:\n{daemon.tail()}")
        daemon.wait_event(lambda e: e.get("event") == "daemon.ready", timeout=60)
        events = daemon.events()
        wall0 = daemon.wall0

    def at(predicate: Callable[[dict], bool]) -> float | None:
        for event in events:
            if predicate(event):
                return event_time(event) - wall0
        return None

    times: dict[str, UnitTimes] = {}
    for name in closure:
        spawned = at(lambda e, n=name: _state(e, n, "STARTING"))
        ready = at(lambda e, n=name: _state(e, n, "RUNNING"))
        if spawned is not None and ready is not None:
            times[name] = UnitTimes(spawned, ready, closure[name])
    return Run(
        first_chat=first,
        daemon_started=at(lambda e: e.get("event") == "daemon.started"),
        daemon_ready=at(lambda e: e.get("event") == "daemon.ready"),
        units=times,
        attempts=attempts,
    )


def _state(event: dict, unit: str, state: str) -> bool:
    return (
        event.get("event") == "unit.state"
        and event.get("unit") == unit
        and event.get("new") == state
    )


# -- imports (--explain) -------------------------------------------------------

IMPORTS = [
    ("python -c pass (interpreter start)", "pass"),
    ("import transformers (AutoConfig)", "import transformers; transformers.AutoConfig"),
    ("import dynamo.mocker.main", "import dynamo.mocker.main"),
    ("import dynamo.frontend.main", "import dynamo.frontend.main"),
    ("import dynsup.daemon", "import dynsup.daemon"),
]


def time_imports(reps: int = 3) -> list[tuple[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = []
    for label, code in IMPORTS:
        samples = []
        for _ in range(reps):
            start = time.monotonic()
            subprocess.run(
                [sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120
            )
            samples.append(time.monotonic() - start)
        out.append((label, statistics.median(samples)))
    return out


def kv_cache_import_share() -> tuple[float, float]:
    """(cumulative import time of dynamo.mocker.main, of its kv_cache module) in s."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import dynamo.mocker.main"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    total = kv = 0.0
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        name = parts[2].strip()
        if name == "dynamo.mocker.main":
            total = int(parts[1]) / 1e6
        elif name == "dynamo.mocker.utils.kv_cache":
            kv = int(parts[1]) / 1e6
    return total, kv


# -- main ----------------------------------------------------------------------


def print_run(index: int, run: Run) -> None:
    started = f"{run.daemon_started:.2f}" if run.daemon_started is not None else "?"
    ready = f"{run.daemon_ready:.2f}" if run.daemon_ready is not None else "?"
    print(
        f"run {index}: first chat {run.first_chat:.2f} s "
        f"(daemon.started {started} s, daemon.ready {ready} s, {run.attempts} polls)"
    )
    for name, unit in sorted(run.units.items(), key=lambda kv: kv[1].spawned):
        needs = f"  requires {', '.join(sorted(unit.requires))}" if unit.requires else ""
        print(
            f"    {name:<16} spawned {unit.spawned:5.2f}  RUNNING {unit.ready:5.2f}  "
            f"STARTING {unit.starting:5.2f} s{needs}"
        )
    overlapped, serial = run.concurrency()
    if serial:
        pairs = ", ".join(f"{a}/{b}" for a, b in serial)
        print(f"    independent units NOT concurrent: {pairs}")
    else:
        print(f"    independent units started concurrently: all {len(overlapped)} pairs overlap")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold starts to take the median of")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds, per run")
    parser.add_argument(
        "--free-ports", action="store_true", help="run a copy of units/demo on free ports"
    )
    parser.add_argument("--variant", choices=("demo", "lazy-transformers"), default="demo")
    parser.add_argument("--explain", action="store_true", help="also time the big imports")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dynsup-demo-copy-") as tmp:
        if args.variant == "lazy-transformers":
            copy = lazy_transformers_demo(Path(tmp))
            units, port, model = copy.units, copy.frontend_port, copy.model
            where = f"copy of units/demo, stubbed kv_cache + --kv-bytes-per-token, port {port}"
        elif args.free_ports:
            copy = copy_demo(Path(tmp))
            units, port, model = copy.units, copy.frontend_port, copy.model
            where = f"copy of units/demo on free ports (frontend {port})"
        else:
            units = DEMO
            port, model = demo_port_and_model()
            busy = [p for p in [port, *stack_ports(units)] if not port_is_free(p)]
            if busy:
                print(
                    f"ports {busy} of units/demo are busy (another demo running?); "
                    "use --free-ports",
                    file=sys.stderr,
                )
                return 2
            where = f"{units} (frontend port {port})"
        print(f"demo cold start: {where}; {os.cpu_count()} CPUs; {args.runs} run(s)")
        print(f"dynsupd: {DYNSUPD}")
        runs = []
        for index in range(1, args.runs + 1):
            try:
                run = cold_start(units, port, model, args.deadline)
            except (RuntimeError, TimeoutError) as exc:
                print(f"run {index} failed: {exc}", file=sys.stderr)
                return 2
            runs.append(run)
            print_run(index, run)

    median = statistics.median(r.first_chat for r in runs)
    print()
    print(
        f"first chat completion after launch: median {median:.2f} s "
        f"(min {min(r.first_chat for r in runs):.2f}, max {max(r.first_chat for r in runs):.2f})"
    )
    names = sorted({n for r in runs for n in r.units})
    for name in names:
        values = [r.units[name].starting for r in runs if name in r.units]
        print(f"    {name:<16} STARTING median {statistics.median(values):.2f} s")
    started = [r.daemon_started for r in runs if r.daemon_started is not None]
    if started:
        print(f"    dynsupd launch -> daemon.started median {statistics.median(started):.2f} s")
    concurrent = all(not r.concurrency()[1] for r in runs)
    print(f"    independent units started concurrently in every run: {concurrent}")

    if args.explain:
        print()
        print("imports, each in a fresh interpreter (median of 3):")
        for label, seconds in time_imports():
            print(f"    {label:<40} {seconds:.2f} s")
        total, kv = kv_cache_import_share()
        print(
            f"    -X importtime: dynamo.mocker.main {total:.2f} s cumulative, of which "
            f"dynamo.mocker.utils.kv_cache (transformers) {kv:.2f} s"
        )

    verdict = "OK" if median < THRESHOLD_S else "SLOW"
    print(f"{verdict}: median {median:.2f} s vs threshold {THRESHOLD_S:g} s")
    return 0 if median < THRESHOLD_S else 1


if __name__ == "__main__":
    sys.exit(main())
