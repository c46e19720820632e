"""The engine with real processes: restart policies, backoff, start limit, dependencies."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from dataclasses import replace

import anyio
import pytest

from dynsup.agent import LocalAgent
from dynsup.engine import Engine, State
from dynsup.engine.placement import Placement, SingleAgent
from dynsup.units.spec import ProbeKind, ReadySpec, RestartPolicy, ServiceSpec

from .helpers import alive, open_engine, service, wait_for

pytestmark = pytest.mark.anyio


async def collect(engine, name: str, until: State, timeout: float = 30):  # type: ignore[no-untyped-def]
    events = []
    with engine.subscribe() as stream, anyio.fail_after(timeout):
        async for snap in stream:
            if snap.name == name:
                events.append((anyio.current_time(), snap))
                if snap.state is until:
                    return events
    raise AssertionError("stream ended")


async def test_crash_loop_backs_off_with_growing_delays_then_fatal() -> None:
    spec = service(
        "crasher",
        "import sys; sys.exit(1)",
        restart_delay=0.1,
        restart_delay_max=10,
        start_limit_burst=4,
        start_limit_interval=60,
    )
    async with open_engine(spec) as engine:
        engine.start_nowait("crasher")
        events = await collect(engine, "crasher", State.FATAL)
    backoffs = [t for t, s in events if s.state is State.BACKOFF]
    starts = [t for t, s in events if s.state is State.STARTING]
    assert len(starts) == 4 and len(backoffs) == 3
    delays = [start - backoff for backoff, start in zip(backoffs, starts[1:], strict=False)]
    # 0.1, 0.2, 0.4: each at least the policy's delay, each longer than the one before.
    for delay, expected in zip(delays, (0.1, 0.2, 0.4), strict=False):
        assert expected <= delay < expected + 0.5, delays
    final = events[-1][1]
    assert final.restarts == 3 and "start limit" in final.reason
    assert final.exit_status == "exit status 1"


async def test_restart_no_and_success_exit_leave_exited() -> None:
    ok = service("ok", "import sys; sys.exit(0)", restart=RestartPolicy.ON_FAILURE)
    no = service("no", "import sys; sys.exit(7)", restart=RestartPolicy.NO)
    async with open_engine(ok, no) as engine:
        engine.start_nowait("ok")
        engine.start_nowait("no")
        done_ok = await wait_for(engine, "ok", State.EXITED)
        done_no = await wait_for(engine, "no", State.EXITED)
    assert done_ok.restarts == 0 and done_ok.exit_status == "exit status 0"
    assert done_no.restarts == 0 and done_no.exit_status == "exit status 7"


async def test_always_restarts_after_exit_zero() -> None:
    spec = service(
        "always",
        "import sys; sys.exit(0)",
        restart=RestartPolicy.ALWAYS,
        restart_delay=0.01,
        start_limit_burst=100,
    )
    async with open_engine(spec) as engine:
        engine.start_nowait("always")
        with anyio.fail_after(20):
            await engine.wait_state("always", lambda s: s.restarts >= 3)


async def test_success_exit_codes_decide_failure() -> None:
    spec = service("three", "import sys; sys.exit(3)", success_exit_codes=(0, 3))
    async with open_engine(spec) as engine:
        engine.start_nowait("three")
        snap = await wait_for(engine, "three", State.EXITED)
    assert snap.restarts == 0


async def test_requires_waits_for_ready_and_stops_in_reverse() -> None:
    a = service(
        "a",
        """
        import time
        time.sleep(0.5)
        print("listening now", flush=True)
        time.sleep(600)
        """,
        ready=ReadySpec(kind=ProbeKind.LOG, target=r"listening now", timeout=10),
    )
    b = service("b", "import time; time.sleep(600)", requires=("a",))
    async with open_engine(a, b) as engine:
        with engine.subscribe() as stream:
            engine.start_nowait("b")  # pulls in a
            await wait_for(engine, "b", State.RUNNING)
            order = []
            while True:
                try:
                    snap = stream.receive_nowait()
                except anyio.WouldBlock:
                    break
                order.append((snap.name, snap.state))
        assert order.index(("a", State.RUNNING)) < order.index(("b", State.STARTING))
        b_pid = engine.statistics(["b"])[0].pid
        a_pid = engine.statistics(["a"])[0].pid
        assert alive(a_pid) and alive(b_pid)

        with engine.subscribe() as stream:
            stopper_done = anyio.Event()

            async def stop_all() -> None:
                await engine.stop_all()
                stopper_done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_all)
                async for snap in stream:
                    if snap.name == "a" and snap.state is State.STOPPING:
                        # a is signalled only now: b must already be gone.
                        assert not alive(b_pid)
                        assert engine.statistics(["b"])[0].state is State.STOPPED
                        break
            assert stopper_done.is_set()
        assert not alive(a_pid)


async def test_stop_kills_sigterm_ignoring_tree_within_timeout_plus_one() -> None:
    code = """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        print("up", flush=True)
        time.sleep(600)
    """
    spec = service(
        "stubborn",
        code,
        stop_timeout=1.0,
        ready=ReadySpec(kind=ProbeKind.LOG, target="up", timeout=10),
    )
    async with open_engine(spec) as engine:
        engine.start_nowait("stubborn")
        snap = await wait_for(engine, "stubborn", State.RUNNING)
        import psutil

        tree = [snap.pid, *(c.pid for c in psutil.Process(snap.pid).children(recursive=True))]
        assert len(tree) == 2
        began = anyio.current_time()
        await engine.stop("stubborn")
        took = anyio.current_time() - began
        assert not any(alive(pid) for pid in tree)
        assert took < 1.0 + 1.0
        final = engine.statistics(["stubborn"])[0]
        assert final.state is State.STOPPED and final.exit_status == "terminated by SIGKILL"


async def test_spawn_error_is_fatal_with_reason() -> None:
    spec = service("ghost", "")
    from dataclasses import replace

    spec = replace(spec, command=("/nonexistent/program",))
    async with open_engine(spec) as engine:
        engine.start_nowait("ghost")
        snap = await wait_for(engine, "ghost", State.FATAL)
    assert "/nonexistent/program" in snap.reason


async def test_probe_timeout_counts_as_failed_start() -> None:
    spec = service(
        "mute",
        "import time; time.sleep(600)",
        ready=ReadySpec(kind=ProbeKind.TCP, target="127.0.0.1:1", timeout=0.3, interval=0.05),
        restart_delay=0.05,
        start_limit_burst=2,
    )
    async with open_engine(spec) as engine:
        engine.start_nowait("mute")
        snap = await wait_for(engine, "mute", State.FATAL)
    assert snap.exit_status == "terminated by SIGTERM"


async def test_update_touches_only_what_changed() -> None:
    from dataclasses import replace

    keep = service("keep", "import time; time.sleep(600)")
    change = service("change", "import time; time.sleep(600)")
    gone = service("gone", "import time; time.sleep(600)")
    async with open_engine(keep, change, gone) as engine:
        engine.start_autostart()
        for name in ("keep", "change", "gone"):
            await wait_for(engine, name, State.RUNNING)
        before = {s.name: s.pid for s in engine.statistics()}
        new = {
            "keep": keep,
            "change": replace(change, stop_timeout=3.0),
            "added": service("added", "import time; time.sleep(600)"),
        }
        plan = engine.plan(new)
        assert plan.added == ("added",) and plan.removed == ("gone",)
        assert plan.changed == {"change": ("stop_timeout",)}
        await engine.apply(new)
        await wait_for(engine, "change", State.RUNNING)
        await wait_for(engine, "added", State.RUNNING)
        after = {s.name: s.pid for s in engine.statistics()}
        assert after["keep"] == before["keep"]
        assert after["change"] != before["change"]
        assert "gone" not in after and not alive(before["gone"])


async def test_signal_reaches_the_group() -> None:
    code = """
        import signal, sys, time
        signal.signal(signal.SIGUSR1, lambda *a: sys.exit(42))
        print("up", flush=True)
        time.sleep(600)
    """
    spec = service(
        "sig",
        code,
        restart=RestartPolicy.NO,
        ready=ReadySpec(kind=ProbeKind.LOG, target="up", timeout=10),
    )
    async with open_engine(spec) as engine:
        engine.start_nowait("sig")
        await wait_for(engine, "sig", State.RUNNING)
        await engine.send_signal("sig", signal.SIGUSR1.name)
        snap = await wait_for(engine, "sig", State.EXITED)
    assert snap.exit_status == "exit status 42"


async def test_stop_while_an_exit_is_unhandled_does_not_hang() -> None:
    """Regression: a stop arriving between a child's exit and the BACKOFF it leads to
    found the unit RUNNING with no process, tried RUNNING -> STOPPED (not allowed),
    raised inside the shielded teardown, and stop_all waited forever.

    The window is a few scheduler steps wide in real runs (bench/restart_latency.py
    hit it under SIGTERM); here the teardown is driven in exactly that state.
    """
    spec = service("flap", "pass")
    async with LocalAgent() as agent, Engine(agent) as engine:
        engine.load({"flap": spec})
        unit = engine._units["flap"]
        unit.state, unit.process_alive = State.RUNNING, False
        with anyio.fail_after(10):
            await engine._teardown(unit)
        assert engine.statistics(["flap"])[0].state is State.STOPPED


async def test_after_exit_runs_before_the_restart_and_after_a_stop() -> None:
    spec = service("crashy", "import sys; sys.exit(3)", restart_delay=0.01, start_limit_burst=50)
    seen: list[tuple[str, State, int | None, int]] = []
    engine_ref: list[Engine] = []

    async def after_exit(exited: ServiceSpec) -> None:
        snap = engine_ref[0].statistics([exited.name])[0]
        seen.append((exited.name, snap.state, snap.pid, snap.restarts))
        if len(seen) == 1:
            raise RuntimeError("a clean-up that fails")  # must not break the unit

    async with open_engine(spec, after_exit=after_exit) as engine:
        engine_ref.append(engine)
        engine.start_nowait("crashy")
        with anyio.fail_after(20):
            await engine.wait_state("crashy", lambda s: s.restarts >= 2)
        crashes = list(seen)  # (the stop below may add one more, in STOPPING)
        await engine.stop("crashy")
        # Once per exit, as soon as the leader is gone (no pid) and before the run
        # is judged: STOPPING (tearing down the group), never BACKOFF or a new STARTING.
        assert len(crashes) >= 2
        assert [(state, pid) for _, state, pid, _ in crashes] == [(State.STOPPING, None)] * len(
            crashes
        )
        assert [restarts for *_, restarts in crashes] == list(range(len(crashes)))

        sleeper = service("sleeper", "import time; time.sleep(600)")
        await engine.apply({"crashy": spec, "sleeper": sleeper})
        engine.start_nowait("sleeper")
        await wait_for(engine, "sleeper", State.RUNNING)
        before_stop = len(seen)
        await engine.stop("sleeper")
    # A stop runs it too: a process killed by the stop's SIGKILL could not clean up either.
    assert seen[before_stop:] == [("sleeper", State.STOPPING, None, 0)]


@pytest.fixture
def busy_port() -> Iterator[tuple[socket.socket, int]]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder, holder.getsockname()[1]
    holder.close()


async def test_a_busy_port_at_the_first_start_backs_off_then_runs(
    busy_port: tuple[socket.socket, int],
) -> None:
    """Regression: PortBusy at the first start tried PENDING -> BACKOFF, which the
    table refused: TransitionError, and the daemon exited with every unit."""
    holder, port = busy_port
    web = service("web", "import time; time.sleep(600)", ports=(port,), restart_delay=0.05)
    web = replace(web, restart_delay_max=0.2, start_limit_burst=1000)
    other = service("other", "import time; time.sleep(600)")
    async with open_engine(web, other) as engine:
        engine.start_nowait("web")
        engine.start_nowait("other")
        backoff = await wait_for(engine, "web", State.BACKOFF)
        assert f"port {port} is already in use" in backoff.reason
        await wait_for(engine, "other", State.RUNNING)
        holder.close()
        await wait_for(engine, "web", State.RUNNING)


async def test_a_busy_port_under_restart_no_ends_exited() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        spec = service("once", "pass", ports=(port,), restart=RestartPolicy.NO)
        async with open_engine(spec) as engine:
            engine.start_nowait("once")
            done = await wait_for(engine, "once", State.EXITED)
    assert f"port {port} is already in use" in done.reason


class BuggyPlacer(SingleAgent):
    """A placer with a bug for one unit: what a KeyError deep in placement looks like."""

    async def place(self, spec: ServiceSpec) -> Placement:
        if spec.name == "doomed":
            raise KeyError("a bug")
        return await super().place(spec)


async def test_a_bug_in_one_unit_ends_that_unit_fatal_and_the_others_run() -> None:
    async with LocalAgent() as agent, Engine(placer=BuggyPlacer(agent)) as engine:
        engine.load(
            {
                "doomed": service("doomed", "import time; time.sleep(600)"),
                "fine": service("fine", "import time; time.sleep(600)"),
            }
        )
        engine.start_nowait("doomed")
        engine.start_nowait("fine")
        fatal = await wait_for(engine, "doomed", State.FATAL)
        assert fatal.reason == "internal error: KeyError: 'a bug'"
        running = await wait_for(engine, "fine", State.RUNNING)
        assert alive(running.pid)
        # The failed unit can be started again (and fails the same way, alone).
        engine.start_nowait("doomed")
        await wait_for(engine, "doomed", State.FATAL)
        await engine.stop_all()


async def test_a_leader_exit_shows_at_once_while_its_group_is_torn_down() -> None:
    """The leader exits; its child ignores SIGTERM and lingers. The unit must not
    read RUNNING meanwhile, and the after-exit hook (discovery withdrawal) must
    run while the child is still there, not once the group is empty."""
    code = """
    import os, signal, sys, time
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(os.getpid(), flush=True)
        time.sleep(600)
    time.sleep(0.5)
    sys.exit(1)
    """
    child_alive_at_hook: list[bool] = []
    seen_child: list[int] = []

    async def after_exit(spec: ServiceSpec) -> None:
        child_alive_at_hook.append(bool(seen_child) and alive(seen_child[0]))

    spec = service("parent", code, restart=RestartPolicy.NO, stop_timeout=2.0)
    async with open_engine(spec, after_exit=after_exit) as engine:
        engine.start_nowait("parent")
        running = await wait_for(engine, "parent", State.RUNNING)
        agent = engine._units["parent"].placement.agent  # type: ignore[union-attr]
        with anyio.fail_after(20):
            while not seen_child:
                read = await agent.read_log("parent", "stdout", 0, 100)
                seen_child.extend(int(x) for x in read.data.split())
                await anyio.sleep(0.05)  # polling the ring until the child's line is there
        stopping = await wait_for(engine, "parent", State.STOPPING)
        assert stopping.reason == "exit status 1; tearing down the group"
        assert stopping.pid is None
        assert alive(seen_child[0]), "the group is still being torn down"
        exited = await wait_for(engine, "parent", State.EXITED)
        assert not alive(seen_child[0])
    assert running.pid is not None
    assert child_alive_at_hook == [True]
    assert exited.exit_status == "exit status 1"
