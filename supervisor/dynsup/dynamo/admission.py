"""Is a started worker taking traffic? Asked of the frontend, which routes.

A worker is RUNNING once its own ``/health`` says so; the frontend routes to
it once discovery has told it, a moment later. A rolling update must not
drain the next replica in between (the model would have no instance the
frontend knows of: 404/503), so the engine waits for :func:`admitted`:
until the frontend's ``/health`` lists an instance at the worker's own
request-plane address. With several frontends, every one that answers must
list it (a client may come through any of them); one that does not answer
(killed, restarting, hung) is not waited for, but at least one must answer.
The engine bounds the wait.
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


async def routes(router: str, own: set[tuple[str, int]]) -> bool | None:
    """Does the frontend at ``router`` route to one of ``own``? None: no answer."""
    try:
        status, body = await http_get(f"{router}/health", timeout=2.0)
    except (OSError, TimeoutError, ValueError):
        return None
    return status == 200 and bool(own & routed_addresses(body))


async def admitted(spec: ServiceSpec) -> None:
    """The engine's admitted hook: returns once the frontends route to spec's worker."""
    registry = spec.registry
    if registry is None or not registry.routers or not registry.own:
        return
    own = {own_address(text) for text in registry.own}
    while True:
        seen = [await routes(url, own) for _, url in registry.routers]
        answered = [routed for routed in seen if routed is not None]
        if answered and all(answered):
            return
        await anyio.sleep(POLL)
