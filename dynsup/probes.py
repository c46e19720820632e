"""Readiness probes: is a started unit ready to serve?

Each probe is an async function that returns once the unit is ready, retrying
every `interval`; the caller bounds it with the probe's timeout and cancels it
when the process exits first. Expected failures (refused connections, non-2xx
answers, a command exiting non-zero) are retried; nothing here raises for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import anyio

from .units.spec import ProbeKind, ReadySpec

# A log probe reads the unit's output as it is printed.
LineSource = Callable[[], AsyncIterator[str]]

_MAX_BODY = 4 << 20


async def wait_ready(spec: ReadySpec, lines: LineSource | None = None) -> None:
    """Return once the probe passes. Bound it with spec.timeout from outside."""
    if spec.kind is ProbeKind.LOG:
        if lines is None:
            raise ValueError("a log probe needs the unit's output")
        await _wait_log(re.compile(spec.target), lines)
        return
    check = {
        ProbeKind.TCP: lambda: _tcp_ok(spec.target),
        ProbeKind.HTTP: lambda: _http_ok(spec.target),
        ProbeKind.EXEC: lambda: _exec_ok(spec.argv, spec.interval),
        ProbeKind.MODELS: lambda: _models_ok(spec.target, spec.models),
    }[spec.kind]
    while not await check():
        await anyio.sleep(spec.interval)


async def _wait_log(pattern: re.Pattern[str], lines: LineSource) -> None:
    async for line in lines():
        if pattern.search(line):
            return
    # Output ended (the process exited): never ready; the exit is reported by the caller.
    await anyio.sleep_forever()


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
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        "Accept: */*\r\nUser-Agent: dynsup-probe\r\n\r\n"
    ).encode()
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
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"not an HTTP answer from {url}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(status_line[1]), body


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


async def _http_ok(url: str) -> bool:
    try:
        status, _ = await http_get(url)
    except (OSError, TimeoutError):
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
        with anyio.move_on_after(max(interval * 10, 5.0)):
            result = await anyio.run_process(list(argv), check=False)
            return result.returncode == 0
    except OSError:
        return False
    return False
