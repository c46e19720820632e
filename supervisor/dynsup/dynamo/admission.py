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

Listed is not yet routed: the frontend builds the model's WorkerSet for a new
component a moment after the instance shows in ``/health`` (and never, for a
card it rejects). So a worker is admitted once the frontend's
``/v1/models/<model>/ready`` also counts, for its role, as many live workers
as ``/health`` lists instances of the model's components for that role: the
new one among them (Dynamo 1.6 has that endpoint; a 404 means "not yet").
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import anyio

from ..probes import http_get
from ..units.spec import ServiceSpec
from .withdraw import advertised_address, own_address

POLL = 0.1
WORKER_TYPES = {"agg": "aggregated", "prefill": "prefill", "decode": "decode"}
_TAGGED = re.compile(r"^(.+)_[0-9a-f]{6}$")  # "<component>_<revision tag>" (expand.py)


def routed_addresses(health: bytes) -> set[tuple[str, int]]:
    """The request-plane addresses of the instances a frontend's /health lists."""
    try:
        instances = json.loads(health).get("instances") or []
    except (ValueError, AttributeError):
        return set()
    found = {advertised_address(instance) for instance in instances}
    return {address for address in found if address is not None}


def pool_instances(health: bytes, own: set[tuple[str, int]]) -> tuple[str, int] | None:
    """(namespace, count) of the ``generate`` instances a frontend's /health lists for
    the pool of the worker at ``own``: its component under any revision tag. None:
    the worker is not listed."""
    try:
        instances = json.loads(health).get("instances") or []
    except (ValueError, AttributeError):
        return None
    mine = [i for i in instances if isinstance(i, dict) and advertised_address(i) in own]
    if not mine:
        return None
    namespace, component = mine[0].get("namespace"), str(mine[0].get("component"))
    match = _TAGGED.match(component)
    base = match[1] if match else component

    def same_pool(instance: dict[str, object]) -> bool:
        other = str(instance.get("component"))
        found = _TAGGED.match(other)
        return (found[1] if found else other) == base

    count = sum(
        1
        for i in instances
        if isinstance(i, dict)
        and i.get("endpoint") == "generate"
        and i.get("namespace") == namespace
        and same_pool(i)
    )
    return str(namespace), count


def live_workers(ready: bytes, namespace: str, worker_type: str) -> int | None:
    """Live workers of worker_type the frontend's model counts in namespace."""
    try:
        types = json.loads(ready)["namespaces"][namespace]["worker_types"]
        return int(types[worker_type]["workers"])
    except (ValueError, KeyError, TypeError):
        return None


async def routes(
    router: str, own: set[tuple[str, int]], model: str = "", role: str = ""
) -> bool | None:
    """Does the frontend at ``router`` route to one of ``own``? None: no answer."""
    try:
        status, body = await http_get(f"{router}/health", timeout=2.0)
    except (OSError, TimeoutError, ValueError):
        return None
    listed = pool_instances(body, own) if status == 200 else None
    if listed is None:
        return False
    if not model or role not in WORKER_TYPES:
        return True
    try:
        status, ready = await http_get(f"{router}/v1/models/{quote(model, safe='')}/ready", 2.0)
    except (OSError, TimeoutError, ValueError):
        return None
    counted = live_workers(ready, listed[0], WORKER_TYPES[role])
    return counted is not None and counted >= listed[1]


async def admitted(spec: ServiceSpec) -> None:
    """The engine's admitted hook: returns once the frontends route to spec's worker."""
    registry = spec.registry
    if registry is None or not registry.routers or not registry.own:
        return
    own = {own_address(text) for text in registry.own}
    while True:
        seen = [
            await routes(url, own, registry.serves, registry.role) for _, url in registry.routers
        ]
        answered = [routed for routed in seen if routed is not None]
        if answered and all(answered):
            return
        await anyio.sleep(POLL)
