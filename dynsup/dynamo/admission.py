"""Is a started worker taking traffic? Asked of the frontend, which routes.

A worker is RUNNING once its own ``/health`` says so; the frontend routes to
it once discovery has told it, a moment later. A rolling update must not
drain the next replica in between (the model would have no instance the
frontend knows of: 404/503), so the engine waits for :func:`admitted`:
until the frontend's ``/health`` lists an instance at the worker's own
request-plane address. The engine bounds the wait.
"""

from __future__ import annotations

import json

import anyio

from ..probes import http_get
from ..units.spec import ServiceSpec
from .withdraw import advertised_address, own_address

POLL = 0.1


def routed_addresses(health: bytes) -> set[tuple[str, int]]:
    """The request-plane addresses of the instances a frontend's /health lists."""
    try:
        instances = json.loads(health).get("instances") or []
    except (ValueError, AttributeError):
        return set()
    found = {advertised_address(instance) for instance in instances}
    return {address for address in found if address is not None}


async def admitted(spec: ServiceSpec) -> None:
    """The engine's admitted hook: returns once the frontend routes to spec's worker."""
    registry = spec.registry
    if registry is None or not registry.router or not registry.own:
        return
    own = {own_address(text) for text in registry.own}
    while True:
        try:
            status, body = await http_get(f"{registry.router}/health", timeout=2.0)
        except (OSError, TimeoutError, ValueError):
            status, body = 0, b""
        if status == 200 and own & routed_addresses(body):
            return
        await anyio.sleep(POLL)
