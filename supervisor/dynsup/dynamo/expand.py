"""Model units + stack settings → the services of a Dynamo stack.

What comes out for a directory with at least one `[model]`:

* ``etcd`` when discovery is etcd and no external endpoint is given;
* ``nats`` when a plane uses NATS and no external URL is given (Dynamo
  1.4.2 needs none with its defaults: requests over TCP, events over ZMQ);
* ``frontend``, ready once ``/v1/models`` lists every served model; with
  ``frontend_replicas = n`` also ``frontend-1`` … ``frontend-<n-1>``, the same
  program on ``frontend_port + k``, each probed on its own port (none
  requires another: any one that is RUNNING serves every model);
* the workers: ``<unit>-<i>`` (aggregated), ``<unit>-prefill-<i>`` and
  ``<unit>-decode-<i>`` (disaggregated), each ready on its own
  ``DYN_SYSTEM_PORT``'s ``/health``.

A ``[service]`` file named like an implicit unit replaces it. Workers
require etcd/nats (they register there) but not the frontend, which
discovers them as they come. Frontend and workers restart ``always``:
Dynamo processes exit 0 when etcd goes away, and must come back with it.
Every environment starts from the daemon's minus ``DYN_*``, ``ETCD_*`` and
``NATS_*`` (a stray ``NATS_SERVER`` makes every Dynamo process exit), then
gets exactly what the stack needs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..units.errors import UnitError
from ..units.spec import (
    LiveSpec,
    ProbeKind,
    ReadySpec,
    Registry,
    RestartPolicy,
    ServiceSpec,
    freeze_env,
)
from ..units.stack import ModelSpec, StackSpec, thaw_args
from .binaries import MissingProgram, etcd_binary, nats_binary, python_module
from .flags import merge_args, to_flags
from .ports import PortError, model_blocks, worker_ports
from .releases import MOCKER_STOP, Release, installed_release
from .slots import pool_slots

UNSET = ("DYN_*", "ETCD_*", "NATS_*")
DEFAULT_MIGRATION_LIMIT = 3
# Liveness, checked only once RUNNING (a slow model load is the readiness
# probe's business). `/live` of a worker's system port is answered by Dynamo's
# runtime threads, not by the engine, so a busy engine still answers; a hung
# process (SIGSTOP, a wedged runtime) does not. A check fails when no answer
# comes within `timeout`; `failures` in a row are needed, so one slow answer on
# a loaded node is never a restart. Mocker: found in about 3 x (2 + 1) = 9 s.
# vLLM: more patience (a GIL-heavy step can delay the HTTP thread): ~21 s.
WORKER_LIVE = {
    "mocker": {"interval": 1.0, "timeout": 2.0, "failures": 3},
    "vllm": {"interval": 2.0, "timeout": 5.0, "failures": 3},
}
FRONTEND_LIVE = {"interval": 1.0, "timeout": 2.0, "failures": 3}
FRONTEND = "frontend"
# Flags dynsup sets itself: an engine_args key for one would come later and win.
OWNED_ARGS = {
    "vllm": frozenset({
        "model", "served_model_name", "endpoint", "namespace", "discovery_backend",
        "request_plane", "event_plane", "tensor_parallel_size", "disaggregation_mode",
        "kv_events_config", "kv_transfer_config", "nnodes", "node_rank", "master_addr",
        "master_port", "headless",
    }),
    "mocker": frozenset({
        "model_path", "model_name", "endpoint", "namespace", "discovery_backend",
        "request_plane", "event_plane", "disaggregation_mode",
    }),
}  # fmt: skip


@dataclass(frozen=True)
class StackContext:
    """What the expansion needs from the daemon."""

    state_dir: str
    # GPUs of one node; a TP group larger than this spans nodes (ranks).
    gpus_per_node: int | None = None
    replicas: Mapping[str, int] = field(default_factory=dict)  # `dynsupctl scale` overrides
    # Each pool's replica slots ("MODEL" or "MODEL:ROLE" -> slot numbers), as saved:
    # replica <unit>-<slot> has the ports of its slot. Absent: 0..n-1.
    slots: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Each model's port block as last assigned; the expansion writes the
    # blocks it assigns into port_blocks_out, for the daemon to remember.
    port_blocks: Mapping[str, int] = field(default_factory=dict)
    port_blocks_out: dict[str, int] = field(default_factory=dict)
    # The Dynamo release whose flags and shutdown to plan for.
    release: Release = field(default_factory=installed_release)


class _Problems:
    def __init__(self) -> None:
        self.errors: list[UnitError] = []

    def add(self, file: str, key: str, message: str) -> None:
        self.errors.append(UnitError(file, key, message))


def component_slug(model: str) -> str:
    """Dynamo component name for a served model: lower-case letters, digits and '_'."""
    slug = re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_")
    return slug or "model"


def revision_tag(*given: object) -> str:
    """Six hex digits of what a pool's workers are given (never where: ports, slot).

    Dynamo's frontend pins a WorkerSet (namespace, component, endpoint, role) to
    the checksum of the first model card it accepts and rejects a card that
    differs while one of the set lives. A changed worker (its engine args, its
    model path) registering under the old component is rejected until the last
    old replica is gone, and then the model has no set at all for a moment:
    HTTP 404 "model not found". So a worker's component carries this tag: a
    changed pool registers as a WorkerSet of its own beside the old one.
    """
    return hashlib.sha256(repr(given).encode()).hexdigest()[:6]


def frontend_name(replica: int) -> str:
    """``frontend`` for the first (the name with one replica), ``frontend-<k>`` after."""
    return FRONTEND if replica == 0 else f"{FRONTEND}-{replica}"


def router_mode(stack: StackSpec, models: list[ModelSpec]) -> str:
    if stack.router_mode is not None:
        return stack.router_mode
    return "kv" if any(m.mode == "disaggregated" for m in models) else "round-robin"


def expand_stack(
    services: dict[str, ServiceSpec], others: dict[str, list[Any]], ctx: StackContext
) -> tuple[dict[str, ServiceSpec], list[UnitError]]:
    models: list[ModelSpec] = sorted(others.get("ModelSpec", []), key=lambda m: m.name)
    stacks: list[StackSpec] = others.get("StackSpec", [])
    problems = _Problems()
    if len(stacks) > 1:
        for extra in stacks[1:]:
            problems.add(extra.source, "dynamo", f"a second [dynamo] file ({stacks[0].source})")
    if not models:
        return services, problems.errors
    stack = stacks[0] if stacks else StackSpec(source=models[0].source)
    builder = _Builder(stack, models, ctx, problems)
    implicit = {"etcd", "nats", *(name for name, _ in builder.frontends())}
    expanded = dict(services)
    for spec in builder.build():
        if spec.name in services and spec.name in implicit:
            continue  # a [service] file of the same name overrides the implicit unit
        if spec.name in services:
            problems.add(
                services[spec.name].source,
                "",
                f"unit {spec.name!r} clashes with a worker of model unit {spec.source}",
            )
            continue
        expanded[spec.name] = spec
    return expanded, problems.errors


class _Builder:
    def __init__(
        self,
        stack: StackSpec,
        models: list[ModelSpec],
        ctx: StackContext,
        problems: _Problems,
    ) -> None:
        self.stack = stack
        self.models = models
        self.ctx = ctx
        self.problems = problems
        self.mode = router_mode(stack, models)
        self.kv_routing = self.mode == "kv"
        self.use_etcd = stack.discovery == "etcd"
        self.use_nats = "nats" in (stack.request_plane, stack.event_plane)
        self.run_etcd = self.use_etcd and not stack.etcd_endpoint
        self.run_nats = self.use_nats and not stack.nats_url
        self.host = stack.host

    # -- the common environment ----------------------------------------------

    def etcd_url(self) -> str:
        return self.stack.etcd_endpoint or f"http://{self.host}:{self.stack.etcd_port}"

    def nats_url(self) -> str:
        return self.stack.nats_url or f"nats://{self.host}:{self.stack.nats_port}"

    def discovery_dir(self) -> str:
        return str(Path(self.ctx.state_dir) / "dynamo-discovery" / self.stack.namespace)

    def frontends(self) -> list[tuple[str, int]]:
        """(unit, port) of each frontend: ``frontend`` first, as with one replica."""
        first = self.stack.frontend_port
        return [(frontend_name(k), first + k) for k in range(self.stack.frontend_replicas)]

    def registry(self, **worker: Any) -> Registry:
        """Where the stack's workers register; ``worker``: a worker's own fields."""
        routers = tuple((name, f"http://{self.host}:{port}") for name, port in self.frontends())
        if self.use_etcd:
            return Registry("etcd", self.etcd_url().split(",")[0], routers=routers, **worker)
        return Registry("file", self.discovery_dir(), routers=routers, **worker)

    def dynamo_env(self) -> dict[str, str]:
        env = {
            "DYN_TCP_RPC_HOST": self.host,
            "DYN_REQUEST_PLANE": self.stack.request_plane,
            "DYN_EVENT_PLANE": self.stack.event_plane,
            # A writable home: the frontend caches model cards under ~/.cache.
            "HOME": str(Path(self.ctx.state_dir) / "home"),
            # Output goes to rings and journald, not a terminal: no colour codes.
            "DYN_SDK_DISABLE_ANSI_LOGGING": "1",
        }
        if self.use_etcd:
            env["ETCD_ENDPOINTS"] = self.etcd_url()
        else:
            env["DYN_FILE_KV"] = self.discovery_dir()
        if self.use_nats:
            env["NATS_SERVER"] = self.nats_url()
        if self.kv_routing:
            env["PYTHONHASHSEED"] = "0"  # KV event ids are hashes: stable across processes
        return {**env, **dict(self.stack.environment)}

    def infra(self) -> tuple[str, ...]:
        return tuple(n for n, on in (("etcd", self.run_etcd), ("nats", self.run_nats)) if on)

    def discovery_args(self) -> list[str]:
        return ["--discovery-backend", self.stack.discovery]

    # -- units -------------------------------------------------------------------

    def build(self) -> list[ServiceSpec]:
        specs: list[ServiceSpec] = []
        for make in (self.etcd, self.nats):
            spec = self._guard(make)
            if spec is not None:
                specs.append(spec)
        for name, port in self.frontends():
            spec = self._guard(partial(self.frontend, name, port))
            if spec is not None:
                specs.append(spec)
        try:
            blocks = model_blocks(
                [m.name for m in self.models], self.stack.port_base, self.ctx.port_blocks
            )
        except PortError as exc:
            self.problems.add(self.stack.source, "dynamo.port_base", str(exc))
            return specs
        self.ctx.port_blocks_out.update(blocks)
        self._check_slugs()
        for model in self.models:
            specs.extend(self._workers(model, blocks[model.name]))
        return specs

    def _guard(self, make: Any) -> ServiceSpec | None:
        try:
            return make()
        except MissingProgram as exc:
            self.problems.add(self.stack.source, "", str(exc))
            return None

    def etcd(self) -> ServiceSpec | None:
        if not self.run_etcd:
            return None
        port, peer = self.stack.etcd_port, self.stack.etcd_port + 1
        client, peer_url = f"http://{self.host}:{port}", f"http://{self.host}:{peer}"
        command = (
            etcd_binary(),
            "--name", "dynsup",
            "--data-dir", str(Path(self.ctx.state_dir) / "etcd"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"dynsup={peer_url}",
            # One member on one host: fast elections make it ready in ~0.1 s, not ~1 s.
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
        )  # fmt: skip
        return self._implicit(
            "etcd",
            "etcd for Dynamo discovery",
            command,
            ReadySpec(kind=ProbeKind.HTTP, target=f"{client}/health", timeout=30),
            env={},
            ports=(port, peer),
            # etcd re-raises SIGTERM: that is its clean stop, not a failure.
            requires=(),
        )

    def nats(self) -> ServiceSpec | None:
        if not self.run_nats:
            return None
        port, monitor = self.stack.nats_port, self.stack.nats_port + 4000
        command = (
            nats_binary(),
            "-a", self.host,
            "-p", str(port),
            "-m", str(monitor),
            "-js",
            "-sd", str(Path(self.ctx.state_dir) / "nats"),
        )  # fmt: skip
        return self._implicit(
            "nats",
            "NATS for Dynamo's planes",
            command,
            ReadySpec(
                kind=ProbeKind.HTTP, target=f"http://{self.host}:{monitor}/healthz", timeout=30
            ),
            env={},
            ports=(port, monitor),
            requires=(),
        )

    def frontend(self, name: str, port: int) -> ServiceSpec:
        stack = self.stack
        # On by default: a stream broken by a worker's stop or crash goes on on
        # another replica. One value for the frontend (Dynamo's flag is the
        # frontend's), kept constant so that the model list does not change it.
        migration = max((m.migration_limit for m in self.models), default=0)
        migration = max(migration, DEFAULT_MIGRATION_LIMIT)
        command = [
            *python_module("dynamo.frontend"),
            "--http-host", self.host,
            "--http-port", str(port),
            "--namespace", stack.namespace,
            "--router-mode", self.mode,
            *self.discovery_args(),
        ]  # fmt: skip
        if migration:
            # In Dynamo 1.4.2 migration is the frontend's, one value for all models.
            command += ["--migration-limit", str(migration)]
        command += list(stack.frontend_args)
        served = tuple(dict.fromkeys(m.model for m in self.models if self._serves(m)))
        replica = "" if name == FRONTEND else f" (replica {name.rsplit('-', 1)[1]})"
        return self._implicit(
            name,
            f"Dynamo OpenAI frontend{replica}",
            tuple(command),
            ReadySpec(
                kind=ProbeKind.MODELS,
                target=f"http://{self.host}:{port}/v1/models",
                models=served,
                # As long as the slowest worker may take to load: the frontend waits for it.
                timeout=600 if any(m.engine == "vllm" for m in self.models) else 300,
                interval=0.05,
            ),
            live=LiveSpec(
                kind=ProbeKind.HTTP,
                target=f"http://{self.host}:{port}/live",
                **FRONTEND_LIVE,
            ),
            env=self.dynamo_env(),
            ports=(port,),
            requires=self.infra(),
        )

    def _serves(self, model: ModelSpec) -> bool:
        """Has workers: the replica counts after `dynsupctl scale` overrides."""
        return all(count > 0 for _, count, _ in self._roles(model))

    def _implicit(
        self,
        name: str,
        description: str,
        command: tuple[str, ...],
        ready: ReadySpec,
        *,
        live: LiveSpec | None = None,
        env: dict[str, str],
        ports: tuple[int, ...],
        requires: tuple[str, ...],
    ) -> ServiceSpec:
        return ServiceSpec(
            name=name,
            description=description,
            command=command,
            requires=requires,
            environment=freeze_env(env),
            restart=RestartPolicy.ALWAYS,
            restart_delay=0.1,
            restart_delay_max=5.0,
            start_limit_burst=20,
            start_limit_interval=60.0,
            stop_timeout=10.0,
            ready=ready,
            live=live,
            unset_env=UNSET,
            ports=ports,
            source=f"{self.stack.source} (implicit {name})",
        )

    # -- workers -------------------------------------------------------------

    def _check_slugs(self) -> None:
        seen: dict[str, ModelSpec] = {}
        for model in self.models:
            slug = component_slug(model.model)
            components = [slug, f"{slug}_prefill"] if model.mode == "disaggregated" else [slug]
            for component in components:
                other = seen.setdefault(component, model)
                if other is not model and other.model != model.model:
                    self.problems.add(
                        model.source,
                        "model.name",
                        f"model name {model.model!r} makes the Dynamo component "
                        f"{component!r}, as does {other.model!r} ({other.source}); rename one",
                    )
                    break

    def _roles(self, model: ModelSpec) -> list[tuple[str, int, dict[str, Any]]]:
        """(role, replicas, engine args) per pool; role "agg" for aggregated."""
        base = thaw_args(model.engine_args)
        if model.mode == "aggregated":
            count = self.ctx.replicas.get(model.name, model.replicas)
            return [("agg", count, base)]
        roles = []
        for role, pool in (("prefill", model.prefill), ("decode", model.decode)):
            assert pool is not None
            count = self.ctx.replicas.get(f"{model.name}:{role}", pool.replicas)
            roles.append((role, count, merge_args(base, thaw_args(pool.engine_args))))
        return roles

    def _workers(self, model: ModelSpec, block: int) -> list[ServiceSpec]:
        try:
            module = python_module(f"dynamo.{model.engine}")
            if model.engine == "vllm":
                python_module("vllm")
        except MissingProgram as exc:
            self.problems.add(model.source, "model.engine", str(exc))
            return []
        if not self._check_owned_args(model):
            return []
        specs = []
        for role, count, args in self._roles(model):
            pool = model.name if role == "agg" else f"{model.name}:{role}"
            for replica in pool_slots(self.ctx.slots.get(pool, ()), count):
                name = model.name if role == "agg" else f"{model.name}-{role}"
                try:
                    specs.extend(
                        self._worker(model, module, f"{name}-{replica}", role, replica, args, block)
                    )
                except PortError as exc:
                    self.problems.add(model.source, "model.replicas", str(exc))
                    return specs
        return specs

    def _worker(
        self,
        model: ModelSpec,
        module: list[str],
        name: str,
        role: str,
        replica: int,
        args: dict[str, Any],
        block: int,
    ) -> list[ServiceSpec]:
        tp = model.tensor_parallel_size
        ports = worker_ports(block, role, replica, tp)
        slug = component_slug(model.model)
        base = f"{slug}_prefill" if role == "prefill" else slug
        tag = revision_tag(
            model.engine, model.path, model.model, role, tp, to_flags(args), model.environment
        )
        component = f"{base}_{tag}"
        endpoint = f"dyn://{self.stack.namespace}.{component}.generate"
        env = {
            **self.dynamo_env(),
            "DYN_SYSTEM_HOST": self.host,
            "DYN_SYSTEM_PORT": str(ports.system),
            "DYN_TCP_RPC_PORT": str(ports.rpc),
            # Without it the mocker's /health never says ready (Dynamo 1.4.2).
            "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS": '["generate"]',
            **dict(model.environment),
        }
        argv = [*module]
        bound = [ports.system, ports.rpc]
        if model.engine == "mocker":
            argv += ["--model-path", model.path, "--model-name", model.model]
        else:
            argv += ["--model", model.path, "--served-model-name", model.model]
        argv += ["--endpoint", endpoint, *self.discovery_args()]
        if role != "agg":
            argv += ["--disaggregation-mode", role]
        if model.engine == "vllm":
            argv += self._vllm_args(role, ports.kv_events, tp)
            if self.kv_routing and role != "decode":
                bound.append(ports.kv_events)
            if role != "agg":
                env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(ports.nixl)
                env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = self.host
                bound += list(range(ports.nixl, ports.nixl + tp))
        argv += to_flags(args)
        default_gpus = tp if model.engine == "vllm" else 0
        gpus = default_gpus if model.gpus is None else model.gpus
        ranks = self._rank_count(tp) if model.engine == "vllm" else 1
        if ranks > 1:
            # Multi-node TP: the placement room fills {rank}, {ranks}, {rank0_addr} per rank.
            argv += [
                "--nnodes", "{ranks}",
                "--node-rank", "{rank}",
                "--master-addr", "{rank0_addr}",
                "--master-port", str(ports.master),
            ]  # fmt: skip
            bound.append(ports.master)
        spec = ServiceSpec(
            name=name,
            description=f"{model.engine} worker of {model.model} ({role}, replica {replica})",
            command=tuple(argv),
            requires=(*self.infra(), *model.requires),
            autostart=model.autostart,
            environment=freeze_env(env),
            restart=RestartPolicy.ALWAYS,
            restart_delay=0.1,
            restart_delay_max=10.0,
            start_limit_burst=20,
            start_limit_interval=120.0,
            stop_timeout=model.stop_timeout or self._stop_timeout(model, env),
            ready=ReadySpec(
                kind=ProbeKind.HTTP,
                target=f"http://{self.host}:{ports.system}/health",
                timeout=600 if model.engine == "vllm" else 120,
                # A vLLM worker logs an error for each early /health answer: ask seldom.
                interval=1.0 if model.engine == "vllm" else 0.05,
            ),
            live=LiveSpec(
                kind=ProbeKind.HTTP,
                target=f"http://{self.host}:{ports.system}/live",
                **WORKER_LIVE[model.engine],
            ),
            gpus=gpus,
            unset_env=UNSET,
            ports=tuple(bound),
            secondary_args=("--headless",) if ranks > 1 else (),
            registry=self.registry(
                own=(f"{self.host}:{ports.rpc}",),
                serves=model.model,
                role=role,
                canary=model.canary,
            ),
            group=model.name,
            surge=model.surge,
            source=model.source,
        )
        return [spec]

    def _check_owned_args(self, model: ModelSpec) -> bool:
        tables = [("model.engine_args", model.engine_args)]
        for role, pool in (("prefill", model.prefill), ("decode", model.decode)):
            if pool is not None:
                tables.append((f"model.{role}.engine_args", pool.engine_args))
        ok = True
        for where, args in tables:
            for key, _ in args:
                if key.replace("-", "_") in OWNED_ARGS[model.engine]:
                    ok = False
                    self.problems.add(
                        model.source,
                        f"{where}.{key}",
                        f"{key} is set by dynsup from the [model] keys and the stack; remove it",
                    )
        return ok

    def _stop_timeout(self, model: ModelSpec, env: dict[str, str]) -> float:
        if model.engine == "vllm":
            return self.ctx.release.vllm_stop_timeout(env)
        return MOCKER_STOP

    def _rank_count(self, tp: int) -> int:
        per_node = self.ctx.gpus_per_node
        if not per_node or tp <= per_node:
            return 1
        return tp // per_node if tp % per_node == 0 else 1

    def _vllm_args(self, role: str, kv_port: int, tp: int) -> list[str]:
        argv = ["--tensor-parallel-size", str(tp)]
        if self.kv_routing and role != "decode":
            # The KV router consumes these events; each worker publishes on its own port.
            events: dict[str, Any] = {
                "publisher": "zmq",
                "topic": "kv-events",
                "endpoint": f"tcp://*:{kv_port}",
                "enable_kv_cache_events": True,
            }
        else:
            # Explicitly off, so no two workers fight over vLLM's default port 5557.
            events = {"enable_kv_cache_events": False}
        argv += ["--kv-events-config", json.dumps(events, separators=(",", ":"))]
        if role != "agg":
            nixl = {"kv_connector": "NixlConnector", "kv_role": self.ctx.release.kv_roles[role]}
            argv += ["--kv-transfer-config", json.dumps(nixl, separators=(",", ":"))]
        return argv
