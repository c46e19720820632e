"""The daemon's own logging: structlog events to stderr, and to journald when asked.

Events are an event name plus fields (``log.info("unit.started", pid=12)``),
with whatever `structlog.contextvars.bound_contextvars` bound (``unit=``).
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import Processor, WrappedLogger

from .journald import JournalSender

IDENTIFIER = "dynsupd"

# syslog priorities, as journald stores them
_PRIORITY = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}
# Keys the journal gets in its own form (PRIORITY, its own timestamps).
_NOT_FIELDS = frozenset({"level", "timestamp", "exc_info", "stack_info"})


class JournalProcessor:
    """A structlog processor that also sends each event to journald, unchanged.

    MESSAGE is ``event key=value ...``; every key is also a field of its own
    (upper-cased: ``UNIT=``, ``PID=``, ``EVENT=``) for ``journalctl UNIT=x``.
    """

    def __init__(self, sender: JournalSender, identifier: str = IDENTIFIER) -> None:
        self.sender = sender
        self.identifier = identifier

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        # Format a copy: the stderr renderer downstream wants exc_info intact.
        event = structlog.processors.format_exc_info(logger, method_name, dict(event_dict))
        fields = {k: _text(v) for k, v in event.items() if k not in _NOT_FIELDS}
        pairs = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("event", "exception"))
        message = " ".join(p for p in (fields.get("event", ""), pairs) if p)
        if "exception" in fields:
            message += "\n" + fields["exception"]
        level = str(event.get("level", method_name))
        self.sender.send(
            message,
            priority=_PRIORITY.get(level, 6),
            identifier=self.identifier,
            fields=fields,
        )
        return event_dict


def _text(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


def configure_logging(
    fmt: str = "auto", journal: JournalSender | None = None, level: str = "info"
) -> None:
    """Configure structlog for the daemon.

    ``fmt``: "console" (key=value lines), "json" (one object per line) or
    "auto" (console when stderr is a terminal, else json).
    """
    if fmt not in ("auto", "console", "json"):
        raise ValueError(f"log format must be auto, console or json, got {fmt!r}")
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if journal is not None:
        processors.append(JournalProcessor(journal))
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    else:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level.lower()),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        # Not cached: tests reconfigure (capture_logs) after loggers were made.
        cache_logger_on_first_use=False,
    )
