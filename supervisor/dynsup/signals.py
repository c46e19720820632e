"""Signal names, one parser for every place that reads one (unit files, requests, agents)."""

from __future__ import annotations

import signal


def parse_signal(value: str | int) -> signal.Signals:
    """ "TERM", "SIGTERM", "sigterm" or 15 -> SIGTERM; ValueError for anything else.

    A bool is not a signal number (``True`` would be SIGHUP).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a signal: {value!r}")
    if isinstance(value, int):
        try:
            return signal.Signals(value)
        except ValueError:
            raise ValueError(f"not a signal number: {value}") from None
    if not isinstance(value, str):
        raise ValueError(f"not a signal: {value!r}")
    upper = value.strip().upper()
    name = upper if upper.startswith("SIG") else "SIG" + upper
    if not name[3:].isascii() or not name[3:].isalnum():
        raise ValueError(f"not a signal name: {value!r}")
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"not a signal name: {value!r}") from None
