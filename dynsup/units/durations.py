"""Durations in unit files: seconds as a number, or a string with a unit.

``10``, ``0.5``, ``"500ms"``, ``"2s"``, ``"1.5m"``, ``"1h"``, ``"250us"``
(also ``"250µs"``). One number and one unit per string; no sign, so
negative durations cannot be written. The result is always float seconds.
"""

from __future__ import annotations

import math
import re

from .errors import Invalid, describe, show

UNIT_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

# The sign is matched only so that "-5s" gets the "negative" message rather
# than the generic one.
_DURATION = re.compile(r"\s*(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>us|µs|ms|s|m|h)\s*")

EXPECTED = 'a duration (seconds as a number, or a string like "500ms" or "2m")'


def parse_duration(value: object) -> float:
    """Seconds from a TOML duration value; raises :class:`Invalid` otherwise."""
    if isinstance(value, bool):  # TOML true is not 1 second
        raise Invalid(f"expected {EXPECTED}, got a boolean ({show(value)})")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_string(value)
    else:
        raise Invalid(f"expected {EXPECTED}, got {describe(value)}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise Invalid(f"expected a finite duration, got {show(value)}")
    if seconds < 0:
        raise Invalid(f"a duration must not be negative, got {show(value)}")
    return seconds


def _parse_string(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if match is None:
        raise Invalid(f"expected {EXPECTED}, got {show(text)}")
    return float(match["number"]) * UNIT_SECONDS[match["unit"]]


def parse_positive_duration(value: object) -> float:
    """Like :func:`parse_duration`, but zero is refused too (timeouts, intervals)."""
    seconds = parse_duration(value)
    if seconds == 0:
        raise Invalid(f"must be greater than 0 seconds, got {show(value)}")
    return seconds
