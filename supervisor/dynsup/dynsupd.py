"""The `dynsupd` console script: the daemon, without imports it never uses.

structlog imports `rich` (and with it pygments) at its own import whenever
rich is installed, which it is wherever transformers is (through typer), for
its console renderer's pretty tracebacks. The daemon writes to journald or a
terminal and prints plain tracebacks, so rich is only weight: 4.8 MiB of the
daemon's resident memory (a seventh of it at rest) and ~60 ms of its start.
Stdlib only, so nothing is imported before the guard.
"""

from __future__ import annotations

import sys


def import_structlog_without_rich() -> None:
    """Import structlog while rich cannot be imported; later importers of rich still can."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return  # too late, or someone in this process wants rich anyway
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` fail
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def main() -> int:
    import_structlog_without_rich()
    from .daemon import main as daemon_main

    return daemon_main()
