"""Log probes under a flood: a ready line behind many others is still found.

A log probe used to get one queue entry per line, 4,096 at most: a batch
of output bigger than that (a remote agent's batch, or the local pump's
after a busy spell of the loop) lost the lines past it, the ready line
among them, and the unit never became ready.
"""

from __future__ import annotations

import re

import anyio
import pytest

from dynsup.agent_api import LogChunk
from dynsup.engine import OutputHub, State
from dynsup.probes import search_lines, wait_ready
from dynsup.units.spec import ProbeKind, ReadySpec

from .helpers import open_engine, service, wait_for

pytestmark = pytest.mark.anyio

FILLER = b"".join(b"%012d %s\n" % (n, b"x" * 86) for n in range(1000))  # 1,000 lines


async def test_a_log_probe_finds_its_ready_line_behind_a_batch_of_ten_thousand_lines() -> None:
    hub = OutputHub()
    sub = hub.subscribe("worker", None)
    sub.bind(42)
    chunks = [FILLER] * 10 + [b"model loaded\nserving on :8000\n"]
    offset = 0
    # One batch, published without a pause: the probe runs only after it.
    for seq, data in enumerate(chunks, 1):
        hub.publish(LogChunk(seq, "worker", "stdout", 42, offset, data, 0.0))
        offset += len(data)
    probe = ReadySpec(ProbeKind.LOG, r"^serving on :\d+$")
    try:
        with anyio.fail_after(10):
            await wait_ready(probe, sub.lines)
    finally:
        sub.close()


@pytest.mark.parametrize(
    ("pattern", "block", "found"),
    [
        (r"^up$", "a\nup\nb", True),
        (r"^up$", "a\nupx\nb", False),
        (r"foo\sbar", "foo\nbar", False),  # across two lines: not a line's match
        (r"foo\sbar", "foo\nbar\nfoo bar", True),
        (r"ready", "x" * 500 + "\nnot yet", False),
    ],
)
def test_a_block_matches_only_where_one_line_does(pattern: str, block: str, found: bool) -> None:
    compiled = re.compile(pattern)
    assert search_lines(compiled, re.compile(pattern, re.MULTILINE), block) is found


async def test_a_unit_flooding_before_its_ready_line_becomes_running() -> None:
    flood = service(
        "flood",
        """
        import sys, time
        line = "x" * 86
        for n in range(200_000):  # 20 MB, ten thousand times a probe's old queue
            sys.stdout.write("%012d %s\\n" % (n, line))
        sys.stdout.write("ready after the flood\\n")
        sys.stdout.flush()
        time.sleep(600)
        """,
        ready=ReadySpec(kind=ProbeKind.LOG, target=r"^ready after", timeout=60),
    )
    async with open_engine(flood) as engine:
        engine.start_nowait("flood")
        await wait_for(engine, "flood", State.RUNNING, timeout=90)
