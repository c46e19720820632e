"""Durations in unit files: seconds as a number, or a string with a unit.

``10``, ``0.5``, ``"500ms"``, ``"2s"``, ``"1.5m"``, ``"1h"``, ``"250us"``
(also ``"250µs"``). One number and one unit per string; no sign, so
negative durations cannot be written. The result is always float seconds,
at most :data:`MAX_SECONDS`: a longer timeout or delay is a typo, and event
loops refuse deadlines that far away (or overflow converting them).
"""

from __future__ import annotations

import math
import re

from .errors import Invalid, describe, short_int, show

MAX_SECONDS = 365 * 24 * 3600.0  # one year
UNIT_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

# ASCII: \d would otherwise take fullwidth and Arabic-Indic digits (and float()
# would read them).
# The sign is matched only so that "-5s" gets the "negative" message rather
# than the generic one.
_DURATION = re.compile(
    r"\s*(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>us|µs|ms|s|m|h)\s*", re.ASCII
)

EXPECTED = 'a duration (seconds as a number, or a string like "500ms" or "2m")'


def parse_duration(value: object) -> float:
    """Seconds from a TOML duration value; raises :class:`Invalid` otherwise."""
    if isinstance(value, bool):  # TOML true is not 1 second
        raise Invalid(f"expected {EXPECTED}, got a boolean ({show(value)})")
    if isinstance(value, int):
        # Compared as an integer: float() overflows on one of 400 digits.
        seconds = -1.0 if value < 0 else math.inf if value > MAX_SECONDS else float(value)
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise Invalid(f"expected a finite duration, got {show(value)}")
        seconds = value
    elif isinstance(value, str):
        seconds = _parse_string(value)  # may be infinite: "1000…000s"
    else:
        raise Invalid(f"expected {EXPECTED}, got {describe(value)}")
    if seconds < 0:
        raise Invalid(f"a duration must not be negative, got {_short(value)}")
    if seconds > MAX_SECONDS:
        limit = f"{MAX_SECONDS:g}s"
        raise Invalid(f"a duration must be at most one year ({limit}), got {_short(value)}")
    return seconds


def _short(value: object) -> str:
    """The value for a message, cut short: it may have thousands of digits."""
    if isinstance(value, int):
        return short_int(value)
    text = show(value)
    return text if len(text) <= 40 else f"{text[:20]}…{text[-10:]}"


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
