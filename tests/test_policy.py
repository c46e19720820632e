"""The restart decision as a pure function (policy, status, history, time in; a verdict out)."""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest

from dynsup.agent_api import ExitStatus
from dynsup.broadcast import Feed
from dynsup.engine.policy import Done, GiveUp, History, Restart, decide
from dynsup.units.spec import RestartPolicy, ServiceSpec

SPEC = ServiceSpec(
    name="u",
    command=("true",),
    restart_delay=0.1,
    restart_delay_max=1.0,
    start_limit_burst=3,
    start_limit_interval=10.0,
)
FAILED = ExitStatus(code=1, signal=None)
CLEAN = ExitStatus(code=0, signal=None)


def test_restart_no_and_a_clean_exit_under_on_failure_are_done() -> None:
    assert decide(replace(SPEC, restart=RestartPolicy.NO), FAILED, 0, History(), 0) == Done(
        "exit status 1"
    )
    assert isinstance(decide(SPEC, CLEAN, 0, History(), 0), Done)
    assert isinstance(
        decide(replace(SPEC, restart=RestartPolicy.ALWAYS), CLEAN, 0, History(), 0), Restart
    )


def test_delays_double_per_consecutive_failure_up_to_the_cap() -> None:
    history, delays, now = History(), [], 0.0
    spec = replace(SPEC, start_limit_burst=100)
    for _ in range(6):
        history = history.started(now, spec.start_limit_interval)
        decision = decide(spec, FAILED, 0.0, history, now)
        assert isinstance(decision, Restart)
        delays.append(decision.delay)
        history, now = decision.history, now + decision.delay + 0.01
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_run_longer_than_the_longest_backoff_resets_the_failures() -> None:
    history = History(starts=(0.0,), failures=5)
    decision = decide(SPEC, FAILED, up_for=1.0, history=history, now=100.0)
    assert isinstance(decision, Restart) and decision.delay == 0.1


def test_the_start_limit_gives_up_at_the_last_exit() -> None:
    history = History(starts=(0.0, 0.2, 0.5), failures=2)
    decision = decide(SPEC, FAILED, 0.0, history, 0.6)
    assert isinstance(decision, GiveUp)
    assert decision.reason == "exit status 1; start limit: more than 3 starts within 10s"
    # Outside the window the same history is fine.
    assert isinstance(decide(SPEC, FAILED, 0.0, history, 20.0), Restart)


def test_a_huge_failure_count_does_not_overflow() -> None:
    decision = decide(SPEC, FAILED, 0.0, History(failures=10**6), 0.0)
    assert isinstance(decision, Restart) and decision.delay == 1.0


@pytest.mark.anyio
async def test_a_lagging_feed_resyncs_to_the_present() -> None:
    present = {"a": 0, "b": 0}
    closed: list[object] = []
    feed: Feed[tuple[str, int]] = Feed(lambda: sorted(present.items()), 2, closed.append)
    for i in range(1, 11):  # far more than the buffer holds
        present["a"] = i
        feed.publish(("a", i))
    present["b"] = 7
    feed.publish(("b", 7))
    with anyio.fail_after(5):
        got = [await feed.receive(), await feed.receive()]
    assert got == [("a", 10), ("b", 7)], "the present, not a stale picture"
    assert feed.resyncs == 1
    feed.publish(("a", 11))
    assert feed.receive_nowait() == ("a", 11)
    with pytest.raises(anyio.WouldBlock):
        feed.receive_nowait()
    feed.close()
    assert closed == [feed]
