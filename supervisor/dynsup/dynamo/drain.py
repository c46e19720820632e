"""Drain a Dynamo worker before it is stopped: withdraw it, let its requests finish.

Stopping a worker by SIGTERM alone fails its in-flight requests wherever
Dynamo's own graceful shutdown does not wait for them (the mocker shuts its
runtime down at once; a vLLM worker's drain step is empty). So the engine
calls :func:`drain` before a requested stop of a running worker: its
records are withdrawn first (the frontend routes nothing new to it), then
the worker's own ``dynamo_component_inflight_requests`` gauge (its system
port's ``/metrics``) is read until it has stayed at zero for ``QUIET``
seconds: long enough for a request routed just before the frontend saw the
withdrawal to show up. The engine bounds the whole drain; a worker that
does not answer counts as drained (it cannot finish anything either).
"""

from __future__ import annotations

import anyio
import structlog

from ..probes import http_get
from ..units.spec import ServiceSpec
from .withdraw import withdraw_unit

log = structlog.get_logger("dynsup.dynamo")

QUIET = 0.5  # in-flight must read zero this long: the frontend's view lags a little
POLL = 0.1
GAUGE = b"dynamo_component_inflight_requests"


def in_flight(metrics: bytes) -> int:
    """Requests being served, from a worker's Prometheus text (every endpoint)."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(GAUGE) and (line[len(GAUGE) : len(GAUGE) + 1] in (b"{", b" ")):
            try:
                total += float(line.rsplit(None, 1)[-1])
            except ValueError:
                continue
    return int(total)


def metrics_url(spec: ServiceSpec) -> str | None:
    env = spec.env
    port = env.get("DYN_SYSTEM_PORT")
    return f"http://{env.get('DYN_SYSTEM_HOST', '127.0.0.1')}:{port}/metrics" if port else None


async def drain(spec: ServiceSpec) -> None:
    """The engine's drain hook: withdraw spec's records, then wait until it is idle."""
    if spec.registry is None:
        return
    await withdraw_unit(spec)
    url = metrics_url(spec)
    if url is None:
        return
    quiet_since: float | None = None
    started = anyio.current_time()
    while True:
        try:
            status, body = await http_get(url, timeout=2.0)
        except (OSError, TimeoutError, ValueError):
            return  # not answering: nothing of it can finish either
        busy = in_flight(body) if status == 200 else 0
        now = anyio.current_time()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= QUIET:
            log.info("dynamo.drained", waited=round(now - started, 3))
            return
        await anyio.sleep(POLL)
