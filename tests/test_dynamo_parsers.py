"""Every argv the plan of an example directory holds, parsed by the installed
Dynamo's own argument parsers: an unknown or malformed flag fails here, not
on a GPU box.

The frontend's argument group and the mocker's ``parse_args`` are used as
Dynamo's ``main`` uses them. ``dynamo.vllm``'s parser imports vLLM: where vLLM
is not installed those cases are skipped (and reported as skipped, never
as passed).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from .check_helpers import UNITS, Process, fake_vllm, load

pytestmark = pytest.mark.dynamo

EXAMPLES = sorted(p.name for p in UNITS.iterdir() if p.is_dir())
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def processes() -> list[tuple[str, Process]]:
    """(example/process, process) for every rank of every unit of every example."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_vllm(monkeypatch)
        found = []
        for example in EXAMPLES:
            for unit in load(UNITS / example).values():
                found += [(f"{example}/{rank.name}", rank) for rank in unit.ranks]
    return found


def module_of(process: Process) -> str | None:
    argv = process.command
    return argv[2] if len(argv) > 2 and argv[1] == "-m" else None


PROCESSES = processes()
DYNAMO = [(i, p) for i, p in PROCESSES if (module_of(p) or "").startswith("dynamo.")]


def parse_frontend(args: list[str]) -> None:
    from dynamo.frontend.frontend_args import FrontendArgGroup, FrontendConfig

    parser = argparse.ArgumentParser(prog="dynamo.frontend", exit_on_error=False)
    FrontendArgGroup().add_arguments(parser)
    FrontendConfig.from_cli_args(parser.parse_args(args)).validate()


def parse_mocker(args: list[str]) -> None:
    from dynamo.mocker.args import parse_args

    parse_args(args)


def parse_vllm(args: list[str]) -> None:
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed: dynamo.vllm's parser imports it (pytest -m vllm)")
    from dynamo.vllm.args import parse_args

    parse_args(args)


PARSERS = {"dynamo.frontend": parse_frontend, "dynamo.mocker": parse_mocker}
PARSERS["dynamo.vllm"] = parse_vllm


def test_every_example_has_dynamo_processes() -> None:
    modules = {module_of(p) for _, p in DYNAMO}
    assert modules == set(PARSERS)
    assert {i.split("/")[0] for i, _ in DYNAMO} == set(EXAMPLES)


@pytest.mark.parametrize(("where", "process"), DYNAMO, ids=[i for i, _ in DYNAMO])
def test_argv_parses_with_dynamos_own_parser(
    where: str, process: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parsers read defaults from DYN_* variables: the process's own environment.
    for key, value in process.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    try:
        PARSERS[module_of(process)](list(process.command[3:]))
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"{where}: Dynamo's parser refused {process.command[3:]}: exit {exc.code}")
