"""ResourceMonitor with real processes: CPU % between samples, the tree, the cache."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from dynsup.resources import Leader, ResourceMonitor

SPIN = "while True: pass"
SLEEP = "import time; time.sleep(600)"


@pytest.fixture
def spawn() -> Iterator[Callable[[str], int]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> int:
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        started.append(proc)
        return proc.pid

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_cpu_percent_is_measured_between_two_samples(spawn: Callable[[str], int]) -> None:
    spinner, sleeper = spawn(SPIN), spawn(SLEEP)
    leaders = {"spin": Leader(spinner), "sleep": Leader(sleeper)}
    monitor = ResourceMonitor()
    monitor.sample(leaders)
    time.sleep(1.0)  # the measurement window, not a wait for an event
    usage = monitor.sample(leaders)
    # A busy loop on a shared 2-core box gets well over 10% of a core; a sleeper ~0.
    assert usage["spin"].cpu_percent is not None and usage["spin"].cpu_percent > 10
    assert usage["sleep"].cpu_percent is not None and usage["sleep"].cpu_percent < 5
    assert usage["spin"].processes == 1 and usage["spin"].rss_bytes > 1 << 20


def test_a_cached_sample_is_not_served_for_a_restarted_unit(spawn: Callable[[str], int]) -> None:
    monitor = ResourceMonitor()
    first, second = spawn(SLEEP), spawn(SLEEP)
    assert monitor.sample({"w": Leader(first)}, max_age=60)["w"].pids == {first}
    assert monitor.sample({"w": Leader(second)}, max_age=60)["w"].pids == {second}
    # A unit on another node is not measured here, even if the pid exists locally.
    assert monitor.sample({"w": Leader(second, "10.255.255.1")}) == {}
