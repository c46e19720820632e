"""Unit states (supervisord's names, so operators recognise them) and their transitions."""

from __future__ import annotations

import enum


class State(enum.Enum):
    STOPPED = "STOPPED"  # never started, or stopped by hand
    PENDING = "PENDING"  # wants to run: waiting for dependencies or a reservation
    STARTING = "STARTING"  # spawned, not yet ready
    RUNNING = "RUNNING"  # ready
    BACKOFF = "BACKOFF"  # exited, waiting to restart
    STOPPING = "STOPPING"
    EXITED = "EXITED"  # exited and will not restart
    FATAL = "FATAL"  # gave up: start limit hit, or cannot spawn


# supervisord's named sets.
STOPPED_STATES = frozenset({State.STOPPED, State.EXITED, State.FATAL})
RUNNING_STATES = frozenset({State.RUNNING, State.BACKOFF, State.STARTING})
ACTIVE_STATES = frozenset({State.PENDING, State.STARTING, State.RUNNING, State.BACKOFF})
# Where a start ends: running, or not going to run without a new command.
SETTLED_STATES = frozenset({State.RUNNING, State.EXITED, State.FATAL, State.STOPPED})

ALLOWED: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.PENDING}),
    State.EXITED: frozenset({State.PENDING}),
    State.FATAL: frozenset({State.PENDING}),
    State.PENDING: frozenset({State.STARTING, State.STOPPED, State.FATAL, State.STOPPING}),
    State.STARTING: frozenset(
        {State.RUNNING, State.BACKOFF, State.EXITED, State.FATAL, State.STOPPING}
    ),
    State.RUNNING: frozenset({State.BACKOFF, State.EXITED, State.FATAL, State.STOPPING}),
    State.BACKOFF: frozenset({State.STARTING, State.FATAL, State.STOPPED, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
}


class TransitionError(RuntimeError):
    """A bug: the engine tried a transition the table does not allow."""


def check_transition(old: State, new: State) -> None:
    if new is not old and new not in ALLOWED.get(old, frozenset()):
        raise TransitionError(f"{old.value} -> {new.value} is not a valid transition")
