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


def test_check_shows_each_units_live_probe_as_it_shows_ready(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "web.toml").write_text(
        "[service]\n"
        'command = ["sleep", "600"]\n'
        "[ready]\n"
        'tcp = "127.0.0.1:8080"\n'
        "[live]\n"
        'http = "http://127.0.0.1:8080/live"\n'
        "interval = 3\n"
        'timeout = "500ms"\n'
        "failures = 4\n"
        "grace = 10\n"
    )
    (units / "plain.toml").write_text('[service]\ncommand = ["sleep", "600"]\n')
    state = ["--state-dir", str(tmp_path / "state")]
    text = dynsupd("--check", *state, str(units), tmp_path=tmp_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("  live: ") == 1
    assert (
        "  live: http http://127.0.0.1:8080/live every 3 s, timeout 0.5 s,"
        " 4 failures in a row, grace 10 s\n" in text.stdout
    )
    done = dynsupd("--check", "--json", *state, str(units), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    processes = {p["name"]: p for p in json.loads(done.stdout)["processes"]}
    assert processes["web"]["live"] == {
        "kind": "http",
        "target": "http://127.0.0.1:8080/live",
        "timeout": 0.5,
        "interval": 3.0,
        "failures": 4,
        "grace": 10.0,
    }
    assert processes["plain"]["live"] is None
    # The demo's worker: its system port's /live, the mocker's defaults.
    demo = dynsupd("--check", "--json", *state, str(ROOT / "units" / "demo"), tmp_path=tmp_path)
    worker = {p["name"]: p for p in json.loads(demo.stdout)["processes"]}["tiny-0"]
    port = worker["env"]["DYN_SYSTEM_PORT"]
    assert worker["live"]["target"] == f"http://127.0.0.1:{port}/live"
    assert (worker["live"]["interval"], worker["live"]["failures"]) == (1.0, 3)


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


def demo_with(tmp_path: Path, stack_lines: str, port: int = 8000) -> Path:
    """A copy of units/demo with its frontend on port and stack_lines added to [dynamo]."""
    units = tmp_path / "units"
    units.mkdir()
    stack = (ROOT / "units" / "demo" / "stack.toml").read_text()
    stack = stack.replace("frontend_port = 8000", f"frontend_port = {port}")
    (units / "stack.toml").write_text(stack.replace("[dynamo]\n", f"[dynamo]\n{stack_lines}\n"))
    tiny = (ROOT / "units" / "demo" / "tiny.toml").read_text()
    (units / "tiny.toml").write_text(
        tiny.replace('"model"', f'"{ROOT / "units" / "demo" / "model"}"')
    )
    return units


def test_check_plans_two_frontends_on_consecutive_ports(tmp_path: Path) -> None:
    units = demo_with(tmp_path, "frontend_replicas = 2")
    done = dynsupd(
        "--check", "--json", "--state-dir", str(tmp_path / "state"), str(units), tmp_path=tmp_path
    )
    assert done.returncode == 0, done.stderr
    processes = {p["name"]: p for p in json.loads(done.stdout)["processes"]}
    assert sorted(processes) == ["frontend", "frontend-1", "tiny-0", "tiny-1"]
    first, second = processes["frontend"], processes["frontend-1"]
    assert (first["ports"], second["ports"]) == ([8000], [8001])
    assert first["argv"][first["argv"].index("--http-port") + 1] == "8000"
    assert second["argv"][second["argv"].index("--http-port") + 1] == "8001"
    # The same frontend otherwise: one namespace, one discovery, one router mode.
    differ = [
        i for i, (a, b) in enumerate(zip(first["argv"], second["argv"], strict=True)) if a != b
    ]
    assert [first["argv"][i] for i in differ] == ["8000"]
    assert first["env"] == second["env"]
    # Each is ready on its own port once it lists the model; nothing requires the other.
    assert second["ready"]["target"] == "http://127.0.0.1:8001/v1/models"
    assert second["ready"]["models"] == ["tiny"]
    assert second["requires"] == first["requires"] == []
    # The workers do not wait for any frontend: they register, frontends discover.
    assert processes["tiny-0"]["requires"] == []


def test_check_as_text_shows_each_frontends_port(tmp_path: Path) -> None:
    units = demo_with(tmp_path, "frontend_replicas = 2", port=9100)
    done = dynsupd("--check", "--state-dir", str(tmp_path / "state"), str(units), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    blocks = done.stdout.split("\n\n")
    second = next(block for block in blocks if block.startswith("frontend-1"))
    assert "\n  ports: 9101\n" in second
    assert "\n  ready: models http://127.0.0.1:9101/v1/models\n" in second
    assert "--http-port 9101 " in second


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("frontend_replicas = 0", "at least 1"),
        ('frontend_replicas = "2"', "integer"),
        ("frontend_replicas = 2", "above 65535"),
    ],
    ids=["zero", "string", "past-the-last-port"],
)
def test_check_refuses_a_bad_frontend_replicas_naming_file_and_key(
    tmp_path: Path, lines: str, message: str
) -> None:
    units = demo_with(tmp_path, lines, port=65535)
    done = dynsupd("--check", "--state-dir", str(tmp_path / "state"), str(units), tmp_path=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = done.stderr.splitlines()[1:-1]
    assert len(errors) == 1, done.stderr
    assert str(units / "stack.toml") in errors[0]
    assert "dynamo.frontend_replicas" in errors[0] and message in errors[0], errors[0]
