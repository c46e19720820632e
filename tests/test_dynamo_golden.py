"""Golden argv/env of the vLLM example stacks under ``units/``: what would be spawned.

Each example directory goes through ``dynsupd --check --json`` (the daemon's
own parsing, settings and plan code, in process), for nodes of 8 GPUs, and
the tests read the plan it prints: per process (every replica and rank) the
argv and environment the agent is asked for. vLLM is not installed here, so
``python_module`` (which checks that a module is importable) is replaced for
``vllm`` and ``dynamo.vllm`` only; the frontend and etcd are located for
real (the ``[dynamo]`` extra).

The first part pins every command line and environment exactly; the
second checks each flag on its own, for every worker of every pattern,
so that a failure names the flag; the last part checks the stack as a
whole (ports, replicas, overrides, errors).
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

import dynsup.dynamo.expand as expand_module
from dynsup.dynamo.binaries import etcd_binary, python_module
from dynsup.dynamo.releases import installed_release
from dynsup.units import ProbeKind, ReadySpec, RestartPolicy
from dynsup.units.spec import LiveSpec

from .check_helpers import PY, STATE, UNITS, Process, fake_vllm, load, load_errors

pytestmark = pytest.mark.dynamo

QWEN = "Qwen/Qwen3-0.6B"
QWEN_SLUG = "qwen_qwen3_0_6b"
DEEPSEEK = "deepseek-ai/DeepSeek-R1"
RELEASE = installed_release()
NIXL_ROLE = {"agg": None, **RELEASE.kv_roles}
EVENTS_OFF = '{"enable_kv_cache_events":false}'
UNSET = ("DYN_*", "ETCD_*", "NATS_*")


def nixl(role: str) -> str:
    return f'{{"kv_connector":"NixlConnector","kv_role":"{NIXL_ROLE[role]}"}}'


# --- the plan, as dynsupd --check --json prints it (see check_helpers) -------------


@pytest.fixture(autouse=True)
def vllm_installed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return fake_vllm(monkeypatch)


def copy_example(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(UNITS / name, target)
    return target


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


# --- the patterns ---------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """What one worker of an example must look like."""

    pattern: str  # the directory under units/
    name: str  # the unit
    role: str  # "agg" | "prefill" | "decode"
    model: str  # served name = hub id
    tp: int
    publishes: bool  # KV events to a KV router
    engine_flags: tuple[str, ...]  # engine_args as flags, in order
    nnodes: bool = False  # multi-node TP ranks

    @property
    def namespace(self) -> str:
        return self.pattern

    @property
    def component(self) -> str:
        slug = {QWEN: QWEN_SLUG, DEEPSEEK: "deepseek_ai_deepseek_r1"}[self.model]
        return f"{slug}_prefill" if self.role == "prefill" else slug

    @property
    def id(self) -> str:
        return f"{self.pattern}/{self.name}"


QWEN_AGG_ARGS = (
    "--enforce-eager",
    "--gpu-memory-utilization", "0.85",
    "--max-model-len", "8192",
)  # fmt: skip
QWEN_ROUTER_ARGS = ("--block-size", "16", *QWEN_AGG_ARGS)
DECODE_ARGS = (
    "--block-size", "16",
    "--enforce-eager",
    "--gpu-memory-utilization", "0.9",  # the decode pool's, over the model's 0.85
    "--max-model-len", "8192",
    "--max-num-seqs", "256",
)  # fmt: skip

WORKERS = (
    Worker("agg", "qwen-0", "agg", QWEN, 1, False, QWEN_AGG_ARGS),
    Worker("agg-router", "qwen-0", "agg", QWEN, 1, True, QWEN_ROUTER_ARGS),
    Worker("agg-router", "qwen-1", "agg", QWEN, 1, True, QWEN_ROUTER_ARGS),
    Worker("disagg", "qwen-prefill-0", "prefill", QWEN, 1, False, QWEN_AGG_ARGS),
    Worker("disagg", "qwen-decode-0", "decode", QWEN, 1, False, QWEN_AGG_ARGS),
    *(
        Worker(
            "disagg-router",
            f"qwen-prefill-{i}",
            "prefill",
            QWEN,
            1,
            True,
            (*QWEN_ROUTER_ARGS, "--max-num-batched-tokens", "16384", "--max-num-seqs", "16"),
        )
        for i in range(2)
    ),
    Worker("disagg-router", "qwen-decode-0", "decode", QWEN, 1, False, DECODE_ARGS),
    Worker(
        "multinode-tp",
        "deepseek-0",
        "agg",
        DEEPSEEK,
        16,
        False,
        ("--gpu-memory-utilization", "0.9", "--max-model-len", "32768"),
        nnodes=True,
    ),
)
PATTERNS = {
    # directory (= namespace): (router mode, migration limit)
    # (3 is dynsup's default: a broken stream goes on on another replica)
    "agg": ("round-robin", 3),
    "agg-router": ("kv", 3),
    "disagg": ("round-robin", 3),
    "disagg-router": ("kv", 3),
    "multinode-tp": ("round-robin", 3),
}


def workers_of(pattern: str) -> list[Worker]:
    return [w for w in WORKERS if w.pattern == pattern]


_CACHE: dict[str, dict[str, Process]] = {}


@pytest.fixture
def stack() -> Callable[[str], dict[str, Process]]:
    """The specs of an example directory (loaded once per session, under the fake)."""

    def get(pattern: str) -> dict[str, Process]:
        if pattern not in _CACHE:
            _CACHE[pattern] = load(UNITS / pattern)
        return _CACHE[pattern]

    return get


@pytest.fixture(params=WORKERS, ids=lambda w: w.id)
def worker(request: pytest.FixtureRequest, stack: Any) -> Iterator[tuple[Worker, Process]]:
    expected: Worker = request.param
    yield expected, stack(expected.pattern)[expected.name]


def value_of(argv: tuple[str, ...], flag: str) -> str:
    """The value after ``flag``, which must occur exactly once."""
    assert argv.count(flag) == 1, f"{flag} occurs {argv.count(flag)} times in {argv}"
    index = argv.index(flag)
    assert index + 1 < len(argv), f"{flag} has no value"
    return argv[index + 1]


def port(spec: Process) -> int:
    return int(spec.env["DYN_SYSTEM_PORT"])


# --- golden: every command line and environment exactly ---------------------------


def etcd_golden() -> Process:
    command = (
        etcd_binary(),
        "--name", "dynsup",
        "--data-dir", f"{STATE}/etcd",
        "--listen-client-urls", "http://127.0.0.1:2379",
        "--advertise-client-urls", "http://127.0.0.1:2379",
        "--listen-peer-urls", "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
        "--initial-cluster", "dynsup=http://127.0.0.1:2380",
        "--heartbeat-interval", "10",
        "--election-timeout", "100",
    )  # fmt: skip
    return Process(
        name="etcd",
        command=command,
        env={},
        unset_env=UNSET,
        ports=(2379, 2380),
        gpus=0,
        requires=(),
        ready=ReadySpec(kind=ProbeKind.HTTP, target="http://127.0.0.1:2379/health", timeout=30),
        live=None,
        restart=RestartPolicy.ALWAYS,
        stop_timeout=10.0,
        source="{units}/stack.toml (implicit etcd)",
        ranks=(),
    )


def common_env(namespace: str, kv: bool) -> dict[str, str]:
    env = {
        "DYN_EVENT_PLANE": "zmq",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "ETCD_ENDPOINTS": "http://127.0.0.1:2379",
        "HOME": f"{STATE}/home",
        "DYN_SDK_DISABLE_ANSI_LOGGING": "1",
    }
    if kv:
        env["PYTHONHASHSEED"] = "0"
    return env


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_golden_units_and_infrastructure(pattern: str, stack: Any) -> None:
    specs = stack(pattern)
    mode, migration = PATTERNS[pattern]
    assert sorted(specs) == sorted(["etcd", "frontend", *(w.name for w in workers_of(pattern))])
    etcd, golden = specs["etcd"], etcd_golden()
    assert replace(etcd, ranks=()) == replace(
        golden, source=golden.source.format(units=UNITS / pattern)
    )
    command = [
        PY, "-m", "dynamo.frontend",
        "--http-host", "127.0.0.1",
        "--http-port", "8000",
        "--namespace", pattern,
        "--router-mode", mode,
        "--discovery-backend", "etcd",
    ]  # fmt: skip
    if migration:
        command += ["--migration-limit", str(migration)]
    frontend = specs["frontend"]
    assert frontend.command == tuple(command)
    assert frontend.env == common_env(pattern, mode == "kv")
    assert frontend.requires == ("etcd",)
    assert frontend.ports == (8000,)
    assert frontend.unset_env == UNSET
    assert frontend.restart is RestartPolicy.ALWAYS
    assert frontend.gpus == 0
    served = DEEPSEEK if pattern == "multinode-tp" else QWEN
    assert frontend.ready == ReadySpec(
        kind=ProbeKind.MODELS,
        target="http://127.0.0.1:8000/v1/models",
        models=(served,),
        timeout=600,  # as long as a vLLM worker may take to load
        interval=0.05,
    )
    # Dynamo's frontend answers /live on its own; checked once RUNNING.
    assert frontend.live == LiveSpec(
        kind=ProbeKind.HTTP,
        target="http://127.0.0.1:8000/live",
        timeout=2.0,
        interval=1.0,
        failures=3,
    )


# Every port below is pinned: ports come from a hash of the unit name, so that
# they do not move when models or replicas are added. A change here moves the
# ports of running stacks. The component's tag (`_<6 hex>`) is pinned too: it
# changes only with what the pool's workers are given (dynamo.expand.revision_tag).
GOLDEN_WORKERS: dict[str, tuple[tuple[str, ...], dict[str, str], tuple[int, ...]]] = {
    "agg/qwen-0": (
        (
            "--model", QWEN, "--served-model-name", QWEN,
            "--endpoint", f"dyn://agg.{QWEN_SLUG}_00d5be.generate",
            "--discovery-backend", "etcd",
            "--tensor-parallel-size", "1",
            "--kv-events-config", EVENTS_OFF,
            *QWEN_AGG_ARGS,
        ),
        {"DYN_SYSTEM_PORT": "21400", "DYN_TCP_RPC_PORT": "21403"},
        (21400, 21403),
    ),
    "agg-router/qwen-0": (
        (
            "--model", QWEN, "--served-model-name", QWEN,
            "--endpoint", f"dyn://agg-router.{QWEN_SLUG}_80cf22.generate",
            "--discovery-backend", "etcd",
            "--tensor-parallel-size", "1",
            "--kv-events-config",
            '{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://*:21401",'
            '"enable_kv_cache_events":true}',
            *QWEN_ROUTER_ARGS,
        ),
        {"DYN_SYSTEM_PORT": "21400", "DYN_TCP_RPC_PORT": "21403"},
        (21400, 21403, 21401),
    ),
    "agg-router/qwen-1": (
        (
            "--model", QWEN, "--served-model-name", QWEN,
            "--endpoint", f"dyn://agg-router.{QWEN_SLUG}_80cf22.generate",
            "--discovery-backend", "etcd",
            "--tensor-parallel-size", "1",
            "--kv-events-config",
            '{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://*:21406",'
            '"enable_kv_cache_events":true}',
            *QWEN_ROUTER_ARGS,
        ),
        {"DYN_SYSTEM_PORT": "21405", "DYN_TCP_RPC_PORT": "21408"},
        (21405, 21408, 21406),
    ),
    "disagg/qwen-prefill-0": (
        (
            "--model", QWEN, "--served-model-name", QWEN,
            "--endpoint", f"dyn://disagg.{QWEN_SLUG}_prefill_745810.generate",
            "--discovery-backend", "etcd",
            "--disaggregation-mode", "prefill",
            "--tensor-parallel-size", "1",
            "--kv-events-config", EVENTS_OFF,
            "--kv-transfer-config", nixl("prefill"),
            *QWEN_AGG_ARGS,
        ),
        {
            "DYN_SYSTEM_PORT": "21600",
            "DYN_TCP_RPC_PORT": "21603",
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": "21604",
        },
        (21600, 21603, 21604),
    ),
    "disagg/qwen-decode-0": (
        (
            "--model", QWEN, "--served-model-name", QWEN,
            "--endpoint", f"dyn://disagg.{QWEN_SLUG}_fb6954.generate",
            "--discovery-backend", "etcd",
            "--disaggregation-mode", "decode",
            "--tensor-parallel-size", "1",
            "--kv-events-config", EVENTS_OFF,
            "--kv-transfer-config", nixl("decode"),
            *QWEN_AGG_ARGS,
        ),
        {
            "DYN_SYSTEM_PORT": "21400",
            "DYN_TCP_RPC_PORT": "21403",
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": "21404",
        },
        (21400, 21403, 21404),
    ),
    **{
        f"disagg-router/qwen-prefill-{i}": (
            (
                "--model", QWEN, "--served-model-name", QWEN,
                "--endpoint", f"dyn://disagg-router.{QWEN_SLUG}_prefill_800b7c.generate",
                "--discovery-backend", "etcd",
                "--disaggregation-mode", "prefill",
                "--tensor-parallel-size", "1",
                "--kv-events-config",
                '{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://*:'
                f'{21601 + 5 * i}","enable_kv_cache_events":true}}',
                "--kv-transfer-config", nixl("prefill"),
                *QWEN_ROUTER_ARGS,
                "--max-num-batched-tokens", "16384",
                "--max-num-seqs", "16",
            ),
            {
                "DYN_SYSTEM_PORT": str(21600 + 5 * i),
                "DYN_TCP_RPC_PORT": str(21603 + 5 * i),
                "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                "VLLM_NIXL_SIDE_CHANNEL_PORT": str(21604 + 5 * i),
            },
            (21600 + 5 * i, 21603 + 5 * i, 21601 + 5 * i, 21604 + 5 * i),
        )
        for i in range(2)
    },
    "disagg-router/qwen-decode-0": (
        (
            "--model", QWEN, "--served-model-name", QWEN,
            "--endpoint", f"dyn://disagg-router.{QWEN_SLUG}_9fb7e8.generate",
            "--discovery-backend", "etcd",
            "--disaggregation-mode", "decode",
            "--tensor-parallel-size", "1",
            "--kv-events-config", EVENTS_OFF,
            "--kv-transfer-config", nixl("decode"),
            "--block-size", "16",
            "--enforce-eager",
            "--gpu-memory-utilization", "0.9",
            "--max-model-len", "8192",
            "--max-num-seqs", "256",
        ),
        {
            "DYN_SYSTEM_PORT": "21400",
            "DYN_TCP_RPC_PORT": "21403",
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": "21404",
        },
        (21400, 21403, 21404),
    ),
    "multinode-tp/deepseek-0": (
        (
            "--model", DEEPSEEK, "--served-model-name", DEEPSEEK,
            "--endpoint", "dyn://multinode-tp.deepseek_ai_deepseek_r1_c648d8.generate",
            "--discovery-backend", "etcd",
            "--tensor-parallel-size", "16",
            "--kv-events-config", EVENTS_OFF,
            "--gpu-memory-utilization", "0.9",
            "--max-model-len", "32768",
            # Rank 0's, as the gang fills the placeholders (rank 0's address
            # is known once placed); rank 1's: test_ranks.
            "--nnodes", "2",
            "--node-rank", "0",
            "--master-addr", "{rank0_addr}",
            "--master-port", "21002",
        ),
        {
            "DYN_SYSTEM_PORT": "21000",
            "DYN_TCP_RPC_PORT": "21003",
            # The gang tells each rank where it stands.
            "DYNSUP_RANK": "0",
            "DYNSUP_RANKS": "2",
            "DYNSUP_RANK0_ADDR": "{rank0_addr}",
        },
        (21000, 21003, 21002),
    ),
}  # fmt: skip


def test_golden_covers_every_worker() -> None:
    assert sorted(GOLDEN_WORKERS) == sorted(w.id for w in WORKERS)


def test_golden_worker(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    argv, env, ports = GOLDEN_WORKERS[expected.id]
    assert spec.command == (PY, "-m", "dynamo.vllm", *argv)
    assert spec.env == {
        **common_env(expected.namespace, PATTERNS[expected.pattern][0] == "kv"),
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS": '["generate"]',
        # What placement adds: the bundle's GPUs (known once placed).
        "CUDA_VISIBLE_DEVICES": "{gpus:0}",
        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
        **env,
    }
    assert spec.ports == ports
    # The worker's system port answers /live from the runtime's own threads.
    assert spec.live == LiveSpec(
        kind=ProbeKind.HTTP,
        target=f"http://127.0.0.1:{env['DYN_SYSTEM_PORT']}/live",
        timeout=5.0,
        interval=2.0,
        failures=3,
    )
    assert spec.unset_env == UNSET
    assert spec.restart is RestartPolicy.ALWAYS
    # Dynamo's graceful shutdown (grace, shutdown steps) plus vLLM's teardown.
    assert spec.stop_timeout == (120.0 if expected.nnodes else RELEASE.vllm_stop_timeout({}))


# --- flag by flag, every worker of every pattern -----------------------------------


def test_runs_dynamo_vllm(worker: tuple[Worker, Process]) -> None:
    _, spec = worker
    assert spec.command[:3] == (PY, "-m", "dynamo.vllm")
    assert "--model-path" not in spec.command  # the mocker's flag, not vLLM's


def test_model(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    assert value_of(spec.command, "--model") == expected.model


def test_served_model_name(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    assert value_of(spec.command, "--served-model-name") == expected.model


def test_endpoint(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    endpoint = value_of(spec.command, "--endpoint")
    # The component carries the pool's revision tag (a changed pool is a new WorkerSet).
    assert re.fullmatch(
        rf"dyn://{re.escape(expected.namespace)}\.{expected.component}_[0-9a-f]{{6}}\.generate",
        endpoint,
    ), endpoint


def test_discovery_backend(worker: tuple[Worker, Process]) -> None:
    _, spec = worker
    assert value_of(spec.command, "--discovery-backend") == "etcd"


def test_tensor_parallel_size(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    assert value_of(spec.command, "--tensor-parallel-size") == str(expected.tp)


def test_kv_events_config(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    events = json.loads(value_of(spec.command, "--kv-events-config"))
    if not expected.publishes:
        assert events == {"enable_kv_cache_events": False}
        return
    endpoint = events.pop("endpoint")
    assert events == {"publisher": "zmq", "topic": "kv-events", "enable_kv_cache_events": True}
    assert endpoint.startswith("tcp://*:")
    kv_port = int(endpoint.removeprefix("tcp://*:"))
    assert kv_port in spec.ports  # checked free before each spawn
    assert kv_port != port(spec)


@pytest.mark.parametrize("pattern", ["agg-router", "disagg-router"])
def test_kv_event_ports_distinct_per_worker(pattern: str, stack: Any) -> None:
    specs = stack(pattern)
    endpoints = [
        json.loads(value_of(specs[w.name].command, "--kv-events-config"))["endpoint"]
        for w in workers_of(pattern)
        if w.publishes
    ]
    assert len(endpoints) == 2
    assert len(set(endpoints)) == len(endpoints)


def test_kv_transfer_config(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    if expected.role == "agg":
        assert "--kv-transfer-config" not in spec.command
    else:
        transfer = json.loads(value_of(spec.command, "--kv-transfer-config"))
        assert transfer == {"kv_connector": "NixlConnector", "kv_role": NIXL_ROLE[expected.role]}


def test_disaggregation_mode(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    if expected.role == "agg":
        assert "--disaggregation-mode" not in spec.command
    else:
        assert value_of(spec.command, "--disaggregation-mode") == expected.role
    # 1.4.2's vLLM worker has no such flags; vLLM's parser would reject them.
    assert "--is-prefill-worker" not in spec.command
    assert "--is-decode-worker" not in spec.command
    assert "--connector" not in spec.command


def test_engine_args(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    tail = spec.command[-len(expected.engine_flags) - (8 if expected.nnodes else 0) :]
    assert tail[: len(expected.engine_flags)] == expected.engine_flags
    for flag in expected.engine_flags:
        if flag.startswith("--"):
            assert spec.command.count(flag) == 1, flag


def test_system_port_env(worker: tuple[Worker, Process]) -> None:
    _, spec = worker
    env = spec.env
    assert 1024 < port(spec) < 32768  # Dynamo 1.4.2 reads it as an i16
    assert port(spec) in spec.ports
    assert env["DYN_SYSTEM_HOST"] == "127.0.0.1"
    assert env["DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS"] == '["generate"]'


def test_pythonhashseed(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    kv = PATTERNS[expected.pattern][0] == "kv"
    assert spec.env.get("PYTHONHASHSEED") == ("0" if kv else None)


def test_discovery_env(worker: tuple[Worker, Process]) -> None:
    _, spec = worker
    assert spec.env["ETCD_ENDPOINTS"] == "http://127.0.0.1:2379"
    assert "DYN_FILE_KV" not in spec.env
    assert "NATS_SERVER" not in spec.env  # NATS is not running: a set URL kills Dynamo
    assert spec.unset_env == UNSET


def test_nixl_side_channel(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    if expected.role == "agg":
        assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in spec.env
        return
    nixl = int(spec.env["VLLM_NIXL_SIDE_CHANNEL_PORT"])
    assert nixl in spec.ports
    assert spec.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"


@pytest.mark.parametrize("pattern", ["disagg", "disagg-router"])
def test_nixl_ports_distinct_per_worker(pattern: str, stack: Any) -> None:
    specs = stack(pattern)
    nixl = [specs[w.name].env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for w in workers_of(pattern)]
    assert len(set(nixl)) == len(nixl) >= 2


def test_readiness(worker: tuple[Worker, Process]) -> None:
    _, spec = worker
    assert spec.ready is not None
    assert spec.ready.kind is ProbeKind.HTTP
    assert spec.ready.target == f"http://127.0.0.1:{port(spec)}/health"
    assert spec.ready.timeout >= 600  # loading weights and warming up takes minutes


def test_requires(worker: tuple[Worker, Process]) -> None:
    _, spec = worker
    assert spec.requires == ("etcd",)  # not the frontend: it discovers workers as they come


def test_gpus(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    assert spec.gpus == expected.tp


def test_ranks(worker: tuple[Worker, Process]) -> None:
    expected, spec = worker
    if not expected.nnodes:
        for flag in ("--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless"):
            assert flag not in spec.command
        assert [r.name for r in spec.ranks] == [expected.name]
        return
    # 16 GPUs on nodes of 8: two ranks, each on a bundle of 8 GPUs of its own node.
    rank0, rank1 = spec.ranks
    assert (rank0.name, rank1.name) == (expected.name, f"{expected.name}-r1")
    assert value_of(rank0.command, "--nnodes") == value_of(rank1.command, "--nnodes") == "2"
    assert value_of(rank0.command, "--node-rank") == "0"
    assert value_of(rank1.command, "--node-rank") == "1"
    for rank in spec.ranks:
        assert value_of(rank.command, "--master-addr") == "{rank0_addr}"  # known once placed
        master = int(value_of(rank.command, "--master-port"))
        assert master in rank.ports
        assert master != port(rank)
        assert rank.env["CUDA_VISIBLE_DEVICES"] == f"{{gpus:{spec.ranks.index(rank)}}}"
        assert rank.env["DYNSUP_RANK"] == str(spec.ranks.index(rank))
    # Rank 0 is the real Dynamo worker; rank 1 only runs its share of the model.
    assert "--headless" not in rank0.command
    assert rank1.command[-1] == "--headless"
    assert rank1.command.count("--headless") == 1
    node_rank = rank0.command.index("--node-rank") + 1
    assert rank1.command[:-1] == (*rank0.command[:node_rank], "1", *rank0.command[node_rank + 1 :])


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_frontend_flags(pattern: str, stack: Any) -> None:
    frontend = stack(pattern)["frontend"].command
    mode, migration = PATTERNS[pattern]
    assert frontend[:3] == (PY, "-m", "dynamo.frontend")
    assert value_of(frontend, "--router-mode") == mode
    assert value_of(frontend, "--namespace") == pattern
    assert value_of(frontend, "--discovery-backend") == "etcd"
    if migration:
        assert value_of(frontend, "--migration-limit") == str(migration)
    else:
        assert "--migration-limit" not in frontend


def test_vllm_is_looked_up(vllm_installed: list[str]) -> None:
    load(UNITS / "agg")
    assert "dynamo.vllm" in vllm_installed
    assert "vllm" in vllm_installed


def test_without_vllm_the_model_file_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real lookup: vLLM is not installed on this machine."""
    monkeypatch.setattr(expand_module, "python_module", python_module)
    try:
        python_module("vllm")
    except LookupError:
        errors = load_errors(UNITS / "agg")
        assert len(errors) == 1
        assert errors[0].startswith(
            f"{UNITS / 'agg' / 'qwen.toml'}: model.engine: vllm is not installed"
        )
    else:  # a machine with vLLM: the example loads as it is
        assert "qwen-0" in load(UNITS / "agg")


# --- multi-node TP -------------------------------------------------------------------


def test_multinode_fits_one_node_when_nodes_are_big_enough() -> None:
    specs = load(UNITS / "multinode-tp", gpus_per_node=16)
    spec = specs["deepseek-0"]
    assert spec.gpus == 16
    assert len(spec.ranks) == 1
    assert "--headless" not in spec.command
    assert "--nnodes" not in spec.command
    assert value_of(spec.command, "--tensor-parallel-size") == "16"


def test_multinode_replicas_have_their_own_master_port() -> None:
    specs = load(UNITS / "multinode-tp", replicas={"deepseek": 2})
    masters = [value_of(specs[f"deepseek-{i}"].command, "--master-port") for i in range(2)]
    assert len(set(masters)) == 2


# --- the stack as a whole ---------------------------------------------------------------


def all_ports(specs: dict[str, Process]) -> list[int]:
    return [p for spec in specs.values() for p in spec.ports]


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_every_port_assigned_once(pattern: str, stack: Any) -> None:
    ports = all_ports(stack(pattern))
    assert len(ports) == len(set(ports)), sorted(ports)
    system = [port(s) for s in stack(pattern).values() if "DYN_SYSTEM_PORT" in s.env]
    assert len(system) == len(set(system)) == len(workers_of(pattern))


def combined(tmp_path: Path) -> Path:
    """One stack with every example's model, renamed so they do not clash."""
    target = tmp_path / "all"
    target.mkdir()
    shutil.copy(UNITS / "disagg-router" / "stack.toml", target / "stack.toml")
    for pattern, served in [
        ("agg", "Qwen/Qwen3-1.7B"),
        ("agg-router", "Qwen/Qwen3-4B"),
        ("disagg", "Qwen/Qwen3-8B"),
        ("disagg-router", QWEN),
    ]:
        text = (UNITS / pattern / "qwen.toml").read_text()
        text = text.replace(f'name = "{QWEN}"', f'name = "{served}"')
        (target / f"{pattern}.toml").write_text(text)
    shutil.copy(UNITS / "multinode-tp" / "deepseek.toml", target / "deepseek.toml")
    return target


def test_every_port_assigned_once_across_models_replicas_and_ranks(tmp_path: Path) -> None:
    replicas = {"agg-router": 5, "disagg:prefill": 3, "disagg:decode": 4, "deepseek": 3}
    specs = load(combined(tmp_path), replicas=replicas)
    workers = [s for s in specs.values() if "DYN_SYSTEM_PORT" in s.env]
    assert len(workers) == 1 + 5 + (3 + 4) + (2 + 1) + 3
    ports = all_ports(specs)
    assert len(ports) == len(set(ports)), sorted(ports)
    assert all(p < 32768 for s in workers for p in s.ports)
    # Components: one per served model and role, shared by the replicas of a pool.
    endpoints = {value_of(s.command, "--endpoint") for s in workers}
    assert len(endpoints) == 1 + 1 + 2 + 2 + 1
    frontend = specs["frontend"]
    assert sorted(frontend.ready.models) == sorted(
        [DEEPSEEK, QWEN, "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B"]
    )
    # One frontend for every model: the largest migration limit.
    assert value_of(frontend.command, "--migration-limit") == "3"


@pytest.mark.parametrize(
    ("pattern", "replicas", "added"),
    [
        ("agg-router", {"qwen": 3}, ["qwen-2"]),
        ("disagg-router", {"qwen:prefill": 3}, ["qwen-prefill-2"]),
        ("disagg-router", {"qwen:decode": 2}, ["qwen-decode-1"]),
        ("multinode-tp", {"deepseek": 2}, ["deepseek-1"]),
    ],
)
def test_adding_a_replica_changes_no_existing_unit(
    pattern: str, replicas: dict[str, int], added: list[str], stack: Any
) -> None:
    before = stack(pattern)
    after = load(UNITS / pattern, replicas=replicas)
    assert sorted(set(after) - set(before)) == added
    for name, spec in before.items():
        assert after[name] == spec, name
    ports = all_ports(after)
    assert len(ports) == len(set(ports))


def test_two_model_names_making_the_same_component(tmp_path: Path) -> None:
    units = copy_example("agg", tmp_path)
    other = write(
        units,
        "qwen-again",
        '[model]\nname = "qwen/qwen3 0.6b"\npath = "Qwen/Qwen3-0.6B"\n',
    )
    errors = load_errors(units)
    assert len(errors) == 1
    (error,) = errors
    assert error.startswith(f"{units / 'qwen.toml'}: model.name: ") or error.startswith(
        f"{other}: model.name: "
    )
    # Both files and both names are in the message.
    assert str(units / "qwen.toml") in error
    assert str(other) in error
    assert "'Qwen/Qwen3-0.6B'" in error
    assert "'qwen/qwen3 0.6b'" in error
    assert QWEN_SLUG in error


def test_a_model_named_like_another_models_prefill_component(tmp_path: Path) -> None:
    """``<slug>_prefill`` is the prefill component of a disaggregated model: a second
    model whose own slug is that name would register its workers among the first
    model's prefill workers. (Fails today: only the plain slugs are compared.)"""
    units = copy_example("disagg", tmp_path)
    other = write(
        units,
        "prefill-lookalike",
        '[model]\nname = "Qwen/Qwen3-0.6B-prefill"\npath = "Qwen/Qwen3-0.6B"\n',
    )
    errors = load_errors(units)
    assert len(errors) == 1, errors
    assert f"{QWEN_SLUG}_prefill" in errors[0]
    assert str(units / "qwen.toml") in errors[0]
    assert str(other) in errors[0]


def test_unknown_engine(tmp_path: Path) -> None:
    units = copy_example("agg", tmp_path)
    path = units / "qwen.toml"
    path.write_text(path.read_text().replace('engine = "vllm"', 'engine = "sglang"'))
    errors = load_errors(units)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: model.engine: ")
    assert "sglang" in errors[0]
    assert '"vllm"' in errors[0]
    assert '"mocker"' in errors[0]


def test_a_frontend_service_file_replaces_the_implicit_frontend(tmp_path: Path, stack: Any) -> None:
    units = copy_example("agg-router", tmp_path)
    mine = write(
        units,
        "frontend",
        '[unit]\nrequires = ["etcd"]\n'
        '[service]\ncommand = ["/opt/my-frontend", "--port", "8000"]\n',
    )
    specs = load(units)
    assert specs["frontend"].command == ("/opt/my-frontend", "--port", "8000")
    assert specs["frontend"].source == str(mine)
    original = stack("agg-router")
    assert sorted(specs) == sorted(original)
    for name in ("etcd", "qwen-0", "qwen-1"):
        assert specs[name] == original[name]


def test_engine_args_to_flags(tmp_path: Path) -> None:
    """snake → kebab, True → bare flag, False → --no-…, tables and arrays → JSON,
    role arguments over the model's (either spelling of a key is the same flag)."""
    units = copy_example("disagg", tmp_path)
    write(
        units,
        "qwen",
        textwrap.dedent(f"""
        [model]
        name = "{QWEN}"
        path = "{QWEN}"
        mode = "disaggregated"
        [model.engine_args]
        max_model_len = 4096
        enforce_eager = true
        enable_prefix_caching = false
        "max-num-seqs" = 64
        override_generation_config = {{ temperature = 0.6, top_p = 0.95 }}
        cuda_graph_sizes = [1, 2, 4]
        [model.prefill]
        engine_args = {{ max_num_seqs = 8, enforce_eager = false }}
        """),
    )
    specs = load(units)
    decode = specs["qwen-decode-0"].command
    prefill = specs["qwen-prefill-0"].command
    assert value_of(decode, "--max-model-len") == "4096"
    assert "--enforce-eager" in decode
    assert "--no-enforce-eager" not in decode
    assert "--no-enable-prefix-caching" in decode
    assert "--enable-prefix-caching" not in decode
    assert value_of(decode, "--max-num-seqs") == "64"
    assert value_of(decode, "--override-generation-config") == '{"temperature":0.6,"top_p":0.95}'
    assert value_of(decode, "--cuda-graph-sizes") == "[1,2,4]"
    # The prefill pool's arguments replace the model's, flag for flag.
    assert value_of(prefill, "--max-num-seqs") == "8"
    assert "--no-enforce-eager" in prefill
    assert "--enforce-eager" not in prefill
    assert value_of(prefill, "--max-model-len") == "4096"


def test_engine_args_cannot_contradict_what_dynsup_sets(tmp_path: Path) -> None:
    """``engine_args.tensor_parallel_size`` would come after dynsup's own
    ``--tensor-parallel-size`` and win in vLLM's parser, while the GPUs reserved
    follow ``[model] tensor_parallel_size``: it must be refused, naming the key.
    (Fails today: it is passed through.)"""
    units = copy_example("agg", tmp_path)
    path = units / "qwen.toml"
    path.write_text(path.read_text() + "tensor_parallel_size = 2\n")  # into [model.engine_args]
    errors = load_errors(units)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: model.engine_args")
    assert "tensor_parallel_size" in errors[0]


def test_frontend_waits_only_for_models_that_have_workers(tmp_path: Path) -> None:
    """A model scaled to 0 (``dynsupctl scale qwen 0``) has no worker: a frontend that
    waited for it in /v1/models would never be ready again after its next restart.
    (Fails today: the override is not consulted, only the file's ``replicas``.)"""
    units = copy_example("agg-router", tmp_path)
    shutil.copy(UNITS / "multinode-tp" / "deepseek.toml", units / "deepseek.toml")
    specs = load(units, replicas={"qwen": 0})
    assert "qwen-0" not in specs
    assert specs["frontend"].ready.models == (DEEPSEEK,)
