"""Restart decisions: one pure function of policy, exit status, history and time.

    decide(spec, status, up_for, history, now) -> Restart | GiveUp | Done

Nothing here records anything: the lifecycle keeps the `History` it gets
back and adds each start itself, so the decision can be read (and tested)
in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..agent_api import ExitStatus
from ..units.spec import RestartPolicy, ServiceSpec


@dataclass(frozen=True)
class History:
    """What the decision needs to know of the runs before."""

    starts: tuple[float, ...] = ()  # times of the starts still inside the start-limit window
    failures: int = 0  # consecutive failed runs

    def started(self, now: float, window: float) -> History:
        recent = tuple(t for t in self.starts if now - t < window)
        return History(starts=(*recent, now), failures=self.failures)


@dataclass(frozen=True)
class Restart:
    delay: float
    history: History  # keep this one for the next decision
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass(frozen=True)
class Done:
    reason: str


Decision = Restart | GiveUp | Done


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
    exponent = min(consecutive_failures - 1, 64)  # 2**64 * any delay is past any cap
    return min(spec.restart_delay * (2**exponent), spec.restart_delay_max)


def healthy_after(spec: ServiceSpec) -> float:
    """How long a run must stay up before its failure count resets.

    A run that outlived the longest backoff is not part of a crash loop.
    """
    return max(spec.restart_delay_max, spec.start_seconds)


def decide(
    spec: ServiceSpec, status: ExitStatus, up_for: float, history: History, now: float
) -> Decision:
    """What to do after a run that ended with status, having been RUNNING for up_for."""
    what = status.describe()
    if not should_restart(spec.restart, status, spec.success_exit_codes):
        return Done(what)
    failures = 0 if up_for >= healthy_after(spec) else history.failures
    failures += 1
    delay = backoff_delay(spec, failures)
    # Decide now whether the next start would break the limit, so a crash
    # loop ends in FATAL at its last exit, not one delay later.
    next_start = now + delay
    recent = [t for t in history.starts if next_start - t < spec.start_limit_interval]
    if len(recent) >= spec.start_limit_burst:
        return GiveUp(
            f"{what}; start limit: more than {spec.start_limit_burst} starts"
            f" within {spec.start_limit_interval:g}s"
        )
    return Restart(
        delay=delay,
        history=History(starts=history.starts, failures=failures),
        reason=f"{what}; restart in {delay:g}s",
    )
