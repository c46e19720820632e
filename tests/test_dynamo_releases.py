"""The Dynamo release table: flags and stop timeouts per supported release,
whichever release is installed (the other one is checked through its row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynsup.dynamo import StackContext, expand_stack
from dynsup.dynamo.releases import RELEASES, installed_release, release_for
from dynsup.units import load_units

from .check_helpers import UNITS, fake_vllm

pytestmark = pytest.mark.dynamo

V14, V16 = RELEASES


@pytest.mark.parametrize(
    ("version", "row"),
    [("1.4.2", V14), ("1.5.0", V14), ("1.6.1", V16), ("1.6.0rc1", V16), ("1.9.0", V16),
     ("1.3.0", V14), ("garbage", V16)],
)  # fmt: skip
def test_release_for_version(version: str, row: object) -> None:
    assert release_for(version) is row


def test_installed_release_is_the_installed_ai_dynamo() -> None:
    from importlib.metadata import version

    assert installed_release() is release_for(version("ai-dynamo"))


def specs_for(release: object, monkeypatch: pytest.MonkeyPatch, directory: Path) -> dict:
    fake_vllm(monkeypatch)
    ctx = StackContext(state_dir="/var/lib/dynsup", gpus_per_node=8, release=release)
    return load_units(
        [directory],
        context={"state_dir": "/var/lib/dynsup"},
        expand=lambda services, others: expand_stack(services, others, ctx),
    )


@pytest.mark.parametrize(
    ("release", "prefill", "decode"),
    [(V14, "kv_both", "kv_both"), (V16, "kv_producer", "kv_consumer")],
)
def test_disaggregated_kv_roles_per_release(
    release: object, prefill: str, decode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = specs_for(release, monkeypatch, UNITS / "disagg")
    for name, role in (("qwen-prefill-0", prefill), ("qwen-decode-0", decode)):
        argv = specs[name].command
        transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        assert transfer == {"kv_connector": "NixlConnector", "kv_role": role}


@pytest.mark.parametrize(("release", "timeout"), [(V14, 60.0), (V16, 90.0)])
def test_vllm_stop_timeout_covers_the_releases_graceful_shutdown(
    release: object, timeout: float, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # 5 s grace + (1.6: a pre-shutdown step of up to 30 s) + vLLM's teardown.
    assert specs_for(release, monkeypatch, UNITS / "agg")["qwen-0"].stop_timeout == timeout
    # A longer grace period set for the worker lengthens its stop timeout.
    units = tmp_path / "agg"
    units.mkdir()
    (units / "stack.toml").write_text((UNITS / "agg" / "stack.toml").read_text())
    grace = 'environment = { DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS = "20" }\n'
    text = (UNITS / "agg" / "qwen.toml").read_text().replace("[model]\n", "[model]\n" + grace, 1)
    (units / "qwen.toml").write_text(text)
    assert specs_for(release, monkeypatch, units)["qwen-0"].stop_timeout == timeout + 15


def test_mocker_stop_timeout_is_the_same_for_both(monkeypatch: pytest.MonkeyPatch) -> None:
    for release in RELEASES:
        specs = specs_for(release, monkeypatch, UNITS / "demo")
        assert specs["tiny-0"].stop_timeout == 10.0
