"""engine_args → command-line flags, the way vLLM's and Dynamo's parsers read them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def to_flags(args: Mapping[str, Any]) -> list[str]:
    """``max_model_len=4096`` → ``--max-model-len 4096``; True → bare flag;
    False → ``--no-…``; dicts and lists → one JSON argument; None → left out."""
    out: list[str] = []
    for key, value in args.items():
        name = flag_name(key)
        if value is None:
            continue
        if value is True:
            out.append(name)
        elif value is False:
            out.append("--no-" + name[2:])
        elif isinstance(value, (dict, list)):
            out += [name, json.dumps(value, separators=(",", ":"), sort_keys=True)]
        else:
            out += [name, str(value)]
    return out


def merge_args(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; a key given as snake_case or kebab-case is the same flag."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            merged[key.replace("-", "_")] = value
    return merged
