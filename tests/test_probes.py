"""Readiness probes against real sockets and processes.

A bad answer is "not ready", never an exception out of the probe.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psutil
import pytest
from anyio.abc import SocketAttribute, SocketStream

from dynsup.probes import wait_ready
from dynsup.units.spec import ProbeKind, ReadySpec

pytestmark = pytest.mark.anyio

HUGE_HEADER = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (5 << 20)

# name of the scenario → the raw bytes the server answers, then it closes
ANSWERS: dict[str, bytes] = {
    "chunked_answer_with_garbage_chunk_size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz-not-hex\r\nhello\r\n0\r\n\r\n"
    ),
    "chunked_answer_with_negative_chunk_size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"
    ),
    "connection_closed_mid_headers": b"HTTP/1.1 200 OK\r\nContent-Le",
    "answer_that_is_not_http": b"SSH-2.0 200 OpenSSH_9.6\r\n\r\n",
    "headers_larger_than_the_probe_reads": HUGE_HEADER,
}


@asynccontextmanager
async def raw_http_server(answer: bytes) -> AsyncIterator[str]:
    """A TCP server that answers every connection with ``answer`` and closes it."""

    async def serve(stream: SocketStream) -> None:
        async with stream:
            try:
                await stream.receive()
                await stream.send(answer)
            except (anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                pass  # the probe gave up reading: fine

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield f"http://127.0.0.1:{port}/health"
        tg.cancel_scope.cancel()


def http_probe(url: str) -> ReadySpec:
    return ReadySpec(kind=ProbeKind.HTTP, target=url, interval=0.05)


@pytest.mark.parametrize("scenario", sorted(ANSWERS))
async def test_bad_http_answer_is_not_ready_and_never_raises(scenario: str) -> None:
    async with raw_http_server(ANSWERS[scenario]) as url:
        ready = False
        with anyio.move_on_after(1.0):
            await wait_ready(http_probe(url))
            ready = True
        assert not ready


async def test_good_chunked_answer_is_ready() -> None:
    # The control for the scenarios above: the same server, a well-formed answer.
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    async with raw_http_server(answer) as url:
        with anyio.fail_after(30):
            await wait_ready(http_probe(url))


async def wait_for_file(path: Path, timeout: float = 30) -> str:
    with anyio.fail_after(timeout):
        while not path.exists() or not path.read_text().endswith("\n"):
            await anyio.sleep(0.02)  # polling a file the probe writes, bounded above
    return path.read_text()


async def wait_gone(pid: int, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return  # dead; its new parent (init) reaps it
            except psutil.NoSuchProcess:
                return
            await anyio.sleep(0.02)


async def test_exec_probe_cancelled_kills_its_grandchildren_and_is_reaped(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    code = textwrap.dedent(
        f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "600"])
        with open({str(pids)!r}, "w") as out:
            out.write(f"{{os.getpid()}} {{child.pid}}\\n")
        time.sleep(600)
        """
    )
    spec = ReadySpec(kind=ProbeKind.EXEC, target="", argv=(sys.executable, "-c", code))
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_ready, spec)
        leader, grandchild = map(int, (await wait_for_file(pids)).split())
        tg.cancel_scope.cancel()  # the unit stopped, or the ready timeout passed
    await wait_gone(grandchild)
    assert not psutil.pid_exists(leader)  # killed and reaped by the probe, not a zombie
