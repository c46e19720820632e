"""Unit logs: byte-offset ring buffers, journald's native protocol, the daemon's logging."""

from .journald import (
    JOURNAL_SOCKET,
    JournalSender,
    JournalSettings,
    JournalStatistics,
    LineSplitter,
    RateLimit,
    UnitOutputForwarder,
    journal_is_live,
)
from .ring import LogStore, RingBuffer
from .structlog_setup import configure_logging

__all__ = [
    "JOURNAL_SOCKET",
    "JournalSender",
    "JournalSettings",
    "JournalStatistics",
    "LineSplitter",
    "LogStore",
    "RateLimit",
    "RingBuffer",
    "UnitOutputForwarder",
    "configure_logging",
    "journal_is_live",
]
