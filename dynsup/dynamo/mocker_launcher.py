"""Start Dynamo's mocker without its 1.6-second `transformers` import.

`python -m dynamo.mocker` imports `dynamo.mocker.utils.kv_cache` at start-up,
and that module imports `transformers` (about 1.6 s of a 2 s start on a
small machine) for one thing: reading a model's config to compute KV bytes
per token. This launcher puts a stand-in for that module in `sys.modules`:
its constants are read from the real module's source (parsed, not run), and
`compute_kv_bytes_per_token` applies the same formula to a local
`config.json`, handing anything else (a hub id, an odd config) to the real
function, imported only then. Then it runs the mocker's own `__main__`.

Run as: python -m dynsup.dynamo.mocker_launcher <dynamo.mocker arguments>
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import runpy
import sys
import types
from pathlib import Path
from typing import Any

KV_CACHE = "dynamo.mocker.utils.kv_cache"


def _constants(source: str) -> dict[str, Any]:
    """Module-level NAME = <literal> assignments of a source file."""
    found: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id.isupper():
                try:
                    found[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return found


def _kv_bytes_from_config(
    config: dict[str, Any], dtype_bytes: dict[str, int], kv_cache_dtype: str
) -> int:
    """The real module's formula: layers * 2 (K+V) * kv_heads * head_dim * dtype bytes."""
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config.get("num_kv_heads") or heads
    head_dim = config["hidden_size"] // heads
    if kv_cache_dtype == "auto":
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float16")
        size = dtype_bytes.get(dtype.removeprefix("torch."), 2)
    else:
        size = dtype_bytes.get(kv_cache_dtype, 2)
    return int(config["num_hidden_layers"]) * 2 * int(kv_heads) * int(head_dim) * size


def _real_module(spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install_stand_in() -> bool:
    """Replace the kv_cache module by a fast stand-in; False when it cannot be found."""
    spec = importlib.util.find_spec(KV_CACHE)
    if spec is None or spec.origin is None:
        return False
    constants = _constants(Path(spec.origin).read_text())
    stand_in = types.ModuleType(KV_CACHE)
    stand_in.__dict__.update(constants)
    stand_in.__file__ = spec.origin
    dtype_bytes = constants.get("TORCH_DTYPE_BYTES", {})

    def compute_kv_bytes_per_token(model_path: str, kv_cache_dtype: str = "auto") -> int | None:
        config_file = Path(model_path) / "config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
                return _kv_bytes_from_config(config, dtype_bytes, kv_cache_dtype)
            except (ValueError, KeyError, TypeError, ZeroDivisionError):
                pass  # an unusual config: the real reader knows more
        return _real_module(spec).compute_kv_bytes_per_token(model_path, kv_cache_dtype)

    stand_in.compute_kv_bytes_per_token = compute_kv_bytes_per_token  # type: ignore[attr-defined]
    sys.modules[KV_CACHE] = stand_in
    return True


def main() -> None:
    install_stand_in()
    sys.argv[0] = "dynamo.mocker"
    runpy.run_module("dynamo.mocker", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
