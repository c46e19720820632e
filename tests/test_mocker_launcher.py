"""The mocker launcher's stand-in computes exactly what Dynamo's own kv_cache module does."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynsup.dynamo import mocker_launcher

DEMO_MODEL = Path(__file__).parent.parent / "units" / "demo" / "model"

pytestmark = pytest.mark.dynamo


def _real():  # type: ignore[no-untyped-def]
    spec = importlib.util.find_spec(mocker_launcher.KV_CACHE)
    assert spec is not None
    return mocker_launcher._real_module(spec)


def _model(tmp_path: Path, config: dict) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_same_kv_bytes_as_dynamo(tmp_path: Path) -> None:
    real = _real()
    gqa = {
        "model_type": "llama", "num_hidden_layers": 3, "hidden_size": 256,
        "num_attention_heads": 8, "num_key_value_heads": 2, "torch_dtype": "float32",
    }  # fmt: skip
    mha = {
        "model_type": "llama", "num_hidden_layers": 4, "hidden_size": 128,
        "num_attention_heads": 4, "torch_dtype": "float16",
    }  # fmt: skip
    models = [str(DEMO_MODEL), _model(tmp_path / "gqa", gqa), _model(tmp_path / "mha", mha)]
    code = (
        "import sys, json;"
        "from dynsup.dynamo.mocker_launcher import install_stand_in, KV_CACHE;"
        "assert install_stand_in(); m = sys.modules[KV_CACHE];"
        "print(json.dumps([[m.compute_kv_bytes_per_token(p, d) for d in ('auto', 'fp8')]"
        f" for p in {models!r}]))"
    )
    # In a fresh interpreter: the stand-in must not pull in transformers.
    out = subprocess.run(
        [sys.executable, "-c", code + "; assert 'transformers' not in sys.modules"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    fast = json.loads(out)
    slow = [[real.compute_kv_bytes_per_token(p, d) for d in ("auto", "fp8")] for p in models]
    assert fast == slow
    assert fast[0][0] == 256


def test_constants_come_from_the_real_source() -> None:
    real = _real()
    spec = importlib.util.find_spec(mocker_launcher.KV_CACHE)
    assert spec is not None and spec.origin is not None
    constants = mocker_launcher._constants(Path(spec.origin).read_text())
    assert (
        constants["DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS"] == real.DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS
    )
    assert constants["TORCH_DTYPE_BYTES"] == real.TORCH_DTYPE_BYTES
