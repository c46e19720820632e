"""Model health end to end: a 1-token request through the frontend, per model.

Every unit of a model can be RUNNING (each worker's /health says 200) while
the frontend does not serve it: the model unlisted, every request answered
404, 500 or 503 (seen with a disaggregated pair on CPU). Only a request
through the frontend tells. So each model whose workers are all RUNNING,
and whose frontend is too, gets a ``POST /v1/completions`` with one token
every ``INTERVAL``; after ``FAILURES`` failed ones in a row its workers are
restarted, role by role (prefill, then decode), with a reason that says
what was seen. ``canary = false`` in a ``[model]`` opts out.

With several frontends (``frontend_replicas``) the canary goes through the
RUNNING ones in order until one answers: the model is healthy when any of
them serves it (a frontend that does not is its own liveness probe's
business; restarting the workers would not heal it), judged only while at
least one frontend is RUNNING.

This room knows nothing of how units run: the daemon gives it the specs,
a question (are these units RUNNING?) and the heal (restart these units
with this reason, under the write lock).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
import structlog

from ..probes import http_request
from ..units.spec import ServiceSpec

log = structlog.get_logger("dynsup.dynamo")

INTERVAL = 10.0  # between two canaries of one model
TIMEOUT = 10.0  # one token, on a loaded node: generous
FAILURES = 3  # in a row before healing: one slow answer is not a fault
ROLE_ORDER = ("prefill", "agg", "decode")

Running = Callable[[list[str]], bool]
Heal = Callable[[list[str], str], Awaitable[None]]


@dataclass(frozen=True)
class Target:
    model: str  # the served name
    routers: tuple[tuple[str, str], ...]  # (unit, base URL) of each frontend
    roles: tuple[tuple[str, ...], ...]  # the worker units, role by role


def targets(specs: Mapping[str, ServiceSpec]) -> list[Target]:
    """One target per served model with canaries on, from the workers' registries."""
    found: dict[tuple[str, str], dict[str, list[str]]] = {}
    for name, spec in sorted(specs.items()):
        registry = spec.registry
        if registry is None or not registry.canary or not registry.serves:
            continue
        roles = found.setdefault((registry.serves, registry.routers), {})
        roles.setdefault(registry.role, []).append(name)
    return [
        Target(model, routers, tuple(tuple(roles[r]) for r in ROLE_ORDER if r in roles))
        for (model, routers), roles in sorted(found.items())
    ]


async def ask_any(model: str, routers: list[str]) -> str | None:
    """None when one of routers served the model; else what the first one showed."""
    first: str | None = None
    for router in routers:
        seen = await ask(model, router)
        if seen is None:
            return None
        first = first or seen
    return first


async def ask(model: str, router: str) -> str | None:
    """None when the model answered one token through router; else what was seen."""
    body = {"model": model, "prompt": "ping", "max_tokens": 1}
    try:
        status, answer = await http_request(
            f"{router}/v1/completions", json_body=body, timeout=TIMEOUT
        )
    except (OSError, TimeoutError, ValueError) as exc:
        return f"POST /v1/completions failed: {type(exc).__name__}: {exc}"
    if status == 200:
        try:
            if json.loads(answer).get("choices"):
                return None
        except (ValueError, AttributeError):
            pass
        return "POST /v1/completions answered 200 without choices"
    return f"POST /v1/completions answered {status}: {answer[:160].decode(errors='replace')}"


async def watch_models(
    specs: Callable[[], Mapping[str, ServiceSpec]], running: Running, heal: Heal
) -> None:
    """Forever: canary each model; heal the ones that fail FAILURES times in a row."""
    failed: dict[str, int] = {}
    while True:
        await anyio.sleep(INTERVAL)
        for target in targets(specs()):
            workers = [name for role in target.roles for name in role]
            routers = [url for unit, url in target.routers if running([unit])]
            if not routers or not running(workers):
                failed.pop(target.model, None)  # starting, stopping or healing: not judged
                continue
            seen = await ask_any(target.model, routers)
            if seen is None:
                failed.pop(target.model, None)
                continue
            failed[target.model] = count = failed.get(target.model, 0) + 1
            log.warning("model.canary_failed", model=target.model, seen=seen, failed=count)
            if count < FAILURES:
                continue
            failed.pop(target.model, None)
            reason = f"canary: {target.model}: {seen} ({count} times in a row)"
            log.error("model.unhealthy", model=target.model, reason=reason)
            for role in target.roles:
                await heal(list(role), reason)
