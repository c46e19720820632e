"""`dynsupd --check`: the plan of a unit directory, printed without running anything.

The command line itself, in a child process: what it prints for the demo,
that it starts, binds, imports (Ray) and writes nothing, and exit 2 with the
loader's errors for an invalid directory. The plan's content for every
example is pinned by test_dynamo_golden.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

pytestmark = pytest.mark.dynamo

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "units"
# Runs dynsupd's main as the console script does, then says whether Ray was imported.
RUN = (
    "import sys; from dynsup.daemon import main; code = main(sys.argv[1:]); "
    "print('ray imported' if 'ray' in sys.modules else 'no ray', file=sys.stderr); "
    "sys.exit(code)"
)


def dynsupd(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "dynsupd.toml"
    config.write_text("")  # never /etc/dynsup/dynsupd.toml of the machine running the test
    return subprocess.run(
        [sys.executable, "-c", RUN, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DYNSUP_SOCKET": str(tmp_path / "run" / "dynsup.sock")},
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_check_prints_the_demo_plan_and_starts_binds_and_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # What a daemon left: a scale override and the model's port block, which
    # the plan must use as the daemon would, and leave as they are.
    (state / "state.toml").write_text(
        tomli_w.dumps({"replicas": {"tiny": 3}, "port_blocks": {"tiny": 29400}})
    )
    before = snapshot(state)
    done = dynsupd(
        "--check", "--json", "--state-dir", str(state), str(ROOT / "units" / "demo"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "no ray"
    assert snapshot(state) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynsupd.toml", "state"]  # no socket
    processes = {p["name"]: p for p in json.loads(done.stdout)["processes"]}
    assert sorted(processes) == ["frontend", "tiny-0", "tiny-1", "tiny-2"]
    worker = processes["tiny-2"]
    assert worker["argv"][:3] == [sys.executable, "-m", "dynamo.mocker"]
    assert worker["env"]["DYN_SYSTEM_PORT"] == str(29400 + 2 * 5)  # the remembered block
    assert worker["env"]["DYN_FILE_KV"] == str(state / "dynamo-discovery" / "demo")
    assert worker["unset"] == ["DYN_*", "ETCD_*", "NATS_*"]
    assert worker["ports"] == [29410, 29413]  # /health, the request plane
    assert worker["gpus"] == 0
    assert worker["ready"]["target"] == "http://127.0.0.1:29410/health"
    assert (worker["rank"], worker["ranks"]) == (0, 1)
    frontend = processes["frontend"]
    assert frontend["ports"] == [8000]
    assert frontend["ready"]["kind"] == "models"


def test_check_as_text_names_every_process(tmp_path: Path) -> None:
    done = dynsupd(
        "--check", "--state-dir", str(tmp_path / "state"), str(ROOT / "units" / "demo"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    titles = [line.split()[0] for line in done.stdout.splitlines() if line and line[0] != " "]
    assert titles == ["frontend", "tiny-0", "tiny-1"]
    assert "  argv: " in done.stdout
    assert not (tmp_path / "state").exists()


def test_check_of_invalid_units_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    bad = FIXTURES / "bad" / "unknown_key"
    done = dynsupd("--check", "--state-dir", str(tmp_path / "state"), str(bad), tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    header, *errors = done.stderr.splitlines()[:-1]  # the last line is the Ray note
    assert header == "dynsupd: invalid units:"
    assert errors and all(str(bad) in line for line in errors)
    assert not (tmp_path / "state").exists()


def test_check_leaves_a_corrupt_state_file_where_it_is(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.toml").write_text("[replicas\n")  # the daemon would move it aside
    done = dynsupd(
        "--check", "--state-dir", str(state), str(ROOT / "units" / "demo"), tmp_path=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert [p.name for p in state.iterdir()] == ["state.toml"]
