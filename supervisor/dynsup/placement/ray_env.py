"""Ray's own environment, kept from the units an agent actor hosts.

The agent actor is a Ray worker: its environment is its raylet's (the
node's) plus what Ray adds for its workers (``RAY_RAYLET_PID``,
``RAY_JOB_ID``, ``PYTHONBREAKPOINT=ray.util.rpdb.set_trace``,
``OMP_NUM_THREADS=1`` for a worker without CPUs, ``SPT_NOENV``, ...), and
the raylet's own holds the head's auth token and mark. A unit inherits
none of it: a vLLM with one OpenMP thread, a breakpoint that opens Ray's
debugger, or a mark that makes ``head.stop_head`` take the unit for part
of the head would all be surprises. What the unit's own ``environment``
names still passes: the agent applies it last.
"""

from __future__ import annotations

from collections.abc import Mapping

import psutil

from .head import MARK_VAR as HEAD_MARK

RAY_PREFIX = "RAY_"
RAY_BREAKPOINT = "ray.util.rpdb.set_trace"
# What Ray sets on every worker, for when the raylet's environment cannot
# be read to tell.
_WORKER_ONLY = ("SPT_NOENV", "OMP_NUM_THREADS")


def unit_env_fix(
    worker: Mapping[str, str], node: Mapping[str, str] | None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """``(unset, restore)``: the names a unit must not inherit from ``worker``
    (an agent's environment), and the node's values to give back instead.

    ``node`` is the raylet's environment (None: unreadable); a name whose
    value differs there was set by Ray for its worker. ``unset`` takes the
    forms of `SpawnRequest.unset_env` ("RAY_*" is a prefix).
    """
    unset = {f"{RAY_PREFIX}*", HEAD_MARK}
    if worker.get("PYTHONBREAKPOINT") == RAY_BREAKPOINT:
        unset.add("PYTHONBREAKPOINT")
    restore: dict[str, str] = {}
    if node is None:
        unset.update(key for key in _WORKER_ONLY if key in worker)
    else:
        for key in worker.keys() | node.keys():
            if key.startswith(RAY_PREFIX) or key == HEAD_MARK:
                continue
            if worker.get(key) != node.get(key):
                unset.add(key)
                if key in node:
                    restore[key] = node[key]
    if restore.get("PYTHONBREAKPOINT") == RAY_BREAKPOINT:
        del restore["PYTHONBREAKPOINT"]
    return tuple(sorted(unset)), restore


def raylet_env(worker: Mapping[str, str]) -> dict[str, str] | None:
    """The environment of the raylet that started this worker, or None."""
    try:
        return psutil.Process(int(worker["RAY_RAYLET_PID"])).environ()
    except (KeyError, ValueError, psutil.Error, OSError):
        return None
