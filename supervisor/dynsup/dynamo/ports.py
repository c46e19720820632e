"""Ports of a stack, each assigned once.

Every model gets a block of ports from ``port_base``; the block is chosen
by a hash of the model unit's name (probing on collision) and then kept
(the daemon's state file remembers it), so adding or removing a model does
not move the ports of the others, and adding a
replica does not move the ports of the replicas before it. Within a block,
decode/aggregated workers count up from the start and prefill workers from
the middle; each worker owns a fixed stride of ports.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BLOCK = 400
# DYN_SYSTEM_PORT is read as an i16 by Dynamo 1.4.2: every worker port stays below 32768.
MAX_PORT = 32767


class PortError(ValueError):
    pass


@dataclass(frozen=True)
class WorkerPorts:
    system: int  # DYN_SYSTEM_PORT: /health
    kv_events: int  # vLLM's KV-event publisher (ZMQ)
    master: int  # torch.distributed master port of a multi-node group
    # DYN_TCP_RPC_PORT: the request plane's address that the worker advertises in
    # discovery. Known in advance, so a hung worker's records can be withdrawn.
    rpc: int
    nixl: int  # first of tp ports for VLLM_NIXL_SIDE_CHANNEL_PORT

    def all(self, tp: int) -> tuple[int, ...]:
        fixed = (self.system, self.kv_events, self.master, self.rpc)
        return (*fixed, *range(self.nixl, self.nixl + tp))


def stride(tp: int) -> int:
    return 4 + tp


def model_blocks(
    names: Iterable[str], port_base: int, previous: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The first port of each model's block.

    ``previous``: the blocks the models had before (the daemon keeps them in
    its state file). A model keeps its block while it is still valid for this
    port_base, so a new model whose hash collides with an old one's never
    pushes the old one (and its running workers) to other ports.
    """
    count = (MAX_PORT - port_base) // BLOCK
    if count < 1:
        raise PortError(f"port_base {port_base} leaves no room below {MAX_PORT}")
    names = sorted(names)
    taken: dict[int, str] = {}
    blocks: dict[str, int] = {}
    for name in names:
        index, off = divmod((previous or {}).get(name, -1) - port_base, BLOCK)
        if off == 0 and 0 <= index < count and index not in taken:
            taken[index] = name
            blocks[name] = port_base + index * BLOCK
    for name in names:
        if name in blocks:
            continue
        index = zlib.crc32(name.encode()) % count
        for _ in range(count):
            if index not in taken:
                break
            index = (index + 1) % count
        else:
            raise PortError(f"more than {count} models for the ports above {port_base}")
        taken[index] = name
        blocks[name] = port_base + index * BLOCK
    return blocks


def worker_ports(block: int, role: str, replica: int, tp: int) -> WorkerPorts:
    half = BLOCK // 2
    start = block + (half if role == "prefill" else 0)
    first = start + replica * stride(tp)
    if first + stride(tp) > start + half:
        most = half // stride(tp)
        raise PortError(f"at most {most} {role} replicas fit a model's port block (tp={tp})")
    return WorkerPorts(
        system=first, kv_events=first + 1, master=first + 2, rpc=first + 3, nixl=first + 4
    )
