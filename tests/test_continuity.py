"""Continuity: what the users of the endpoint see when a worker hangs or is stopped.

The demo stack (Dynamo frontend, two mocker workers, file discovery) run by a
real dynsupd, as in test_demo_stack. A hung worker (SIGSTOP) must be found by
its liveness probe, withdrawn from discovery before it is killed, and
replaced; a worker stopped by hand must first be withdrawn and let the
requests it serves finish. Waits are on the daemon's events and bounded by
generous deadlines; nothing asserts how fast, only the order and the outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from dynsup.dynamo.drain import in_flight
from dynsup.probes import http_get

from .daemon_helpers import run_dynsupd
from .test_demo_stack import (
    HEAL_TIMEOUT,
    MODEL,
    Stack,
    chat_ok,
    client,
    first_index,
    make_stack,
    running_stack,
    status,
    until_serving,
    wait_back,
    wait_running,
)

pytestmark = pytest.mark.dynamo


def test_a_hung_worker_is_withdrawn_killed_and_replaced(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, units):
        api = client(stack, timeout=20)
        assert chat_ok(api)
        victim, other = stack.workers
        old_pid = units[victim]["pid"]
        since = len(daemon.events())
        os.killpg(old_pid, signal.SIGSTOP)  # an NCCL deadlock, a wedged runtime
        new_pid = wait_back(daemon, victim, old_pid, since)

        events = daemon.events()[since:]
        not_live = first_index(events, event="unit.not_live", unit=victim)
        withdrawn = first_index(events, event="dynamo.withdrawn", unit=victim)
        stopping = first_index(events, event="unit.state", unit=victim, new="STOPPING")
        assert not_live < withdrawn < stopping, events
        assert events[stopping]["reason"].startswith("liveness: http "), events[stopping]
        assert "terminated by SIGKILL" in events[stopping]["reason"]
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie"
        after = status(daemon)
        assert after[victim]["pid"] == new_pid and after[victim]["restarts"] >= 1
        # Nothing else was touched, and the endpoint serves on both replicas again.
        assert after[other]["pid"] == units[other]["pid"]
        assert after["frontend"]["pid"] == units["frontend"]["pid"]
        until_serving(api, time.monotonic() + HEAL_TIMEOUT)


def test_a_busy_worker_is_not_found_dead(tmp_path: Path) -> None:
    """Liveness is the runtime's /live, not the engine's work: a worker serving a
    stream of requests for longer than failures x (interval + timeout) stays."""
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, units):
        api = client(stack, timeout=20)
        deadline = time.monotonic() + 12  # > 3 x (1 s + 2 s) of the mocker's default
        outcomes = []
        while time.monotonic() < deadline:
            outcomes.append(chat_ok(api))
        assert all(outcomes) and len(outcomes) > 10
        assert not [e for e in daemon.events() if e.get("event") == "unit.not_live"]
        assert {n: u["pid"] for n, u in status(daemon).items()} == {
            n: u["pid"] for n, u in units.items()
        }


STREAM_TOKENS = 300  # about 15 s at speedup 0.1: longer than the stop takes


def slow_stack(tmp_path: Path) -> Stack:
    """The demo with a mocker slow enough for a stream of a few seconds."""
    stack = make_stack(tmp_path)
    path = stack.units / "tiny.toml"
    path.write_text(path.read_text().replace("speedup_ratio = 0", "speedup_ratio = 0.1"))
    return stack


def metrics(port: int) -> int:
    import anyio

    async def read() -> int:
        _, body = await http_get(f"http://127.0.0.1:{port}/metrics")
        return in_flight(body)

    return anyio.run(read)


def system_port(daemon, name: str) -> int:  # type: ignore[no-untyped-def]
    env = psutil.Process(status(daemon)[name]["pid"]).environ()
    return int(env["DYN_SYSTEM_PORT"])


def test_a_stopped_worker_finishes_its_stream_first(tmp_path: Path) -> None:
    stack = slow_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, _units):
        api = client(stack, timeout=120)
        result: dict[str, object] = {}
        started = threading.Event()

        def stream() -> None:
            try:
                chunks = api.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "tell me a long story"}],
                    max_tokens=STREAM_TOKENS,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                for chunk in chunks:
                    started.set()
                    if chunk.choices and chunk.choices[0].finish_reason:
                        result["finish"] = chunk.choices[0].finish_reason
                    if chunk.usage is not None:
                        result["tokens"] = chunk.usage.completion_tokens
            except Exception as exc:  # the stream broke: what the test must not see
                result["error"] = repr(exc)
            finally:
                started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(HEAL_TIMEOUT)
        # The worker that serves it: its own in-flight gauge says so.
        ports = {name: system_port(daemon, name) for name in stack.workers}
        serving = [name for name, port in ports.items() if metrics(port) > 0]
        assert len(serving) == 1, serving
        since = len(daemon.events())
        done = daemon.ctl("stop", serving[0], timeout=HEAL_TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr
        reader.join(HEAL_TIMEOUT)
        assert result.get("finish") in ("length", "stop"), result
        assert result.get("tokens") == STREAM_TOKENS, result

        events = daemon.events()[since:]
        withdrawn = first_index(events, event="dynamo.withdrawn", unit=serving[0])
        drained = first_index(events, event="dynamo.drained", unit=serving[0])
        stopped = first_index(events, event="unit.state", unit=serving[0], new="STOPPED")
        assert withdrawn < drained < stopped, events


def replay_states(events: list[dict], names: list[str], start: dict[str, str]) -> list[dict]:
    """The states of ``names`` after each of their state events, from ``start``."""
    states = dict(start)
    seen = []
    for event in events:
        if event.get("event") == "unit.state" and event.get("unit") in names:
            states[event["unit"]] = event["new"]
            seen.append(dict(states))
    return seen


def test_update_with_surge_off_replaces_a_models_replicas_one_at_a_time(tmp_path: Path) -> None:
    """`[model] surge = false`: drain first, each replica on its own slot."""
    stack = make_stack(tmp_path)
    path = stack.units / "tiny.toml"
    path.write_text(path.read_text().replace("[model]", "[model]\nsurge = false"))
    with running_stack(tmp_path, stack) as (daemon, units):
        api = client(stack, timeout=20)
        path.write_text(
            path.read_text().replace("speedup_ratio = 0", "speedup_ratio = 0, block_size = 32")
        )
        since = len(daemon.events())
        outcomes: list[bool] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                outcomes.append(chat_ok(api))
                done.wait(0.05)

        sender = threading.Thread(target=load)
        sender.start()
        try:
            update = daemon.ctl("update", timeout=HEAL_TIMEOUT)
        finally:
            done.set()
            sender.join(60)
        assert update.returncode == 0, update.stdout + update.stderr
        # update returned once every new replica is RUNNING, under a new pid.
        after = status(daemon)
        # It said so as it went: each replica drained, started, RUNNING and
        # admitted before the next one was touched; then "settled".
        lines = update.stdout.splitlines()
        assert lines[0].startswith("tiny: rolling update: drain first"), lines
        expected = [
            line
            for name in stack.workers
            for line in (
                f"{name}: draining",
                f"{name}: stopped",
                f"{name}: started (pid {after[name]['pid']})",
                f"{name}: RUNNING",
                f"{name}: admitted (the frontends route to it)",
            )
        ]
        assert [line for line in lines if line in expected] == expected, lines
        assert lines[-1] == "settled", lines
        for name in stack.workers:
            assert after[name]["state"] == "RUNNING", after[name]
            assert after[name]["pid"] != units[name]["pid"]
            assert "--block-size" in psutil.Process(after[name]["pid"]).cmdline()
        assert after["frontend"]["pid"] == units["frontend"]["pid"]
        # At every moment of the update, one replica at least was RUNNING...
        events = daemon.events()[since:]
        moments = replay_states(events, stack.workers, dict.fromkeys(stack.workers, "RUNNING"))
        assert len(moments) >= 2 * len(stack.workers), moments
        assert all("RUNNING" in m.values() for m in moments), moments
        # ...and no request failed.
        assert outcomes and all(outcomes), outcomes


def test_an_updated_replica_is_routed_to_before_the_last_old_one_is_drained(
    tmp_path: Path,
) -> None:
    """The 404 of a rolling update: Dynamo's frontend pinned the model's WorkerSet to
    the first card's checksum and rejected the changed replicas' cards while an old
    one lived, so "admitted" (listed in /health) was not routed to, and draining
    the last old replica left the model with no set: "model not found"."""
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, _):
        change_engine_args(stack, "block_size = 32")  # changes the model card's checksum
        update = daemon.ctl("update", timeout=HEAL_TIMEOUT)
        assert update.returncode == 0, update.stdout + update.stderr
        tail = daemon.ctl("tail", "-n", "100000", "frontend", timeout=60)
        frontend = tail.stdout
        assert "Adding worker set to model" in frontend, tail.stderr  # the log is read
        assert "Rejected incompatible workers" not in frontend
        assert "Removed empty model" not in frontend
        assert chat_ok(client(stack, timeout=20))


def change_engine_args(stack: Stack, extra: str) -> None:
    path = stack.units / "tiny.toml"
    path.write_text(path.read_text().replace("speedup_ratio = 0", f"speedup_ratio = 0, {extra}"))


def load_while(api, outcomes: list[bool], done: threading.Event) -> threading.Thread:  # type: ignore[no-untyped-def]
    """Chat requests one after another (20/s at most) until done is set."""

    def load() -> None:
        while not done.is_set():
            outcomes.append(chat_ok(api))
            done.wait(0.05)

    sender = threading.Thread(target=load)
    sender.start()
    return sender


def step_index(events: list[dict], unit: str, step: str) -> int:
    return first_index(events, event="rollout.step", unit=unit, step=step)


def test_update_with_surge_starts_each_new_replica_before_an_old_one_leaves(
    tmp_path: Path,
) -> None:
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, units):
        api = client(stack, timeout=20)
        change_engine_args(stack, "block_size = 32")
        since = len(daemon.events())
        outcomes: list[bool] = []
        done = threading.Event()
        sender = load_while(api, outcomes, done)
        try:
            update = daemon.ctl("update", timeout=HEAL_TIMEOUT)
        finally:
            done.set()
            sender.join(60)
        assert update.returncode == 0, update.stdout + update.stderr
        lines = update.stdout.splitlines()
        assert lines[0].startswith("tiny: rolling update: surge"), lines
        assert lines[-1] == "settled", lines
        # Slots [0, 1] became [2, 0]: the spare tiny-2 first, tiny-0 in place, tiny-1 gone.
        after = status(daemon)
        assert sorted(n for n in after if n.startswith("tiny-")) == ["tiny-0", "tiny-2"], after
        for name in ("tiny-0", "tiny-2"):
            assert after[name]["state"] == "RUNNING", after[name]
            assert "--block-size" in psutil.Process(after[name]["pid"]).cmdline()
        assert not psutil.pid_exists(units["tiny-1"]["pid"])
        assert after["frontend"]["pid"] == units["frontend"]["pid"]
        events = daemon.events()[since:]
        # Each new replica was RUNNING and admitted before an old one was drained...
        assert step_index(events, "tiny-2", "admitted") < step_index(events, "tiny-0", "draining")
        assert step_index(events, "tiny-0", "admitted") < step_index(events, "tiny-1", "draining")
        # ...so two replicas at least were RUNNING at every moment...
        workers = ["tiny-0", "tiny-1", "tiny-2"]
        start = {"tiny-0": "RUNNING", "tiny-1": "RUNNING", "tiny-2": "STOPPED"}
        moments = replay_states(events, workers, start)
        assert len(moments) >= 6, moments
        assert all(list(m.values()).count("RUNNING") >= 2 for m in moments), moments
        # ...and no request failed.
        assert outcomes and all(outcomes), outcomes
        # The new slots are saved: the same update again changes nothing.
        again = daemon.ctl("update", timeout=HEAL_TIMEOUT)
        assert again.stdout == "No config updates to processes\n", again.stdout + again.stderr


def test_a_daemon_killed_mid_surge_ends_with_exactly_the_new_replicas(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    with run_dynsupd(tmp_path, stack.units) as daemon:
        units = wait_running(daemon, stack)
        change_engine_args(stack, "block_size = 32")
        done = daemon.ctl("update", "--no-wait")
        assert done.returncode == 0, done.stdout + done.stderr
        # The spare runs the new spec; the old replicas have not been touched.
        daemon.wait_event(
            lambda e: (
                e.get("event") == "rollout.step"
                and e.get("unit") == "tiny-2"
                and e.get("step") == "running"
            ),
            timeout=HEAL_TIMEOUT,
        )
        spare = status(daemon)["tiny-2"]["pid"]
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(30)
        (tmp_path / "dynsupd.log").rename(tmp_path / "first.log")
        with run_dynsupd(tmp_path, stack.units) as second:
            for name in ("tiny-0", "tiny-2", "frontend"):
                second.wait_state(name, "RUNNING", timeout=HEAL_TIMEOUT)
            after = status(second)
            assert sorted(n for n in after if n.startswith("tiny-")) == ["tiny-0", "tiny-2"]
            assert after["tiny-2"]["pid"] == spare  # adopted: it matches its spec
            for name in ("tiny-0", "tiny-2"):
                assert "--block-size" in psutil.Process(after[name]["pid"]).cmdline()
            for old in ("tiny-0", "tiny-1"):
                proc_gone(units[old]["pid"])
            until_serving(client(stack, timeout=20), time.monotonic() + HEAL_TIMEOUT)
            assert second.stop(timeout=120) == 0, second.stderr_path.read_text()[-4000:]


def proc_gone(pid: int) -> None:
    """The process ends (a stale replica is stopped by the next daemon), within a deadline."""
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=HEAL_TIMEOUT)


def test_update_names_the_replica_that_cannot_start_and_exits_1(tmp_path: Path) -> None:
    """With surge, the spare is the first to fail: both old replicas are kept serving."""
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, units):
        change_engine_args(stack, "no_such_flag = 1")  # the mocker's parser exits 2
        update = daemon.ctl("update", timeout=HEAL_TIMEOUT)
        assert update.returncode == 1, update.stdout + update.stderr
        lines = update.stdout.splitlines()
        failed = [line for line in lines if line.startswith("tiny-2: ERROR (")]
        assert failed and "exit status 2" in failed[0], lines
        for kept in stack.workers:
            assert f"{kept}: kept (old spec: the rollout halted at tiny-2)" in lines
        assert lines[-1] == "not settled: 1 unit(s) failed to come up", lines
        # The replicas not replaced still serve, under their old pids.
        after = status(daemon)
        for kept in stack.workers:
            assert after[kept]["state"] == "RUNNING"
            assert after[kept]["pid"] == units[kept]["pid"]
        assert chat_ok(client(stack, timeout=20))


def test_update_no_wait_returns_before_the_replicas_are_running(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, units):
        change_engine_args(stack, "block_size = 32")
        done = daemon.ctl("--json", "update", "--no-wait")
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout)
        # Accepted and saved, not carried out: no new replica came up yet.
        assert result["applied"] is True and result["settled"] is False, result
        # A surge: slots [0, 1] become [2, 0].
        plan = (result["added"], sorted(result["changed"]), result["removed"])
        assert plan == (["tiny-2"], ["tiny-0"], ["tiny-1"]), result
        assert not [s for s in result["progress"] if s["step"] in ("started", "running")], result
        # The rollout goes on without the client; the next write waits for it.
        daemon.wait_event(
            lambda e: (
                e.get("event") == "rollout.step"
                and e.get("unit") == "tiny-1"
                and e.get("step") == "removed"
            ),
            timeout=HEAL_TIMEOUT,
        )
        after = status(daemon)
        for name in ("tiny-0", "tiny-2"):
            assert after[name]["state"] == "RUNNING"
            assert after[name]["pid"] not in (units["tiny-0"]["pid"], units["tiny-1"]["pid"])
        again = daemon.ctl("update", timeout=HEAL_TIMEOUT)
        assert again.stdout == "No config updates to processes\n", again.stdout + again.stderr


def test_adding_and_removing_a_model_leaves_the_frontend_and_other_models_alone(
    tmp_path: Path,
) -> None:
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, units):
        path = stack.units / "other.toml"
        path.write_text(
            (stack.units / "tiny.toml")
            .read_text()
            .replace('name = "tiny"', 'name = "other"')
            .replace("replicas = 2", "replicas = 1")
        )
        added = daemon.ctl("update", timeout=HEAL_TIMEOUT)
        assert added.returncode == 0, added.stdout + added.stderr
        daemon.wait_state("other-0", "RUNNING", timeout=HEAL_TIMEOUT)
        api = client(stack, timeout=20)

        def other_served() -> bool:
            return "other" in {m.id for m in api.models.list().data}

        deadline = time.monotonic() + HEAL_TIMEOUT
        while not other_served():
            assert time.monotonic() < deadline
            threading.Event().wait(0.1)  # the frontend learns of it from discovery
        path.unlink()
        removed = daemon.ctl("update", timeout=HEAL_TIMEOUT)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        after = status(daemon)
        assert "other-0" not in after
        for name in ("frontend", *stack.workers):
            assert after[name]["pid"] == units[name]["pid"], name
        assert chat_ok(api)


def test_a_model_the_frontend_does_not_serve_is_healed_by_the_canary(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    with running_stack(tmp_path, stack) as (daemon, units):
        api = client(stack, timeout=20)
        assert chat_ok(api)
        since = len(daemon.events())
        # The model's cards gone from discovery: every unit RUNNING, every /health
        # 200, and the frontend no longer serves the model (404).
        cards = tmp_path / "state" / "dynamo-discovery" / "demo" / "v1" / "mdc"
        for card in cards.iterdir():
            card.unlink()
        unhealthy = daemon.wait_event(
            lambda e: e.get("event") == "model.unhealthy" and e.get("model") == MODEL,
            timeout=HEAL_TIMEOUT,
        )
        assert unhealthy["reason"].startswith(f"canary: {MODEL}: POST /v1/completions answered 404")
        for name in stack.workers:
            wait_back(daemon, name, units[name]["pid"], since)
        until_serving(api, time.monotonic() + HEAL_TIMEOUT)
        events = daemon.events()[since:]
        pending = first_index(events, event="unit.state", unit=stack.workers[0], new="PENDING")
        assert events[pending]["reason"] == unhealthy["reason"]
        assert status(daemon)["frontend"]["pid"] == units["frontend"]["pid"]


def test_two_frontends_one_killed_the_other_keeps_serving(tmp_path: Path) -> None:
    """frontend_replicas = 2: a kill -9 of one frontend is never seen through the other."""
    stack = make_stack(tmp_path, frontend_replicas=2)
    with running_stack(tmp_path, stack) as (daemon, units):
        victim, survivor = "frontend", "frontend-1"
        apis = {name: client(stack, 20, url) for name, url in stack.frontends.items()}
        for name, api in apis.items():
            assert [m.id for m in api.models.list().data] == [MODEL], name
            assert chat_ok(apis[name]), name
        outcomes: list[bool] = []
        done = threading.Event()

        def load() -> None:  # through the survivor, from before the kill until it is back
            while not done.is_set():
                outcomes.append(chat_ok(apis[survivor]))
                done.wait(0.05)  # paced: ~20 requests a second at most

        thread = threading.Thread(target=load)
        thread.start()
        try:
            while len(outcomes) < 5:
                done.wait(0.05)
            since = len(daemon.events())
            killed_at = len(outcomes)
            os.kill(units[victim]["pid"], signal.SIGKILL)
            wait_back(daemon, victim, units[victim]["pid"], since)
            until_serving(apis[victim], time.monotonic() + HEAL_TIMEOUT)
            after_back = len(outcomes)
            while len(outcomes) < after_back + 5:
                done.wait(0.05)
        finally:
            done.set()
            thread.join(60)
        assert len(outcomes) > killed_at + 5, outcomes
        assert all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} failed: {outcomes}"
        after = status(daemon)
        for name in (survivor, *stack.workers):
            assert after[name]["pid"] == units[name]["pid"], name  # nothing else restarted
