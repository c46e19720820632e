"""Calls that need Ray's GCS, each with a deadline.

Ray's client calls that go through the GCS (``ray.nodes()``, named
placement groups and actors, ``ray.kill``) block while the GCS is
unreachable, for as long as Ray keeps trying to reconnect: a year, since
the daemon must outlive an outage (see ``ray_cluster.survive_gcs_outages``).
A call without a deadline would then hang the unit lifecycle that made it:
a stop would never finish, a start never fail. So every such call runs
here: in a worker thread (it cannot be interrupted; a caller that gives up
abandons the thread, which returns whenever Ray does), and turned into
`RayUnavailable` once its deadline has passed.

Calls to a live actor go straight to its worker, not through the GCS, and
are not bounded here: the agent's long-polls wait as long as they must.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from .layout import PlacementError

T = TypeVar("T")

# A GCS call takes milliseconds; seconds on a loaded machine. Past this the
# GCS is taken to be gone.
GCS_TIMEOUT = 15.0


class RayUnavailable(PlacementError):
    """A call that needs Ray's GCS got no answer in time: the GCS is down or unreachable."""


async def gcs_call(call: Callable[[], T], what: str, timeout: float = GCS_TIMEOUT) -> T:
    """``call()`` in a worker thread; `RayUnavailable` naming ``what`` after ``timeout`` s."""
    with anyio.move_on_after(timeout):
        try:
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        except Exception:
            import ray

            if not ray.is_initialized():  # between two clusters: a head restart
                raise RayUnavailable(f"Ray unavailable: {what}: not connected") from None
            raise
    raise RayUnavailable(f"Ray unavailable: {what} got no answer within {timeout:g} s")
