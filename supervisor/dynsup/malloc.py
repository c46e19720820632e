"""glibc malloc's mmap threshold, fixed per process for how it reads unit output."""

from __future__ import annotations

import contextlib
import ctypes

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(size: int, trim: int | None = None) -> None:
    """Serve allocations of ``size`` bytes and more with mmap, smaller ones from the
    heap, and keep glibc from moving the threshold as it goes (it raises it
    after freeing a mapped chunk).

    The daemon fixes it at 128 KiB, glibc's default: unit output used to
    arrive there in chunks of up to 256 KiB, and once the threshold rose they
    came from the heap, where chunks of different lifetimes interleave: under
    a log flood its RSS grew to 200+ MiB and stayed. Mapped and unmapped
    whole, its RSS stays near 45 MiB. The agent process fixes it above its
    pipe reads (`logs.pump.BIG_READ_SIZE`), so that each read reuses heap
    memory instead of faulting in a fresh mapping; and its ``trim``
    threshold with it, or each read freed at the top of the heap would be
    given back to the kernel and faulted in again by the next.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        libc = ctypes.CDLL(None)  # this process's own symbols: no ldconfig lookup
        libc.mallopt(_M_MMAP_THRESHOLD, size)
        if trim is not None:
            libc.mallopt(_M_TRIM_THRESHOLD, trim)
