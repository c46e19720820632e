"""``units/demo``, the embedded default, as dynsupd loads it.

Nothing is faked: ``python_module`` really looks up ``dynamo.frontend`` and
``dynamo.mocker`` (the ``[dynamo]`` extra), and the demo needs neither
etcd (file discovery) nor NATS (TCP requests, ZMQ events) nor vLLM.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from dynsup.dynamo import StackContext, expand_stack
from dynsup.units import ProbeKind, ReadySpec, RestartPolicy, ServiceSpec, load_units
from dynsup.units.spec import LiveSpec

pytestmark = pytest.mark.dynamo

DEMO = Path(__file__).resolve().parents[1] / "units" / "demo"
STATE = "/var/lib/dynsup"
PY = sys.executable
VLLM_FLAGS = (
    "--model",
    "--served-model-name",
    "--tensor-parallel-size",
    "--kv-events-config",
    "--kv-transfer-config",
    "--disaggregation-mode",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--headless",
)


@pytest.fixture(scope="module")
def specs() -> dict[str, ServiceSpec]:
    """Loaded as ``daemon.load_specs`` does, for a machine without GPUs."""
    ctx = StackContext(state_dir=STATE, gpus_per_node=None)
    return load_units(
        [DEMO],
        context={"state_dir": STATE},
        expand=lambda services, others: expand_stack(services, others, ctx),
    )


def value_of(argv: tuple[str, ...], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} occurs {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def test_units(specs: dict[str, ServiceSpec]) -> None:
    # File discovery and the default planes: no etcd, no NATS.
    assert sorted(specs) == ["frontend", "tiny-0", "tiny-1"]


def test_the_model_directory_is_in_the_repository() -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (DEMO / "model" / name).is_file()


@pytest.mark.parametrize("name", ["tiny-0", "tiny-1"])
def test_worker_argv(specs: dict[str, ServiceSpec], name: str) -> None:
    # The component's tag digests the model's absolute path: not pinned here.
    endpoint = value_of(specs[name].command, "--endpoint")
    assert re.fullmatch(r"dyn://demo\.tiny_[0-9a-f]{6}\.generate", endpoint), endpoint
    assert specs[name].command == (
        PY, "-m", "dynamo.mocker",
        "--model-path", str(DEMO / "model"),
        "--model-name", "tiny",
        "--endpoint", endpoint,
        "--discovery-backend", "file",
        "--speedup-ratio", "0",
    )  # fmt: skip


@pytest.mark.parametrize("name", ["tiny-0", "tiny-1"])
def test_worker_has_no_vllm_flags(specs: dict[str, ServiceSpec], name: str) -> None:
    command = specs[name].command
    for flag in VLLM_FLAGS:
        assert flag not in command, flag
    assert specs[name].secondary_args == ()


@pytest.mark.parametrize("name", ["tiny-0", "tiny-1"])
def test_worker_env(specs: dict[str, ServiceSpec], name: str) -> None:
    env = specs[name].env
    port = int(env.pop("DYN_SYSTEM_PORT"))
    assert 1024 < port < 32768
    # The request plane's port is fixed: a hung worker's records are found by it.
    assert int(env.pop("DYN_TCP_RPC_PORT")) == port + 3
    assert env == {
        "DYN_EVENT_PLANE": "zmq",
        "DYN_FILE_KV": f"{STATE}/dynamo-discovery/demo",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_SYSTEM_HOST": "127.0.0.1",
        # Without it the mocker's /health never says ready.
        "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS": '["generate"]',
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "HOME": f"{STATE}/home",
        "DYN_SDK_DISABLE_ANSI_LOGGING": "1",
        "PYTHONHASHSEED": "0",  # KV router
        "TRANSFORMERS_OFFLINE": "1",
    }
    assert specs[name].unset_env == ("DYN_*", "ETCD_*", "NATS_*")


@pytest.mark.parametrize("name", ["tiny-0", "tiny-1"])
def test_worker_unit(specs: dict[str, ServiceSpec], name: str) -> None:
    spec = specs[name]
    port = int(spec.env["DYN_SYSTEM_PORT"])
    assert spec.ready == ReadySpec(
        kind=ProbeKind.HTTP, target=f"http://127.0.0.1:{port}/health", timeout=120, interval=0.05
    )
    # The mocker binds no KV-event or NIXL port; the request plane's is fixed.
    assert spec.ports == (port, port + 3)
    assert spec.registry is not None and spec.registry.own == (f"127.0.0.1:{port + 3}",)
    assert spec.live == LiveSpec(
        kind=ProbeKind.HTTP,
        target=f"http://127.0.0.1:{port}/live",
        interval=1.0,
        timeout=2.0,
        failures=3,
    )
    assert spec.gpus == 0
    assert spec.requires == ()  # nothing to wait for with file discovery
    assert spec.restart is RestartPolicy.ALWAYS
    assert spec.stop_timeout == 10.0
    assert spec.description == f"mocker worker of tiny (agg, replica {name[-1]})"
    assert spec.source == str(DEMO / "tiny.toml")


def test_workers_have_distinct_system_ports(specs: dict[str, ServiceSpec]) -> None:
    ports = [spec.env["DYN_SYSTEM_PORT"] for name, spec in specs.items() if name != "frontend"]
    assert len(set(ports)) == 2


def test_every_port_assigned_once(specs: dict[str, ServiceSpec]) -> None:
    ports = [port for spec in specs.values() for port in spec.ports]
    assert len(ports) == len(set(ports)) == 5


def test_frontend(specs: dict[str, ServiceSpec]) -> None:
    frontend = specs["frontend"]
    assert frontend.command == (
        PY, "-m", "dynamo.frontend",
        "--http-host", "127.0.0.1",
        "--http-port", "8000",
        "--namespace", "demo",
        "--router-mode", "kv",
        "--discovery-backend", "file",
        "--migration-limit", "3",  # on by default
    )  # fmt: skip
    assert frontend.env == {
        "DYN_EVENT_PLANE": "zmq",
        "DYN_FILE_KV": f"{STATE}/dynamo-discovery/demo",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "HOME": f"{STATE}/home",
        "DYN_SDK_DISABLE_ANSI_LOGGING": "1",
        "PYTHONHASHSEED": "0",
        "TRANSFORMERS_OFFLINE": "1",
    }
    assert frontend.ready == ReadySpec(
        kind=ProbeKind.MODELS,
        target="http://127.0.0.1:8000/v1/models",
        models=("tiny",),
        timeout=300,
        interval=0.05,
    )
    assert frontend.requires == ()
    assert frontend.ports == (8000,)
    assert frontend.gpus == 0


def endpoints_with(tmp_path: Path, tiny: str, replicas: int | None = None) -> set[str]:
    """The workers' endpoints of the demo directory with tiny.toml's text replaced."""
    units = tmp_path / "units"
    shutil.copytree(DEMO, units, ignore=shutil.ignore_patterns("model"))
    (units / "tiny.toml").write_text(tiny.replace('path = "model"', f'path = "{DEMO / "model"}"'))
    ctx = StackContext(state_dir=STATE, replicas={"tiny": replicas} if replicas else {})
    specs = load_units(
        [units],
        context={"state_dir": STATE},
        expand=lambda services, others: expand_stack(services, others, ctx),
    )
    return {value_of(s.command, "--endpoint") for n, s in specs.items() if n.startswith("tiny-")}


def test_a_changed_pool_registers_under_a_component_of_its_own(tmp_path: Path) -> None:
    """Dynamo's frontend rejects a model card that differs from its WorkerSet's
    while one old worker lives; a changed pool must be a set of its own."""
    text = (DEMO / "tiny.toml").read_text()
    [before] = endpoints_with(tmp_path / "a", text)
    [changed] = endpoints_with(
        tmp_path / "b", text.replace("speedup_ratio = 0", "speedup_ratio = 0, block_size = 32")
    )
    [scaled] = endpoints_with(tmp_path / "c", text, replicas=3)
    assert changed != before
    assert scaled == before  # where a replica runs (its ports, its count) is not what it is
