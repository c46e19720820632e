"""The plan as ``dynsupd --check --json`` prints it, read back for tests.

``check`` runs the command's own steps (``parse_args``, ``resolve_settings``,
``check_units``: what ``main`` does for ``--check``) in process, so that a test
can fake the vLLM lookup on a machine without vLLM (``fake_vllm``).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import dynsup.dynamo.expand as expand_module
from dynsup.daemon import parse_args, resolve_settings
from dynsup.dynamo.binaries import python_module
from dynsup.plan import check_units
from dynsup.units import ProbeKind, ReadySpec, RestartPolicy
from dynsup.units.spec import LiveSpec

UNITS = Path(__file__).resolve().parents[1] / "units"
# Holds a state file only while a load with `scale` overrides reads it.
STATE = str(Path(tempfile.gettempdir()) / "dynsup-golden-state")
PY = sys.executable
VLLM_MODULES = ("vllm", "dynamo.vllm")


def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pretend vLLM is installed: ``python_module`` answers for it without a lookup.

    Every other module is located for real. Returns the modules asked for.
    """
    asked: list[str] = []

    def locate(module: str) -> list[str]:
        asked.append(module)
        if module in VLLM_MODULES:
            return [PY, "-m", module]
        return python_module(module)

    monkeypatch.setattr(expand_module, "python_module", locate)
    return asked


@dataclass(frozen=True)
class Process:
    """One process of the plan, read back from the JSON (rank 0 of its unit)."""

    name: str
    command: tuple[str, ...]
    env: dict[str, str]
    unset_env: tuple[str, ...]
    ports: tuple[int, ...]
    gpus: int
    requires: tuple[str, ...]
    ready: ReadySpec | None
    live: LiveSpec | None
    restart: RestartPolicy
    stop_timeout: float
    source: str = field(compare=False)  # as for a ServiceSpec: not the unit's identity
    ranks: tuple[Process, ...] = field(compare=False)  # every rank of the unit, rank 0 first

    @classmethod
    def read(cls, entry: dict[str, Any], ranks: tuple[Process, ...] = ()) -> Process:
        ready = entry["ready"]
        if ready is not None:
            ready = ReadySpec(
                kind=ProbeKind(ready["kind"]),
                target=ready["target"],
                argv=tuple(ready.get("argv", ())),
                models=tuple(ready.get("models", ())),
                timeout=ready["timeout"],
                interval=ready["interval"],
            )
        live = entry["live"]
        if live is not None:
            live = LiveSpec(
                kind=ProbeKind(live["kind"]),
                target=live["target"],
                argv=tuple(live.get("argv", ())),
                models=tuple(live.get("models", ())),
                timeout=live["timeout"],
                interval=live["interval"],
                failures=live["failures"],
                grace=live["grace"],
            )
        return cls(
            name=entry["name"],
            command=tuple(entry["argv"]),
            env=entry["env"],
            unset_env=tuple(entry["unset"]),
            ports=tuple(entry["ports"]),
            gpus=entry["gpus"] * entry["ranks"],  # the unit's, over all its ranks
            requires=tuple(entry["requires"]),
            ready=ready,
            live=live,
            restart=RestartPolicy(entry["restart"]),
            stop_timeout=entry["stop_timeout"],
            source=entry["source"],
            ranks=ranks,
        )


def check(*dirs: Path, gpus_per_node: int | None = 8) -> tuple[int, str, str]:
    """``dynsupd --check --json --config C --state-dir S DIR...``: (exit, stdout, stderr).

    The same steps as the command line (``main`` starts with them), in process
    so that the vLLM lookup can be faked.
    """
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "dynsupd.toml"
        ray = {} if gpus_per_node is None else {"ray": {"gpus_per_node": gpus_per_node}}
        config.write_text(tomli_w.dumps(ray))
        argv = ["--check", "--json", "--config", str(config), "--state-dir", STATE]
        args = parse_args([*argv, *map(str, dirs)])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = check_units(resolve_settings(args), as_json=args.json)
    return code, out.getvalue(), err.getvalue()


def load(
    *dirs: Path, replicas: dict[str, int] | None = None, gpus_per_node: int | None = 8
) -> dict[str, Process]:
    """Each unit's rank-0 process in the plan; ``replicas``: `dynsupctl scale` overrides,
    read by --check from the state file as the daemon reads them."""
    state = Path(STATE) / "state.toml"
    try:
        if replicas:
            state.parent.mkdir(exist_ok=True)
            state.write_text(tomli_w.dumps({"replicas": replicas}))
        code, out, err = check(*dirs, gpus_per_node=gpus_per_node)
    finally:
        state.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            state.parent.rmdir()
    assert code == 0, err
    entries = json.loads(out)["processes"]
    units: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        units.setdefault(entry["unit"], []).append(entry)
    found = {}
    for unit, ranks in units.items():
        assert [r["rank"] for r in ranks] == list(range(len(ranks)))
        found[unit] = Process.read(ranks[0], tuple(Process.read(r) for r in ranks))
    return found


def load_errors(*dirs: Path, **kwargs: Any) -> list[str]:
    code, out, err = check(*dirs, **kwargs)
    assert code == 2, out
    assert out == ""
    header, *errors = err.splitlines()
    assert header == "dynsupd: invalid units:"
    return errors
