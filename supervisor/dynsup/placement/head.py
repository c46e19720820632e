"""The embedded Ray head: a local Ray instance that outlives the daemon.

Why not ``ray.init()`` in the daemon: its gcs_server and raylet get
``PR_SET_PDEATHSIG`` and die with the daemon's thread that started them,
and with them every detached actor and every process those actors host.
A daemon restart (an upgrade, a crash, ``kill -9``) would then restart
every model server, which takes minutes each.

So the daemon starts the head with ``ray start --head`` as a process tree
of its own (a new session, no death signal), records where it is in
``<state_dir>/ray-head.toml`` and joins it like any cluster. A daemon
that starts and finds the recorded head alive joins it again, and finds
its agents and their processes there.

The trade-off: the head is not tied to the daemon's life, so something
must end it. An orderly shutdown with no unit left running stops it
(`stop_head`); a daemon that dies leaves it running, on purpose, for the
next daemon to adopt; if none comes, it stays until ``dynsupd`` runs and
stops, or the machine reboots. Under systemd the service needs
``KillMode=process`` (or the head in a scope of its own) or systemd kills
the head with the daemon's cgroup. ``ray stop`` is never used: it kills
every Ray process on the machine, other users' included. The head's
processes are found by a mark in their environment, by the temp dir in
their command line, and as descendants of those.

The head uses token authentication with a token of its own (kept in the
record, mode 0600): Ray 2.60 otherwise turns auth on or off depending on
``~/.ray/auth_token``, and a joining driver must agree with the head.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import psutil
import tomli_w

from .ray_cluster import RayConnectError, survive_gcs_outages

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HEAD_FILE = "ray-head.toml"
MARK_VAR = "DYNSUP_RAY_HEAD"
_MAX_TEMP_DIR = 40  # Ray's Unix socket paths under it must stay below 108 bytes
_START_TIMEOUT = 180.0
_EXIT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Head:
    """Where a running head is and how to find its processes."""

    address: str  # the GCS "ip:port", what open_ray joins
    temp_dir: str
    token: str  # auth token and process mark
    gcs_pid: int
    gcs_start: float  # create_time, to tell a reused pid
    raylet_pid: int
    raylet_start: float

    def auth_env(self) -> dict[str, str]:
        """What a driver's environment needs to join this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


def head_file(state_dir: Path) -> Path:
    return state_dir / HEAD_FILE


def read_head(state_dir: Path) -> Head | None:
    try:
        data = tomllib.loads(head_file(state_dir).read_text())
        return Head(**data)
    except (OSError, ValueError, TypeError):
        return None


def head_alive(head: Head) -> bool:
    return _same(head.gcs_pid, head.gcs_start) and _same(head.raylet_pid, head.raylet_start)


def ensure_head(
    state_dir: Path, *, num_gpus: int | None, num_cpus: int | None = None
) -> tuple[Head, bool]:
    """The recorded head if alive, else a new one: ``(head, started_now)``. Blocks seconds."""
    recorded = read_head(state_dir)
    if recorded is not None:
        if head_alive(recorded):
            return recorded, False
        stop_head(state_dir, recorded)  # what a half-dead head left
    return start_head(state_dir, num_gpus=num_gpus, num_cpus=num_cpus), True


def start_head(
    state_dir: Path, *, num_gpus: int | None, num_cpus: int | None = None, token: str | None = None
) -> Head:
    """Start a head; ``token``: the auth token to keep (Ray reads it once per process)."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        found = shutil.which("ray")
        if found is None:
            raise RayConnectError("cannot start an embedded Ray: no `ray` command found")
        ray_cli = Path(found)
    state_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = _temp_dir(state_dir)
    token = token or secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    # The raylet and the agent actors it starts outlive a GCS restart too.
    survive_gcs_outages(env)
    env[MARK_VAR] = token
    args = [
        str(ray_cli),
        "start",
        "--head",
        f"--port={_free_port()}",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        # Ports of its own: the defaults (8265, 52365, ...) clash with any
        # other Ray on the machine.
        f"--dashboard-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
    ]
    if num_gpus is not None:
        args.append(f"--num-gpus={num_gpus}")
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    log = state_dir / "ray-start.log"
    with log.open("ab") as out:
        # A session of its own: a terminal's Ctrl-C to the daemon never reaches it.
        done = subprocess.run(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            timeout=_START_TIMEOUT,
            check=False,
        )
    marked = _marked(token)
    if done.returncode != 0:
        _kill_all(head_processes(token, temp_dir))
        tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
        raise RayConnectError(f"`ray start --head` failed ({done.returncode}):\n{tail}")
    gcs = next((p for p in marked if _name(p) == "gcs_server"), None)
    raylet = next((p for p in marked if _name(p) == "raylet"), None)
    if gcs is None or raylet is None:
        _kill_all(head_processes(token, temp_dir))
        raise RayConnectError("`ray start --head` left no gcs_server or raylet running")
    head = Head(
        address=Path(temp_dir, "ray_current_cluster").read_text().strip(),
        temp_dir=temp_dir,
        token=token,
        gcs_pid=gcs.pid,
        gcs_start=gcs.create_time(),
        raylet_pid=raylet.pid,
        raylet_start=raylet.create_time(),
    )
    path = head_file(state_dir)
    path.touch(mode=0o600)
    path.write_text(tomli_w.dumps(asdict(head)))
    return head


async def wait_head_exit(head: Head, processes: tuple[str, ...] = ("gcs_server", "raylet")) -> str:
    """Until one of the head's processes exits; returns which. Event-driven (pidfd)."""
    fds: dict[str, int] = {}
    watched = {
        "gcs_server": (head.gcs_pid, head.gcs_start),
        "raylet": (head.raylet_pid, head.raylet_start),
    }
    try:
        for name in processes:
            pid, start = watched[name]
            try:
                fds[name] = os.pidfd_open(pid)
            except ProcessLookupError:
                return name
            if not _same(pid, start):  # checked once the fd pins the pid: no reuse race
                return name
        exited: list[str] = []
        async with anyio.create_task_group() as tg:

            async def watch(name: str, fd: int) -> None:
                await anyio.wait_readable(fd)  # a pidfd reads as ready when its process exits
                exited.append(name)
                tg.cancel_scope.cancel()

            for name, fd in fds.items():
                tg.start_soon(watch, name, fd)
        return exited[0]
    finally:
        for fd in fds.values():
            os.close(fd)


def stop_head(state_dir: Path, head: Head) -> list[psutil.Process]:
    """Kill exactly this head's processes; forget it. Returns those that survived SIGKILL."""
    survivors: list[psutil.Process] = []
    # Again until a scan finds nothing: a raylet may fork a worker meanwhile.
    for _ in range(3):
        procs = head_processes(head.token, head.temp_dir)
        if not procs:
            break
        survivors = _kill_all(procs)
    with contextlib.suppress(OSError):
        head_file(state_dir).unlink()
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return survivors


def head_processes(token: str, temp_dir: str) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if _env(proc).get(MARK_VAR) == token or temp_dir in _cmdline(proc):
            found[proc.pid] = proc
    raylets = {str(p.pid) for p in found.values() if _name(p) == "raylet"}
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in proc.children(recursive=True)})
    for proc in psutil.process_iter():
        if proc.pid not in found and _env(proc).get("RAY_RAYLET_PID") in raylets:
            found[proc.pid] = proc
    found.pop(os.getpid(), None)
    return [p for p in found.values() if _running(p)]


def _kill_all(procs: list[psutil.Process]) -> list[psutil.Process]:
    # SIGKILL at once: the head's state is thrown away, and Ray's orphaned
    # agents ignore SIGTERM.
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=_EXIT_TIMEOUT)
    return [p for p in alive if _running(p)]


def _marked(token: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _env(p).get(MARK_VAR) == token]


def _temp_dir(state_dir: Path) -> str:
    wanted = (state_dir / "ray").resolve()
    if len(str(wanted)) > _MAX_TEMP_DIR:
        digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:10]
        wanted = Path("/tmp") / f"dynsup-ray-{digest}"
    wanted.mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(wanted)


def _same(pid: int, start: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == start and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _env(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])
