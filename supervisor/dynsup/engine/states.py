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
# What a unit wanted at daemon start must reach before READY=1: up, or given up
# with a reason. (Not STOPPED: that is where every unit begins.)
UP_OR_GAVE_UP = frozenset({State.RUNNING, State.EXITED, State.FATAL})

# The engine's lifecycle in one table. A run ends through STOPPING: the leader's
# exit shows at once (STOPPING "exit status 1; tearing down the group"), and
# the unit settles (BACKOFF, EXITED, FATAL, STOPPED) only once its group is gone.
ALLOWED: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.PENDING}),
    State.EXITED: frozenset({State.PENDING}),
    State.FATAL: frozenset({State.PENDING}),
    # From PENDING without a spawn: a port in use (BACKOFF, or EXITED under
    # restart = "no"), placement or a requirement failed (FATAL), stopped.
    State.PENDING: frozenset(
        {State.STARTING, State.BACKOFF, State.EXITED, State.FATAL, State.STOPPED, State.STOPPING}
    ),
    State.STARTING: frozenset({State.RUNNING, State.STOPPING, State.FATAL}),
    State.RUNNING: frozenset({State.STOPPING, State.FATAL}),
    State.BACKOFF: frozenset(
        {State.STARTING, State.EXITED, State.FATAL, State.STOPPED, State.STOPPING}
    ),
    State.STOPPING: frozenset({State.STOPPED, State.BACKOFF, State.EXITED, State.FATAL}),
}


class TransitionError(RuntimeError):
    """A bug: the engine tried a transition the table does not allow."""


def check_transition(old: State, new: State) -> None:
    if new is not old and new not in ALLOWED.get(old, frozenset()):
        raise TransitionError(f"{old.value} -> {new.value} is not a valid transition")
