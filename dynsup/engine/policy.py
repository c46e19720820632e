"""Restart decisions as pure functions of policy, exit status, counts and time."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..agent_api import ExitStatus
from ..units.spec import RestartPolicy, ServiceSpec


def should_restart(policy: RestartPolicy, status: ExitStatus, success: tuple[int, ...]) -> bool:
    if policy is RestartPolicy.ALWAYS:
        return True
    if policy is RestartPolicy.ON_FAILURE:
        return not status.is_success(success)
    return False


def backoff_delay(spec: ServiceSpec, consecutive_failures: int) -> float:
    """restart_delay, doubled for each consecutive failure, capped at restart_delay_max."""
    if consecutive_failures <= 0:
        return spec.restart_delay
    return min(spec.restart_delay * (2 ** (consecutive_failures - 1)), spec.restart_delay_max)


def healthy_after(spec: ServiceSpec) -> float:
    """How long a run must stay up before its failure count resets.

    A run that outlived the longest backoff is not part of a crash loop.
    """
    return max(spec.restart_delay_max, spec.start_seconds)


@dataclass
class StartLimiter:
    """More than `burst` starts within `interval` seconds means: give up (FATAL)."""

    burst: int
    interval: float
    _starts: deque[float] = field(default_factory=deque)

    def allow(self, now: float) -> bool:
        while self._starts and now - self._starts[0] >= self.interval:
            self._starts.popleft()
        if len(self._starts) >= self.burst:
            return False
        self._starts.append(now)
        return True
