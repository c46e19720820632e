"""`dynsupd --check`: what a unit directory would run, computed without running it.

The plan is made by the very steps the daemon takes, so that it cannot say
something else than what is spawned: the loader and the Dynamo expansion
(`daemon.load_specs`), the engine's `spawn_request` for each unit, and, for
a unit whose GPUs span nodes, the gang's `rank_request` for each rank (the
layout comes from the placer's `plan_layout`). What only placement decides
stays a visible placeholder: a bundle's GPU ids (``{gpus:<k>}``) and rank 0's
node address (``{rank0_addr}``).

Nothing is started or bound: no socket, no Ray, no write to the state dir.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

from .agent_api import Agent, SpawnRequest
from .engine.engine import spawn_request
from .engine.placement import Placement
from .placement.gang import GangAgent, Rank
from .placement.groups import BundleGpus
from .placement.layout import LayoutError, plan_layout
from .placement.placer import bundle_env
from .statefile import DesiredState
from .units import UnitErrors
from .units.spec import ReadySpec, ServiceSpec

if TYPE_CHECKING:
    from .daemon import Settings

RANK0_ADDR = "{rank0_addr}"
# The plan never calls an agent: spawn_request reads the placement's env only.
_NO_AGENT = cast(Agent, None)


@dataclass(frozen=True)
class PlannedProcess:
    """One process the daemon would start: a unit, or one rank of a unit."""

    unit: str
    name: str  # the process's name: the unit, or <unit>-r<k> for rank k > 0
    rank: int
    ranks: int
    argv: tuple[str, ...]
    # Set over the daemon's own environment, after dropping the `unset` names.
    env: dict[str, str]
    unset: tuple[str, ...]
    working_directory: str | None
    ports: tuple[int, ...]
    gpus: int  # asked for this process (its bundle's share)
    requires: tuple[str, ...]
    ready: dict[str, Any] | None
    live: dict[str, Any] | None  # the liveness probe: kind, target, interval, timeout, ...
    autostart: bool
    restart: str
    stop_signal: str
    stop_timeout: float
    source: str


def unit_ranks(spec: ServiceSpec, gpus_per_node: int | None) -> int:
    """How many ranks the placer would run the unit as, on nodes of gpus_per_node."""
    if spec.gpus < 1 or not gpus_per_node:
        return 1
    nodes = [(f"node-{i}", gpus_per_node) for i in range(spec.gpus)]
    try:
        return plan_layout(spec.gpus, nodes).bundle_count
    except LayoutError:
        return 1  # the daemon refuses it at placement, with the placer's message


def _placeholder_bundle(k: int) -> BundleGpus:
    return BundleGpus(k, node_id=f"node-{k}", node_ip=RANK0_ADDR, gpu_ids=(f"{{gpus:{k}}}",))


def _requests(spec: ServiceSpec, ranks: int) -> list[tuple[int, SpawnRequest]]:
    if spec.gpus < 1:
        return [(0, spawn_request(spec, Placement(agent=_NO_AGENT)))]
    if ranks == 1:
        placement = Placement(agent=_NO_AGENT, env=bundle_env(_placeholder_bundle(0)))
        return [(0, spawn_request(spec, placement))]
    bundles = [_placeholder_bundle(k) for k in range(ranks)]
    gang = GangAgent(spec.name, [Rank(_NO_AGENT, bundle_env(b), b.node_ip) for b in bundles])
    # As the placer builds it: each rank's bundle env is the gang's to add.
    request = spawn_request(spec, Placement(agent=gang))
    return [(k, gang.rank_request(request, k)) for k in range(ranks)]


def _probe(probe: ReadySpec | None) -> dict[str, Any] | None:
    """A readiness or liveness probe as plain fields (empty ones left out)."""
    if probe is None:
        return None
    fields = asdict(probe)
    fields["kind"] = probe.kind.value
    return {key: value for key, value in fields.items() if value not in ((), None)}


def build_plan(specs: Mapping[str, ServiceSpec], gpus_per_node: int | None) -> list[PlannedProcess]:
    """Every process of every unit, in unit-name order, rank 0 first."""
    plan = []
    for name in sorted(specs):
        spec = specs[name]
        ranks = unit_ranks(spec, gpus_per_node)
        for rank, request in _requests(spec, ranks):
            plan.append(
                PlannedProcess(
                    unit=name,
                    name=request.name,
                    rank=rank,
                    ranks=ranks,
                    argv=request.argv,
                    env=dict(sorted(request.env.items())),
                    unset=request.unset_env,
                    working_directory=request.cwd,
                    ports=request.ports,
                    gpus=spec.gpus // ranks,
                    requires=spec.requires,
                    ready=_probe(spec.ready),
                    live=_probe(spec.live),
                    autostart=spec.autostart,
                    restart=spec.restart.value,
                    stop_signal=request.stop_signal,
                    stop_timeout=request.stop_timeout,
                    source=spec.source,
                )
            )
    return plan


def render_json(plan: list[PlannedProcess]) -> str:
    return json.dumps({"processes": [asdict(p) for p in plan]}, indent=2)


def render_text(plan: list[PlannedProcess]) -> str:
    """A human reading: one block per process."""
    blocks = []
    for p in plan:
        title = p.name if p.ranks == 1 else f"{p.name} (rank {p.rank} of {p.ranks})"
        lines = [f"{title}  [{p.source}]", f"  argv: {_quoted(p.argv)}"]
        for key, value in p.env.items():
            lines.append(f"  env: {key}={value}")
        if p.unset:
            lines.append(f"  unset: {' '.join(p.unset)}")
        if p.working_directory:
            lines.append(f"  cwd: {p.working_directory}")
        if p.ports:
            lines.append(f"  ports: {' '.join(map(str, p.ports))}")
        if p.gpus:
            lines.append(f"  gpus: {p.gpus}")
        if p.requires:
            lines.append(f"  requires: {' '.join(p.requires)}")
        if p.ready:
            lines.append(f"  ready: {p.ready['kind']} {p.ready['target']}")
        if p.live:
            live = p.live
            lines.append(
                f"  live: {live['kind']} {live['target']} every {live['interval']:g} s,"
                f" timeout {live['timeout']:g} s, {live['failures']} failures in a row,"
                f" grace {live['grace']:g} s"
            )
        lines.append(
            f"  restart: {p.restart}; stop: {p.stop_signal}, then SIGKILL after "
            f"{p.stop_timeout:g} s" + ("" if p.autostart else "; not autostarted")
        )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" if blocks else "no units\n"


def _quoted(argv: tuple[str, ...]) -> str:
    return shlex.join(argv)


def check_units(settings: Settings, *, as_json: bool) -> int:
    """`dynsupd --check`: validate and expand as the daemon would, print the plan.

    0 when valid; 2 with the loader's errors (file and key) when not.
    """
    # The daemon's own steps; it imports this module, hence here.
    from .daemon import EXIT_BAD_CONFIG, EXIT_OK, gpus_per_node, load_specs

    # What the daemon would read from its state: `scale` overrides and the
    # models' port blocks (read only; nothing is written back).
    remembered = DesiredState.load(settings.state_dir, read_only=True)
    try:
        specs = load_specs(
            settings,
            remembered.replicas,
            None,
            dict(remembered.port_blocks),
            remembered.slots,
        )
    except UnitErrors as exc:
        print(f"dynsupd: invalid units:\n{exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    plan = build_plan(specs, gpus_per_node(settings.config.ray))
    sys.stdout.write(render_json(plan) + "\n" if as_json else render_text(plan))
    return EXIT_OK
