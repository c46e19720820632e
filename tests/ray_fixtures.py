"""Ray for tests: one embedded instance per session, a multi-node cluster per module.

Import the fixtures into a conftest or a test module::

    from tests.ray_fixtures import ray_embedded, ray_instance, ray_multinode

* ``ray_embedded`` (session): this process's embedded Ray, 8 logical GPUs,
  2 CPUs, started on first use (about 7-10 s here) and shut down when the
  session ends; then no process of its Ray session may remain.
* ``ray_instance`` (function): a daemon instance name unique to the test,
  for ``group_name``; after the test no live group of it may remain.
* ``ray_multinode`` (module): a head raylet with no GPUs and two worker
  raylets with 4 logical GPUs each, all on this machine (``ray start``,
  about 15 s). A process can hold one Ray connection only, and the
  session's embedded Ray holds this one, so a test drives the cluster from
  a subprocess: ``run_driver(cluster, code)``; ``run_python(code)`` runs
  one that starts a Ray of its own.

Ray's processes outlive single tests by design (idle workers are kept for
reuse), so they are started without the conftest's per-test process mark
(it would kill them as leaks) and checked here, once, at teardown instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from dynsup.placement import RayHandle, connect, group_prefix

from .helpers import running

TEST_SESSION_MARK = "DYNSUP_TEST_SESSION"  # conftest's per-test leak check
CLUSTER_MARK = "DYNSUP_TEST_RAY_CLUSTER"  # every process of one ray_multinode cluster
EMBEDDED_GPUS = 8
WORKER_GPUS = 4
RESULT_PREFIX = "RESULT "
_EXIT_TIMEOUT = 30.0  # Ray's own shutdown takes 1-2 s here; leave room on a loaded machine


_embedded: list[RayHandle] = []  # this process's one embedded Ray, while a fixture holds it


@pytest.fixture(scope="session")
def ray_embedded() -> Iterator[RayHandle]:
    import ray

    if _embedded:
        # The fixture is registered twice (a conftest's pytest_plugins and a
        # test module's import): one process holds one Ray, so share it.
        yield _embedded[0]
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(TEST_SESSION_MARK, raising=False)
        # Called on the main thread, which outlives the session: Ray's
        # processes die with the thread that started them.
        handle = connect(
            "", num_gpus=EMBEDDED_GPUS, num_cpus=2, namespace=f"dynsup-test-{os.getpid()}"
        )
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    _embedded.append(handle)
    try:
        yield handle
    finally:
        _embedded.clear()
        processes = _session_processes(session_dir)
        handle.shutdown()
        _, alive = psutil.wait_procs(processes, timeout=_EXIT_TIMEOUT)
        leftovers = [p for p in alive if running(p)]
        _kill(leftovers)
        assert not leftovers, f"Ray left processes after shutdown: {_describe(leftovers)}"


@pytest.fixture
def ray_instance(ray_embedded: RayHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    from ray.util.placement_group import (
        get_placement_group,
        placement_group_table,
        remove_placement_group,
    )

    instance = f"{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:6]}"
    yield instance
    prefix = group_prefix(instance)
    left = {
        info["name"]: (group_id, info["state"])
        for group_id, info in placement_group_table().items()
        if info["name"].startswith(prefix) and info["state"] != "REMOVED"
    }
    for name in left:
        # Release the leak so the next test starts with free GPUs.
        with contextlib.suppress(Exception):
            remove_placement_group(get_placement_group(name))
    assert not left, f"placement groups left by the test: {left}"


@dataclass(frozen=True)
class LocalCluster:
    address: str  # GCS "ip:port", for connect()
    env: dict[str, str]  # what a driver needs on top of os.environ (auth token, address)
    temp_dir: str
    worker_resources: tuple[str, ...]  # a custom resource per worker node, to tell them apart
    start_env: dict[str, str] = field(repr=False, default_factory=dict)  # what `ray start` had


@pytest.fixture(scope="module")
def ray_multinode() -> Iterator[LocalCluster]:
    with local_cluster() as cluster:
        yield cluster


@contextlib.contextmanager
def local_cluster(ray_env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """``ray_multinode``'s cluster; ``ray_env`` adds Ray settings (``RAY_<name>``) to every node."""
    if not RAY_CLI.exists():
        pytest.skip("the ray CLI is not installed next to this Python")
    # Short: Ray's Unix socket paths live under it and must stay < 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="dsr-", dir="/tmp")
    token = secrets.token_hex(16)
    # Ray 2.60 turns token auth on for a head when ~/.ray/auth_token exists
    # (any embedded ray.init writes one) but not for a joining `ray start`,
    # which is then refused. Naming the mode and a token of our own avoids
    # both that and the user's token file.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env = {k: v for k, v in os.environ.items() if k not in (TEST_SESSION_MARK, "RAY_ADDRESS")}
    env.update(auth, RAY_USAGE_STATS_ENABLED="0", **{CLUSTER_MARK: token}, **(ray_env or {}))
    resources = tuple(f"dsr_worker_{i}" for i in range(2))
    try:
        _ray_start(
            temp_dir,
            env,
            "--head",
            f"--port={_free_port()}",
            "--num-gpus=0",
            "--num-cpus=0",
            "--include-dashboard=false",
            f"--dashboard-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
        )
        address = Path(temp_dir, "ray_current_cluster").read_text().strip()
        cluster = LocalCluster(
            address=address,
            # RAY_ADDRESS: what connect("auto") joins.
            env={**auth, "DYNSUP_TEST_RAY_ADDRESS": address, "RAY_ADDRESS": address},
            temp_dir=temp_dir,
            worker_resources=resources,
            start_env=env,
        )
        for resource in resources:
            add_worker(cluster, resource)
        yield cluster
    finally:
        leftovers = _stop_cluster(token)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"cluster processes survived SIGKILL: {_describe(leftovers)}"


def add_worker(cluster: LocalCluster, resource: str) -> None:
    """Start one more worker raylet (WORKER_GPUS GPUs, one CPU, ``resource``) in the cluster."""
    _ray_start(
        cluster.temp_dir,
        cluster.start_env,
        f"--address={cluster.address}",
        f"--num-gpus={WORKER_GPUS}",
        "--num-cpus=1",
        f"--resources={json.dumps({resource: 1})}",
    )


def gcs_of(cluster: LocalCluster) -> psutil.Process:
    """The cluster's gcs_server process."""
    token = cluster.start_env[CLUSTER_MARK]
    for proc in psutil.process_iter():
        if _name(proc) == "gcs_server" and _env(proc).get(CLUSTER_MARK) == token:
            return proc
    raise AssertionError("no gcs_server in the cluster")


def raylet_of(cluster: LocalCluster, node_id: str) -> psutil.Process:
    """The raylet process of a node of the cluster."""
    token = cluster.start_env[CLUSTER_MARK]
    for proc in psutil.process_iter():
        if _name(proc) == "raylet" and _env(proc).get(CLUSTER_MARK) == token:
            with contextlib.suppress(psutil.Error):
                if f"--node_id={node_id}" in proc.cmdline():
                    return proc
    raise AssertionError(f"no raylet of node {node_id} in the cluster")


def named_actors(namespace: str) -> list[str]:
    """The live named actors of namespace (in this process's Ray)."""
    import ray.util

    return sorted(
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace
    )


async def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until procs are gone (zombies count as gone); returns those still running.

    Polls: a process that is not our child gives no event when it dies.
    """
    import anyio

    alive = procs
    with anyio.move_on_after(timeout):
        while alive := [p for p in alive if running(p)]:
            await anyio.sleep(0.02)
    return alive


def run_driver(cluster: LocalCluster, code: str, timeout: float = 120.0) -> Any:
    """Run ``code`` as a Ray driver of ``cluster`` (its address is ``ADDRESS``); see run_python."""
    return run_python(code, cluster.env, timeout)


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> Any:
    """Run ``code`` in a fresh Python and return the value it passes to ``report``.

    The code calls ``report(value)`` once with a JSON-able value. The
    process keeps the conftest's mark: whatever it leaves behind is a leak.
    """
    prelude = textwrap.dedent(
        f"""
        import json, os, sys
        ADDRESS = os.environ.get("DYNSUP_TEST_RAY_ADDRESS", "")
        def report(value):
            print({RESULT_PREFIX!r} + json.dumps(value), flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    reports = [
        line[len(RESULT_PREFIX) :]
        for line in result.stdout.splitlines()
        if line.startswith(RESULT_PREFIX)
    ]
    if result.returncode != 0 or len(reports) != 1:
        raise AssertionError(
            f"python exited {result.returncode} with {len(reports)} reports\n"
            f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
        )
    return json.loads(reports[0])


RAY_CLI = Path(sys.executable).with_name("ray")


def _ray_start(temp_dir: str, env: dict[str, str], *args: str) -> None:
    # Every node gets ports of its own: two raylets on one machine would
    # otherwise both take the fixed defaults (52365, 8265, ...).
    # Distinct: one free port asked for six times can come back twice.
    node, objects, runtime_env, metrics, agent, agent_grpc = _free_ports(6)
    ports = [
        f"--node-manager-port={node}",
        f"--object-manager-port={objects}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--object-store-memory={100 * 2**20}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    log = Path(temp_dir, "ray-start.log")
    with log.open("a") as out:
        done = subprocess.run(
            [str(RAY_CLI), "start", *args, *ports],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"ray start {args} failed:\n{log.read_text()[-3000:]}")


def _stop_cluster(token: str) -> list[psutil.Process]:
    """Kill this cluster's processes only, and return those that survived.

    Not ``ray stop --force``: it kills every Ray process on the machine by
    name, the session's embedded Ray and other users' clusters included.
    Ours carry CLUSTER_MARK; the agents and workers a raylet forks get a
    scrubbed environment, so they are found as descendants (or, once
    orphaned, by the RAY_RAYLET_PID Ray gives them). SIGKILL at once: the
    cluster's state is thrown away, and orphaned agents ignore SIGTERM.
    """
    raylets: set[str] = set()
    alive: list[psutil.Process] = []
    # Again until a scan finds nothing: a raylet may fork a worker while
    # the first round is being killed.
    for _ in range(3):
        procs = _cluster_processes(token, raylets)
        if not procs:
            break
        _kill(procs)
        _, alive = psutil.wait_procs(procs, timeout=_EXIT_TIMEOUT)
    return [p for p in alive if running(p)]


def _cluster_processes(token: str, raylets: set[str]) -> list[psutil.Process]:
    """Processes of the cluster; adds the pids of its raylets to ``raylets``."""
    marked = [p for p in psutil.process_iter() if _env(p).get(CLUSTER_MARK) == token]
    raylets.update(str(p.pid) for p in marked if _name(p) == "raylet")
    found = {p.pid: p for p in marked}
    for proc in marked:
        with contextlib.suppress(psutil.Error):
            found.update({child.pid: child for child in proc.children(recursive=True)})
    for proc in psutil.process_iter():
        if proc.pid not in found and _env(proc).get("RAY_RAYLET_PID") in raylets:
            found[proc.pid] = proc
    return [p for p in found.values() if running(p)]


def _session_processes(session_dir: str) -> list[psutil.Process]:
    """The processes of the embedded Ray session: those naming its directory, and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if session_dir in " ".join(proc.cmdline()):
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
    return list(found.values())


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _env(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _describe(procs: list[psutil.Process]) -> str:
    return ", ".join(f"{p.pid} {_name(p)}" for p in procs)


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    """count distinct free ports (each socket held until all are chosen)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind(("", 0))
            ports.append(sock.getsockname()[1])
        return ports
