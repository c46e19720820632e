"""What differs between the Dynamo releases dynsup supports, in one table.

The expansion asks the row of the installed release (``ai-dynamo``'s
version, major.minor) instead of testing versions where it builds argv.
Supported: 1.4 (1.4.2) and 1.6 (1.6.1, the default). A release between two
rows gets the older row; one newer than the table, the newest.

Stop timeouts follow the worker's graceful shutdown on SIGTERM
(``dynamo/common/utils/graceful_shutdown.py`` of each release): unregister
from discovery, sleep the grace period (``DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS``,
5 s), a drain step (bounded at 30 s; the vLLM worker passes none), from 1.6 a
pre-shutdown step (lease-owned records, bounded at 30 s), then the runtime and
the engine shut down.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass

GRACE_ENV = "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"
DEFAULT_GRACE = 5.0  # _DEFAULT_GRACE_PERIOD_SECS in both releases
# After runtime.shutdown(): vLLM's engine core and workers free the GPUs. Not
# bounded by Dynamo; what dynsup allowed before the shutdown steps grew.
VLLM_TEARDOWN = 55.0
MOCKER_STOP = 10.0  # the mocker shuts its runtimes down at once (no grace, no drain)


@dataclass(frozen=True)
class Release:
    version: tuple[int, int]
    # vLLM's kv_role for the NIXL connector of a disaggregated role.
    kv_roles: Mapping[str, str]
    # Upper bounds of the worker's shutdown steps after the grace period.
    shutdown_steps: float

    def vllm_stop_timeout(self, environment: Mapping[str, str]) -> float:
        """SIGTERM → SIGKILL for a vLLM worker: every step of its graceful shutdown."""
        try:
            grace = max(0.0, float(environment.get(GRACE_ENV, DEFAULT_GRACE)))
        except ValueError:
            grace = DEFAULT_GRACE  # Dynamo falls back the same way
        return grace + self.shutdown_steps + VLLM_TEARDOWN


RELEASES = (
    Release((1, 4), kv_roles={"prefill": "kv_both", "decode": "kv_both"}, shutdown_steps=0.0),
    # The KV producer/consumer roles; the pre-shutdown step (30 s at most).
    Release(
        (1, 6), kv_roles={"prefill": "kv_producer", "decode": "kv_consumer"}, shutdown_steps=30.0
    ),
)
DEFAULT = RELEASES[-1]


def release_for(version: str) -> Release:
    """The row for a version string such as "1.6.1"; the default when unreadable."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return DEFAULT
    older = [r for r in RELEASES if r.version <= (major, minor)]
    return older[-1] if older else RELEASES[0]


def installed_release() -> Release:
    """The row of the installed ai-dynamo (the default when it is not installed)."""
    try:
        return release_for(importlib.metadata.version("ai-dynamo"))
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT
