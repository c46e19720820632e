"""The streaming read verbs: `events` (state changes) and `tail -f` over several units.

Both are snapshot-then-changes: subscribe, read the present with no
``await`` in between, then follow, so nothing can fall in the gap. They
only watch; the control server closes them when the client goes away.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from .agent_api import Agent, AgentError
from .broadcast import Feed
from .engine import UnitStatus
from .engine.output import ChunkFollower


def event_of(snap: UnitStatus, old: str | None, kind: str) -> dict[str, Any]:
    """One line of `dynsupctl events --json`."""
    return {
        "type": kind,  # "snapshot" (the present), "change", or "resync" (we lagged)
        "unit": snap.name,
        "old": old,
        "new": snap.state.value,
        "pid": snap.pid,
        "reason": snap.reason,
        "exit_status": snap.exit_status,
        "restarts": snap.restarts,
        "time": snap.since,
    }


async def state_events(
    feed: Feed[UnitStatus], present: list[UnitStatus], selected: set[str] | None
) -> AsyncIterator[dict[str, Any]]:
    """The present (one "snapshot" event per unit), then every change, forever.

    ``selected`` None follows every unit, also those an update adds later.
    After the feed resynchronised (this client read too slowly), the
    units' present states come as "resync" events: changes in between
    were skipped, never reordered.
    """
    with feed:
        last: dict[str, str] = {}
        for snap in present:
            last[snap.name] = snap.state.value
            yield event_of(snap, None, "snapshot")
        resyncs = feed.resyncs
        async for snap in feed:
            if selected is not None and snap.name not in selected:
                continue
            kind = "resync" if feed.resyncs != resyncs else "change"
            old = last.get(snap.name)
            last[snap.name] = snap.state.value
            if kind == "resync" and old == snap.state.value:
                continue  # unchanged while we lagged
            yield event_of(snap, old, kind)


async def follow_units(
    agent: Agent,
    follower: ChunkFollower,
    streams: Iterable[str],
    lines: int,
) -> AsyncIterator[dict[str, Any]]:
    """``{"units": [...]}`` first (the names followed, for the client's layout), then
    each unit's last lines, then everything they print: ``{"unit", "stream",
    "data", "missed"}`` events. ``missed`` counts the bytes of that unit's stream
    this follower lost (it read too slowly), as single-unit `tail -f` does."""
    wanted = tuple(streams)
    position: dict[tuple[str, str], int] = {}
    try:
        yield {"units": list(follower.names)}
        # The follower was registered before these reads: nothing printed in
        # between is lost, and what both saw is sent once (by offset).
        for name in follower.names:
            for stream in wanted:
                try:
                    first = await agent.tail_log(name, stream, lines)
                except AgentError:
                    continue
                position[(name, stream)] = first.end
                if first.data:
                    yield _log_event(name, stream, first.data, 0)
        async for chunk in follower.chunks():
            if chunk.stream not in wanted:
                continue
            key = (chunk.name, chunk.stream)
            at = position.get(key, 0)
            end = chunk.offset + len(chunk.data)
            if end <= at:
                continue
            missed = max(0, chunk.offset - at)
            position[key] = end
            yield _log_event(
                chunk.name, chunk.stream, chunk.data[max(0, at - chunk.offset) :], missed
            )
    finally:
        follower.close()


def _log_event(unit: str, stream: str, data: bytes, missed: int) -> dict[str, Any]:
    return {
        "unit": unit,
        "stream": stream,
        "data": data.decode("utf-8", "replace"),
        "missed": missed,
        "time": time.time(),
    }
