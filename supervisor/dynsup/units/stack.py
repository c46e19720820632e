"""The ``[dynamo]`` and ``[model]`` kinds: stack settings and model units.

These only describe; `dynsup.dynamo` expands them into services.

``[dynamo]`` (one file per stack; its name does not matter)::

    namespace = "dynamo"
    discovery = "etcd"            # "etcd" | "file"
    request_plane = "tcp"         # "tcp" | "nats"
    event_plane = "zmq"           # "zmq" | "nats"
    router_mode = "kv"            # round-robin | random | kv | direct; unset: kv when
                                  # any model is disaggregated, else round-robin
    host = "127.0.0.1"            # where the stack binds
    frontend_port = 8000
    frontend_replicas = 1         # frontends: "frontend" on frontend_port, then
                                  # "frontend-<k>" on frontend_port + k
    frontend_args = []            # extra flags for dynamo.frontend
    etcd_endpoint = ""            # external etcd: dynsup runs none
    nats_url = ""                 # external NATS: dynsup runs none
    etcd_port = 2379              # the managed etcd's client port (peer: +1)
    nats_port = 4222              # the managed NATS's port (monitoring: +4000)
    port_base = 21000             # first port of the per-worker blocks
    environment = {}              # added to every process of the stack

``[model]`` keys: see DESIGN.md ("Units"); plus ``environment``,
``stop_timeout`` and ``gpus`` (per worker: 0 for vLLM's CPU build; default
``tensor_parallel_size`` for vllm, 0 for the mocker). A relative ``path``
that names a directory beside the unit file is made absolute; anything else
is a hub id and kept as written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .durations import parse_duration
from .errors import (
    Invalid,
    Problems,
    Table,
    as_bool,
    as_nonempty_str,
    as_str,
    as_table,
    describe,
    int_at_least,
    show,
)
from .service import Placeholders, as_argv, as_environment, section
from .tomlfile import DATE_TIME

DISCOVERY = ("etcd", "file")
REQUEST_PLANES = ("tcp", "nats")
EVENT_PLANES = ("zmq", "nats")
ROUTER_MODES = ("round-robin", "random", "kv", "direct")
ENGINES = ("vllm", "mocker")
MODES = ("aggregated", "disaggregated")

STACK_KEYS = (
    "namespace",
    "discovery",
    "request_plane",
    "event_plane",
    "router_mode",
    "host",
    "frontend_port",
    "frontend_replicas",
    "frontend_args",
    "etcd_endpoint",
    "nats_url",
    "etcd_port",
    "nats_port",
    "port_base",
    "environment",
)
MODEL_KEYS = (
    "name",
    "path",
    "engine",
    "mode",
    "replicas",
    "tensor_parallel_size",
    "migration_limit",
    "engine_args",
    "environment",
    "stop_timeout",
    "gpus",
    "prefill",
    "decode",
    "canary",
    "surge",
)
ROLE_KEYS = ("replicas", "engine_args")

# engine_args as sorted (key, JSON text) pairs: hashable, and equal exactly
# when the arguments are.
FrozenArgs = tuple[tuple[str, str], ...]


def freeze_args(args: Mapping[str, Any]) -> FrozenArgs:
    return tuple(sorted((key, json.dumps(value, sort_keys=True)) for key, value in args.items()))


def thaw_args(args: FrozenArgs) -> dict[str, Any]:
    return {key: json.loads(text) for key, text in args}


@dataclass(frozen=True)
class StackSpec:
    namespace: str = "dynamo"
    discovery: str = "etcd"
    request_plane: str = "tcp"
    event_plane: str = "zmq"
    router_mode: str | None = None
    host: str = "127.0.0.1"
    frontend_port: int = 8000
    frontend_replicas: int = 1
    frontend_args: tuple[str, ...] = ()
    etcd_endpoint: str = ""
    nats_url: str = ""
    etcd_port: int = 2379
    nats_port: int = 4222
    port_base: int = 21000
    environment: tuple[tuple[str, str], ...] = ()
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class RoleSpec:
    """One pool of a disaggregated model: its size and its own engine args."""

    replicas: int
    engine_args: FrozenArgs = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the unit's name
    model: str  # the served model name
    path: str
    engine: str = "vllm"
    mode: str = "aggregated"
    replicas: int = 1
    tensor_parallel_size: int = 1
    migration_limit: int = 0
    engine_args: FrozenArgs = ()
    environment: tuple[tuple[str, str], ...] = ()
    stop_timeout: float | None = None  # None: the engine's default
    gpus: int | None = None  # per worker; None: tensor_parallel_size for vllm, 0 for mocker
    prefill: RoleSpec | None = None
    decode: RoleSpec | None = None
    description: str = ""
    requires: tuple[str, ...] = ()
    autostart: bool = True
    # A periodic 1-token request through the frontend heals a model that its
    # RUNNING workers do not serve (dynamo/canary.py); false opts out.
    canary: bool = True
    # A rolling update starts each new replica on a spare slot before an old one
    # is drained (where its GPUs allow); false: drain first, on the same slot.
    surge: bool = True
    source: str = field(default="", compare=False)


def one_of(choices: tuple[str, ...]) -> Any:
    def convert(value: object) -> str:
        text = as_str(value)
        if text not in choices:
            raise Invalid(f"expected one of {', '.join(map(show, choices))}, got {show(text)}")
        return text

    return convert


def as_port(value: object) -> int:
    port = int_at_least(1)(value)
    if port > 65535:
        raise Invalid(f"must be a port number (1..65535), got {port}")
    return port


def parse_stack(
    name: str,
    document: Mapping[str, Any],
    problems: Problems,
    context: Mapping[str, str] | None,
) -> StackSpec:
    _no_other_tables(document, "dynamo", problems)
    table = section(problems, document, "dynamo", STACK_KEYS)
    fill = Placeholders(context)
    frontend_port = table.get("frontend_port", as_port, 8000)
    return StackSpec(
        namespace=table.get("namespace", _slug_checked, "dynamo"),
        discovery=table.get("discovery", one_of(DISCOVERY), "etcd"),
        request_plane=table.get("request_plane", one_of(REQUEST_PLANES), "tcp"),
        event_plane=table.get("event_plane", one_of(EVENT_PLANES), "zmq"),
        router_mode=table.get("router_mode", one_of(ROUTER_MODES), None),
        host=table.get("host", as_nonempty_str, "127.0.0.1"),
        frontend_port=frontend_port,
        frontend_replicas=_frontend_replicas(table, frontend_port),
        frontend_args=table.get("frontend_args", lambda v: fill.argv(as_argv(v)), ()),
        etcd_endpoint=table.get("etcd_endpoint", as_str, ""),
        nats_url=table.get("nats_url", as_str, ""),
        etcd_port=table.get("etcd_port", as_port, 2379),
        nats_port=table.get("nats_port", as_port, 4222),
        port_base=table.get("port_base", as_port, 21000),
        environment=_env(table, fill),
    )


def _frontend_replicas(table: Table, first_port: int) -> int:
    """Replica k listens on first_port + k: all of them must be ports."""
    count = table.get("frontend_replicas", int_at_least(1), 1)
    if first_port + count - 1 > 65535:
        table.report(
            "frontend_replicas",
            f"{count} frontends need ports {first_port}..{first_port + count - 1}, above 65535",
        )
        return 1
    return count


def parse_model(
    name: str,
    document: Mapping[str, Any],
    problems: Problems,
    context: Mapping[str, str] | None,
) -> ModelSpec:
    _no_other_tables(document, "model", problems)
    table = section(problems, document, "model", MODEL_KEYS)
    fill = Placeholders(context)
    mode = table.get("mode", one_of(MODES), "aggregated")
    roles = {role: _role(table, role) for role in ("prefill", "decode")}
    if mode == "aggregated":
        for role, spec in roles.items():
            if spec is not None:
                table.report(role, f'[model.{role}] is only for mode = "disaggregated"')
    else:
        roles = {role: spec or RoleSpec(replicas=1) for role, spec in roles.items()}
    return ModelSpec(
        name=name,
        model=table.require("name", as_nonempty_str, name),
        path=table.require(
            "path", lambda v: _model_path(fill.text(as_nonempty_str(v)), problems), ""
        ),
        engine=table.get("engine", one_of(ENGINES), "vllm"),
        mode=mode,
        replicas=table.get("replicas", int_at_least(0), 1),
        tensor_parallel_size=table.get("tensor_parallel_size", int_at_least(1), 1),
        migration_limit=table.get("migration_limit", int_at_least(0), 0),
        engine_args=table.get("engine_args", _engine_args, ()),
        environment=_env(table, fill),
        stop_timeout=table.get("stop_timeout", parse_duration, None),
        gpus=table.get("gpus", int_at_least(0), None),
        prefill=roles["prefill"],
        decode=roles["decode"],
        canary=table.get("canary", as_bool, True),
        surge=table.get("surge", as_bool, True),
    )


def _model_path(path: str, problems: Problems) -> str:
    candidate = Path(problems.file).parent / path
    try:
        if not Path(path).is_absolute() and candidate.is_dir():
            return str(candidate.resolve())
    except OSError:  # a name too long to be a directory here: a hub id, or wrong either way
        pass
    return path


def _role(table: Table, role: str) -> RoleSpec | None:
    if role not in table:
        return None
    try:
        data = as_table(table.data[role])
    except Invalid as invalid:
        table.problems.add_invalid(table.key(role), invalid)
        return None
    sub = Table(table.problems, f"model.{role}", data, ROLE_KEYS)
    return RoleSpec(
        replicas=sub.get("replicas", int_at_least(0), 1),
        engine_args=sub.get("engine_args", _engine_args, ()),
    )


def _engine_args(value: object) -> FrozenArgs:
    args = as_table(value)
    problems = []
    for key, arg in args.items():
        if not (key.isascii() and key.replace("_", "").replace("-", "").isalnum()):
            problems.append((f".{key}", f"not a flag name: {show(key)}"))
        problems.extend((f".{key}{at}", message) for at, message in _flag_value_problems(arg))
    if problems:
        raise Invalid.many(problems)
    return freeze_args(args)


def _flag_value_problems(value: object, at: str = "") -> list[tuple[str, str]]:
    """What in an engine arg cannot become a command-line flag (JSON for tables and arrays).

    Recursive: the loader has already refused values nested too deeply.
    """
    if isinstance(value, DATE_TIME):
        return [(at, f"{describe(value)} cannot be passed to the engine; quote it as a string")]
    if isinstance(value, float) and not math.isfinite(value) and at:
        return [(at, f"{value} cannot be written in JSON; quote it as a string")]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _flag_value_problems(v, f"{at}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _flag_value_problems(v, f"{at}[{i}]")]
    return []


def _env(table: Table, fill: Placeholders) -> tuple[tuple[str, str], ...]:
    env = table.get("environment", lambda v: fill.environment(as_environment(v)), {})
    return tuple(sorted(env.items()))


def _slug_checked(value: object) -> str:
    text = as_nonempty_str(value)
    if not all(c.isalnum() or c in "-_" for c in text):
        raise Invalid(f"use letters, digits, '-' and '_' only, got {show(text)}")
    return text


def _no_other_tables(document: Mapping[str, Any], kind: str, problems: Problems) -> None:
    for other in ("service", "ready", "resources"):
        if other in document:
            problems.add(other, f"[{other}] does not belong in a [{kind}] unit")
