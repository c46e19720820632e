"""Reload is a diff: set arithmetic on names, frozen-dataclass equality on specs."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from ..units.spec import ServiceSpec


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: Mapping[str, tuple[str, ...]]  # unit -> names of the fields that differ

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def fingerprint(spec: ServiceSpec) -> str:
    """A short digest of everything that makes two specs the same unit configuration.

    Given to the agent with each spawn, so a restarted daemon can tell which
    running processes still match their unit (adopt) and which do not (replace).
    """
    identity = [(f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.compare]
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:16]


def changed_fields(old: ServiceSpec, new: ServiceSpec) -> tuple[str, ...]:
    return tuple(
        f.name
        for f in dataclasses.fields(ServiceSpec)
        if f.compare and getattr(old, f.name) != getattr(new, f.name)
    )


def diff_specs(old: Mapping[str, ServiceSpec], new: Mapping[str, ServiceSpec]) -> ReloadPlan:
    kept = old.keys() & new.keys()
    return ReloadPlan(
        added=tuple(sorted(new.keys() - old.keys())),
        removed=tuple(sorted(old.keys() - new.keys())),
        changed={
            name: changed_fields(old[name], new[name])
            for name in sorted(kept)
            if old[name] != new[name]
        },
    )
