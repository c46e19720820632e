"""A pool's replica slots: which names (and so which ports) its replicas have.

Replica ``<model>-<slot>`` (``<model>-<role>-<slot>``) has the ports of its
slot (``worker_ports(block, role, slot)``). Without a saved list a pool of n
has slots 0..n-1. A surge (a rolling update that starts each new replica
before an old one is drained) needs one slot more than the pool has for a
while, so it moves the pool's slots; the daemon saves them in state.toml
before the surge starts, and the expansion names replicas from them.
"""

from __future__ import annotations


def pool_slots(saved: tuple[int, ...], count: int) -> tuple[int, ...]:
    """The slots of a pool of count replicas: the first of those saved, then the
    lowest free ones (so scaling down and up again reuses the same names)."""
    slots = list(saved[:count])
    free = (k for k in range(count + len(saved)) if k not in slots)
    while len(slots) < count:
        slots.append(next(free))
    return tuple(slots)


def surge_slots(slots: tuple[int, ...]) -> tuple[int, ...]:
    """A pool's slots for a surge: the lowest free slot first (its replica starts
    before any old one is touched), then every old slot but the last (each
    replaced in place while the others serve); the last is drained and removed."""
    spare = min(k for k in range(len(slots) + 1) if k not in slots)
    return (spare, *slots[:-1])


def pool_of(name: str, group: str) -> tuple[str, int] | None:
    """("MODEL" or "MODEL:ROLE", slot) of a replica named by the expansion, else None."""
    rest = name[len(group) + 1 :] if name.startswith(f"{group}-") else ""
    if rest.isdigit():
        return group, int(rest)
    role, _, slot = rest.partition("-")
    if role in ("prefill", "decode") and slot.isdigit():
        return f"{group}:{role}", int(slot)
    return None
