"""Readiness and liveness probes: is a started unit ready to serve, is a running one alive?

Each probe is an async function that returns once the unit is ready, retrying
every `interval`; the caller bounds it with the probe's timeout and cancels it
when the process exits first. Expected failures (refused connections, non-2xx
answers, a command exiting non-zero) are retried; nothing here raises for them.
Any answer that breaks the protocol (garbage chunk sizes, a connection closed
mid-headers, something that is not HTTP) counts as "not ready", the way httpx
maps transport errors where they enter.

A liveness check (`check_live`) is one attempt of the same probes, bounded
by the liveness spec's timeout: a hung peer (a SIGSTOPped worker whose
kernel still accepts the connection) is a failed check, not a wait.

An exec probe runs in a session of its own; when it overruns (or the probe is
cancelled) its whole process group is killed and the probe reaped, so a
hanging probe leaves neither zombies nor grandchildren.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import anyio

from .units.spec import LiveSpec, ProbeKind, ReadySpec

# A log probe reads the unit's output as it is printed: blocks of whole
# lines joined by newlines (one block per read of the child's pipe).
LineSource = Callable[[], AsyncIterator[str]]

_MAX_BODY = 4 << 20
_EXEC_TIMEOUT_MIN = 5.0


class BadAnswer(OSError):
    """The peer's answer is not the HTTP we asked for: the probe fails, it never raises."""


async def wait_ready(spec: ReadySpec, lines: LineSource | None = None) -> None:
    """Return once the probe passes. Bound it with spec.timeout from outside."""
    if spec.kind is ProbeKind.LOG:
        if lines is None:
            raise ValueError("a log probe needs the unit's output")
        await _wait_log(re.compile(spec.target), lines)
        return
    while not await _check(spec):
        await anyio.sleep(spec.interval)


async def check_live(spec: LiveSpec) -> bool:
    """One liveness check, bounded by spec.timeout: False when it fails or overruns."""
    with anyio.move_on_after(spec.timeout):
        return await _check(spec)
    return False


def _check(spec: ReadySpec) -> Awaitable[bool]:
    """One attempt of a polling probe (any kind but log)."""
    if spec.kind is ProbeKind.TCP:
        return _tcp_ok(spec.target)
    if spec.kind is ProbeKind.HTTP:
        return _http_ok(spec.target)
    if spec.kind is ProbeKind.EXEC:
        return _exec_ok(spec.argv, spec.interval)
    if spec.kind is ProbeKind.MODELS:
        return _models_ok(spec.target, spec.models)
    raise ValueError(f"{spec.kind.value} is not a polling probe")


async def _wait_log(pattern: re.Pattern[str], lines: LineSource) -> None:
    in_block = re.compile(pattern.pattern, pattern.flags | re.MULTILINE)
    async for block in lines():
        if search_lines(pattern, in_block, block):
            return
    # Output ended (the process exited): never ready; the exit is reported by the caller.
    await anyio.sleep_forever()


def search_lines(pattern: re.Pattern[str], in_block: re.Pattern[str], block: str) -> bool:
    """Whether pattern matches within one of the newline-separated lines of block.

    ``in_block`` is pattern with re.MULTILINE (``^``/``$`` at each line's
    ends): one scan of the whole block finds where a line may match; only
    that line is then searched alone, so a match that spans lines (``\\s``
    takes a newline) never counts.
    """
    pos = 0
    while (found := in_block.search(block, pos)) is not None:
        start = block.rfind("\n", 0, found.start()) + 1
        end = block.find("\n", found.start())
        end = len(block) if end < 0 else end
        if pattern.search(block[start:end]):  # alone: "^" anchors at its start
            return True
        if end == len(block):
            return False
        pos = end + 1
    return False


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _tcp_ok(target: str) -> bool:
    host, port = _host_port(target)
    try:
        stream = await anyio.connect_tcp(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET (no TLS): probes must not pull in a client library."""
    return await http_request(url, timeout=timeout)


async def http_request(
    url: str, *, json_body: object = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET, or POST of ``json_body``; (status, body)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    method, extra, payload = "GET", "", b""
    if json_body is not None:
        payload = json.dumps(json_body).encode()
        method = "POST"
        extra = f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        f"Accept: */*\r\nUser-Agent: dynsup-probe\r\n{extra}\r\n"
    ).encode() + payload
    with anyio.fail_after(timeout):
        stream = await anyio.connect_tcp(host, port)
        async with stream:
            await stream.send(request)
            received = bytearray()
            try:
                while len(received) < _MAX_BODY:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    head, complete, body = bytes(received).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not complete or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise BadAnswer(f"not an HTTP answer from {url}")
    code = status_line[1]
    if not (len(code) == 3 and code.isdigit()):  # bytes.isdigit(): ASCII only
        raise BadAnswer(f"bad status code from {url}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(code), body


_HEX = frozenset(b"0123456789abcdefABCDEF")


def _dechunk(body: bytes) -> bytes:
    """The body of a chunked answer; BadAnswer when a chunk size is not hex."""
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size_text = size_line.split(b";")[0].strip()
        if not size_text or len(size_text) > 16 or not set(size_text) <= _HEX:
            raise BadAnswer(f"bad chunk size {size_line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


async def _http_ok(url: str) -> bool:
    try:
        status, _ = await http_get(url)
    except (OSError, TimeoutError, ValueError):
        return False
    return 200 <= status < 300


async def _models_ok(url: str, names: tuple[str, ...]) -> bool:
    try:
        status, body = await http_get(url)
        listed = {m.get("id") for m in json.loads(body).get("data", [])}
    except (OSError, TimeoutError, ValueError, AttributeError):
        return False
    return status == 200 and all(name in listed for name in names)


async def _exec_ok(argv: tuple[str, ...], interval: float) -> bool:
    try:
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # a chatty probe must not fill the daemon's memory
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its children are its group: killed with it
        )
    except (OSError, ValueError):
        return False
    returncode: int | None = None
    try:
        with anyio.move_on_after(max(interval * 10, _EXEC_TIMEOUT_MIN)):
            returncode = await process.wait()
    finally:
        # Overran or cancelled: the whole group goes, and the probe is reaped
        # even when the unit's scope is being cancelled. Only then: once the
        # leader is reaped its pid (= the group id) may be reused by a new unit.
        with anyio.CancelScope(shield=True):
            if returncode is None:
                _kill_group(process.pid)
                await process.wait()
            await process.aclose()
    return returncode == 0


def _kill_group(pgid: int) -> None:
    """SIGKILL to the probe's process group, grandchildren included."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
