"""Frozen spec objects: what a unit file means, after validation.

Specs are plain frozen dataclasses so that a reload is a diff: two specs
are the same unit configuration exactly when they compare equal. Mappings
are stored as sorted tuples of pairs to keep them hashable and ordered.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field


class RestartPolicy(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class ProbeKind(enum.Enum):
    TCP = "tcp"  # "host:port" accepts a connection
    HTTP = "http"  # GET answers 2xx
    LOG = "log"  # a regex matches a line the unit printed
    EXEC = "exec"  # a command exits 0
    MODELS = "models"  # an OpenAI /v1/models lists every name in `models`


@dataclass(frozen=True)
class ReadySpec:
    kind: ProbeKind
    target: str  # tcp "host:port", http/models URL, log regex
    argv: tuple[str, ...] = ()  # exec only
    models: tuple[str, ...] = ()  # models only
    timeout: float = 30.0  # from spawn to ready; past it the start failed
    interval: float = 0.1  # between two attempts of a polling probe


@dataclass(frozen=True)
class LiveSpec(ReadySpec):
    """A liveness probe: watches a RUNNING unit (never a starting one).

    The probe kinds are readiness's (no log probe: a line is printed once).
    Here ``timeout`` bounds one check and ``interval`` separates two; after
    ``failures`` consecutive failed checks the unit is withdrawn from
    discovery and restarted. ``grace`` is waited after RUNNING first.
    """

    timeout: float = 5.0
    interval: float = 2.0
    failures: int = 3
    grace: float = 0.0


@dataclass(frozen=True, order=True)
class Registry:
    """The service-discovery store a unit registers itself in (Dynamo's).

    A process killed by SIGKILL cannot withdraw its own records; knowing where
    they live lets the supervisor do it for them.
    """

    backend: str  # "file" (a directory of records) or "etcd"
    location: str  # the directory, or the etcd endpoint URL
    # The addresses ("host:port") the unit advertises: its records, found while it
    # still runs (a hung process must be withdrawn before it is killed).
    own: tuple[str, ...] = ()
    # The routers that read the store, as (unit, base URL): Dynamo's frontends
    # (one per `frontend_replicas`). A router's /health lists the instances it
    # routes to: "taking traffic" is seen there.
    routers: tuple[tuple[str, str], ...] = ()
    # The model the unit serves there, its role ("agg", "prefill", "decode"), and
    # whether a canary request through the router checks the model end to end.
    serves: str = ""
    role: str = ""
    canary: bool = False


@dataclass(frozen=True)
class ServiceSpec:
    """One supervised program: everything the engine needs to run it."""

    name: str
    command: tuple[str, ...]
    description: str = ""
    requires: tuple[str, ...] = ()
    autostart: bool = True
    environment: tuple[tuple[str, str], ...] = ()
    working_directory: str | None = None
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    restart_delay: float = 0.1
    restart_delay_max: float = 30.0
    start_limit_burst: int = 5
    start_limit_interval: float = 60.0
    success_exit_codes: tuple[int, ...] = (0,)
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    start_seconds: float = 1.0
    # How the supervisor watches the program, not what runs: a change is no
    # reason to restart it (`update` takes the new probes for the next start).
    # So the frontend's readiness, which lists the served models, does not make
    # adding a model a restart of the frontend.
    ready: ReadySpec | None = field(default=None, compare=False)
    live: LiveSpec | None = field(default=None, compare=False)
    gpus: int = 0
    # Inherited variables to drop ("DYN_*" drops a prefix): a stack sets exactly
    # what it needs, and a stray NATS_SERVER in the daemon's environment must not leak in.
    unset_env: tuple[str, ...] = ()
    # Ports the program will bind: checked free on its node before each spawn.
    ports: tuple[int, ...] = ()
    # A unit spread over several nodes runs one rank per node: ranks > 0 get
    # these arguments too (vLLM's --headless).
    secondary_args: tuple[str, ...] = ()
    # Units of one group (a model's replicas) are replaced one at a time by
    # `update`, each RUNNING and taking traffic before the next is stopped.
    group: str = field(default="", compare=False)
    # Its group may roll by surge: the new spec on a spare slot first, then an
    # old replica drained (`[model] surge`). How it is replaced, not what runs.
    surge: bool = field(default=False, compare=False)
    # Where the program registers for discovery. Derived from the same stack
    # settings as its environment, so it adds nothing to the unit's identity.
    registry: Registry | None = field(default=None, compare=False)
    # Where the spec came from; not part of its identity, so moving a file
    # or expanding the same model twice does not count as a change.
    source: str = field(default="", compare=False)

    @property
    def env(self) -> dict[str, str]:
        return dict(self.environment)


def freeze_env(mapping: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(mapping.items()))
