"""Sending entries to journald over its native protocol, without libsystemd.

An entry is one datagram of fields (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/):
``KEY=value\\n``, or ``KEY\\n<u64 little-endian length><value>\\n`` when the
value holds a newline. An entry too big for a datagram goes in a sealed
memfd whose descriptor is sent alone (SCM_RIGHTS, empty payload).

The socket is non-blocking, and a unit's output never waits on journald:
when journald's queue is full (only 10 datagrams by default,
net.unix.max_dgram_qlen), entries wait in a bounded backlog that
`JournalSender.run_backlog` sends as journald takes them; past the bound
they are dropped and counted. Any thread may send (the daemon logs its
own events from worker threads too): a lock keeps the order, and an
eventfd, not an event of the loop, wakes the backlog's sender.

`UnitOutputForwarder` turns a unit's log chunks into one entry per line,
with ``SYSLOG_IDENTIFIER=<unit>`` and the ``DYNSUP_*`` fields.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import anyio

from ..agent_api import LogChunk

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# Unit output goes in at "info" whatever the stream, as systemd does for a
# service's stdout and stderr (SyslogLevel=info): many programs log all
# their routine messages to stderr, and `journalctl -p err` would drown.
# DYNSUP_STREAM tells the streams apart.
UNIT_OUTPUT_PRIORITY = 6

# journald's own limit for a line of a stream (LineMax=48K); a longer line
# is cut into pieces of this size.
MAX_LINE = 48 * 1024

# Bigger entries go by memfd without trying a datagram: how big a datagram
# may be depends on the host's wmem_max, and a huge one would fill the
# socket buffer that the next lines need. (EMSGSIZE falls back too.)
MEMFD_THRESHOLD = 200 * 1024
# Room for bursts of lines; the kernel caps it at wmem_max.
_SNDBUF = 8 << 20
# What may wait for journald (the rate limit keeps a unit far below it).
_BACKLOG_BYTES = 8 << 20
_FIELD_NAME_MAX = 64  # journald rejects longer field names
_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
# Fields the caller of send() may not override through `fields`.
_RESERVED = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"})
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

FieldValue = str | int | bytes


def field_name(key: str) -> str | None:
    """A valid journal field name for key, or None when nothing is left of it.

    Upper-cased, other characters become ``_``, leading underscores (trusted
    fields journald sets itself) are stripped, a leading digit gets ``F``.
    """
    name = _INVALID_FIELD_CHARS.sub("_", key.upper()).lstrip("_")
    if name[:1].isdigit():
        name = "F" + name
    return name[:_FIELD_NAME_MAX] or None


def _value_bytes(value: FieldValue) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def encode_entry(fields: Iterable[tuple[str, FieldValue]]) -> bytes:
    """The native-protocol payload for fields whose names are already valid."""
    parts: list[bytes] = []
    for key, value in fields:
        name = key.encode("ascii")
        data = _value_bytes(value)
        if b"\n" in data:
            parts += [name, b"\n", struct.pack("<Q", len(data)), data, b"\n"]
        else:
            parts += [name, b"=", data, b"\n"]
    return b"".join(parts)


def journal_is_live(path: str = JOURNAL_SOCKET) -> bool:
    """Whether a journald listens on path (a stale socket file refuses connect)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


@dataclass(frozen=True)
class JournalStatistics:
    sent: int
    dropped: int  # journald's queue and the backlog were full: dropped, never waited for
    failed: int  # other errors, e.g. journald went away
    backlog: int  # entries waiting for journald to take them


class JournalSender:
    """A non-blocking sender of native-protocol entries to one journald socket."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        # Not connected: each datagram is addressed, so a restarted journald
        # (a new socket at the same path) is reached without reopening.
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        # Best effort: the kernel default still works, big entries go by memfd.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        self._sent = 0
        self._dropped = 0
        self._failed = 0
        # Invariant: while the backlog is not empty, new entries join it, so
        # journald gets them in order. Both hold under _lock: senders on
        # other threads than the loop's.
        self._lock = threading.Lock()
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        # Written when the backlog gets its first entry: wakes run_backlog
        # from any thread (an anyio.Event may only be set on its loop).
        self._queued = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @classmethod
    def open(cls, path: str = JOURNAL_SOCKET) -> JournalSender | None:
        """A sender for path, or None when no journald listens there."""
        return cls(path) if journal_is_live(path) else None

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            os.close(self._queued)
        self._queued = -1

    def __enter__(self) -> JournalSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def statistics(self) -> JournalStatistics:
        return JournalStatistics(
            sent=self._sent, dropped=self._dropped, failed=self._failed, backlog=len(self._backlog)
        )

    def send(
        self,
        message: str | bytes,
        *,
        priority: int,
        identifier: str,
        fields: Mapping[str, FieldValue] | None = None,
    ) -> bool:
        """Send one entry; returns whether journald got it. Never blocks, never raises.

        Field names are sanitised (`field_name`); ``fields`` cannot override
        MESSAGE, PRIORITY or SYSLOG_IDENTIFIER.
        """
        items: list[tuple[str, FieldValue]] = [
            ("MESSAGE", message),
            ("PRIORITY", priority),
            ("SYSLOG_IDENTIFIER", identifier),
        ]
        for key, value in (fields or {}).items():
            name = field_name(key)
            if name is not None and name not in _RESERVED:
                items.append((name, value))
        return self.send_payload(encode_entry(items))

    def send_payload(self, payload: bytes) -> bool:
        """Send an encoded entry: a datagram, or a memfd when it is too big for one."""
        with self._lock:
            if len(payload) > MEMFD_THRESHOLD:
                return self._send_memfd(payload)
            if self._backlog:
                return self._enqueue(payload)
            try:
                self._sock.sendto(payload, self.path)
            except BlockingIOError:
                return self._enqueue(payload)
            except OSError as e:
                if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    self._failed += 1
                    return False
                return self._send_memfd(payload)
            self._sent += 1
            return True

    def _enqueue(self, payload: bytes) -> bool:
        """Under _lock."""
        if self._backlog_bytes + len(payload) > _BACKLOG_BYTES:
            self._dropped += 1
            return False
        if not self._backlog:
            with contextlib.suppress(OSError):  # closed, or already at its maximum
                os.eventfd_write(self._queued, 1)
        self._backlog.append(payload)
        self._backlog_bytes += len(payload)
        return True

    async def run_backlog(self) -> None:
        """Send the backlog as journald takes it; runs as long as the sender is used."""
        while True:
            if not self._send_backlog():
                await self._wait_journald()
                continue
            await anyio.wait_readable(self._queued)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._queued)

    def _send_backlog(self) -> bool:
        """Send the backlog in order; False when journald's queue is full again."""
        with self._lock:
            while self._backlog:
                payload = self._backlog[0]
                try:
                    self._sock.sendto(payload, self.path)
                except BlockingIOError:
                    return False
                except OSError:
                    self._failed += 1
                else:
                    self._sent += 1
                self._backlog.popleft()
                self._backlog_bytes -= len(payload)
        return True

    async def _wait_journald(self) -> None:
        """Until journald's queue has room: a connected datagram socket polls
        writable only then (our own socket is unconnected, see __init__)."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
            with anyio.move_on_after(1.0):  # a journald that restarted: try the new one
                await anyio.wait_writable(probe)
        except OSError:
            await anyio.sleep(0.1)  # journald is away: try again soon
        finally:
            probe.close()

    def _send_memfd(self, payload: bytes) -> bool:
        try:
            fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            self._failed += 1
            return False
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            # journald accepts only a memfd sealed against any change.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([], rights, 0, self.path)
        except BlockingIOError:
            self._dropped += 1
            return False
        except OSError:
            self._failed += 1
            return False
        finally:
            os.close(fd)  # journald holds its own reference once sent
        self._sent += 1
        return True


class LineSplitter:
    """Cuts a byte stream into lines, holding an unfinished last line until more comes.

    Lines come without their newline; one longer than ``max_line`` is cut
    into pieces of ``max_line`` bytes, so the held part stays bounded.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._partial = bytearray()

    @property
    def pending(self) -> bytes:
        return bytes(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        """The lines data completes."""
        self._partial += data
        *lines, rest = self._partial.split(b"\n")
        out = [piece for line in lines for piece in self._cut(bytes(line))]
        # Hold at most max_line bytes of an unfinished line: whole pieces go now.
        full = (len(rest) - 1) // self.max_line * self.max_line if rest else 0
        if full:
            out += self._cut(bytes(rest[:full]))
        self._partial = rest[full:]
        return out

    def skip(self, data: bytes) -> int:
        """Like `feed`, but the lines data completes are only counted (overlong ones once)."""
        newline = data.rfind(b"\n")
        if newline < 0:
            return len(self.feed(data))  # still within one unfinished line
        count = data.count(b"\n", 0, newline) + 1
        # The unfinished line the data completes counts once, however long.
        self._partial = bytearray(data[newline + 1 :])
        pieces = self.feed(b"")  # an overlong rest is cut as feed would
        return count + len(pieces)

    def flush(self) -> bytes | None:
        """The unfinished line, if any, as a line of its own."""
        if not self._partial:
            return None
        line = bytes(self._partial)
        self._partial.clear()
        return line

    def _cut(self, line: bytes) -> list[bytes]:
        if len(line) <= self.max_line:
            return [line]
        return [line[i : i + self.max_line] for i in range(0, len(line), self.max_line)]


@dataclass(frozen=True)
class RateLimit:
    """At most ``burst`` lines of one unit per ``interval`` seconds (0: no limit).

    journald's own rule for a service (RateLimitIntervalSec=30s,
    RateLimitBurst=10000). Here it also keeps a flooding unit from taking
    the daemon's CPU: past the limit its lines are only counted, not split
    and sent, and one entry says how many were suppressed.
    """

    interval: float = 30.0
    burst: int = 10000


@dataclass(frozen=True)
class JournalSettings:
    """Where units' output goes to journald, and its rate limit: plain data, from
    the daemon to the agent that forwards (an agent process outlives a daemon,
    and the next daemon may be configured otherwise)."""

    path: str = JOURNAL_SOCKET
    rate_limit: RateLimit = RateLimit()
    node: str | None = None  # DYNSUP_NODE; None: the forwarding host's name

    @classmethod
    def from_env(cls, rate_limit: RateLimit) -> JournalSettings:
        """$DYNSUP_JOURNAL_SOCKET picks a journal namespace's socket (tests, benches)."""
        return cls(os.environ.get("DYNSUP_JOURNAL_SOCKET") or JOURNAL_SOCKET, rate_limit)


@dataclass
class _Window:
    start: float
    sent: int = 0
    suppressed: int = 0


@dataclass
class _Stream:
    pid: int
    splitter: LineSplitter
    prefix: bytes  # the encoded fields every entry of this (unit, stream, pid) carries


class UnitOutputForwarder:
    """Sends units' output to journald, one entry per line.

    Keeps a `LineSplitter` per (unit, stream). An unfinished line is sent
    by `flush` (when the process exits) or when output from a new pid of
    the same stream arrives, with the pid that wrote it. Lines over a
    unit's `RateLimit` are suppressed and counted.
    """

    def __init__(
        self,
        sender: JournalSender,
        node: str | None = None,
        rate_limit: RateLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sender = sender
        self.node = node or socket.gethostname()
        self.rate_limit = rate_limit or RateLimit()
        self._clock = clock
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._windows: dict[str, _Window] = {}

    @classmethod
    def open(cls, settings: JournalSettings, node: str | None = None) -> UnitOutputForwarder | None:
        """A forwarder with its own sender, or None when no journald listens there."""
        sender = JournalSender.open(settings.path)
        if sender is None:
            return None
        return cls(sender, node=settings.node or node, rate_limit=settings.rate_limit)

    def feed(self, chunk: LogChunk) -> None:
        key = (chunk.name, chunk.stream)
        held = self._streams.get(key)
        if held is not None and held.pid != chunk.pid:
            self._flush_key(key)
            held = None
        if held is None:
            held = self._streams[key] = _Stream(
                chunk.pid, LineSplitter(), self._prefix(chunk.name, chunk.stream, chunk.pid)
            )
        allowed = self._allowance(chunk.name)
        if allowed == 0:
            # Over the limit: count the lines, keep only the unfinished one.
            self._windows[chunk.name].suppressed += held.splitter.skip(chunk.data)
            return
        lines = held.splitter.feed(chunk.data)
        if allowed is not None and len(lines) > allowed:
            self._windows[chunk.name].suppressed += len(lines) - allowed
            lines = lines[:allowed]
        for line in lines:
            self._send(held, line)
        if allowed is not None:
            self._windows[chunk.name].sent += len(lines)

    def flush(self, name: str, stream: str | None = None, pid: int | None = None) -> None:
        """Send the unfinished lines of a unit (both streams when stream is None).

        ``pid``: only what that process wrote (the pipes of a process may
        close after its successor started printing). Without ``stream``, the
        unit's rate window ends too (its tally of suppressed lines is sent),
        unless a line of another process is still held.
        """
        streams = (stream,) if stream is not None else ("stdout", "stderr")
        for s in streams:
            held = self._streams.get((name, s))
            if held is not None and (pid is None or held.pid == pid):
                self._flush_key((name, s))
        if stream is None and not any((name, s) in self._streams for s in streams):
            self._end_window(name)

    def flush_all(self) -> None:
        """Send every unfinished line and every tally (before the forwarder closes)."""
        for name in {name for name, _ in self._streams} | set(self._windows):
            self.flush(name)

    def _allowance(self, name: str) -> int | None:
        """How many more lines name may send now (None: unlimited)."""
        limit = self.rate_limit
        if limit.burst <= 0 or limit.interval <= 0:
            return None
        now = self._clock()
        window = self._windows.get(name)
        if window is None or now - window.start >= limit.interval:
            self._end_window(name)
            window = self._windows[name] = _Window(start=now)
        return max(0, limit.burst - window.sent)

    def _end_window(self, name: str) -> None:
        window = self._windows.pop(name, None)
        if window is not None and window.suppressed:
            limit = self.rate_limit
            self.sender.send(
                f"dynsup: suppressed {window.suppressed} lines of {name}'s output"
                f" (more than {limit.burst} lines in {limit.interval:g}s;"
                " all of it is in `dynsupctl tail`'s buffer while it lasts)",
                priority=4,  # warning
                identifier=name,
                fields={"DYNSUP_UNIT": name, "DYNSUP_NODE": self.node,
                        "DYNSUP_SUPPRESSED": window.suppressed},
            )  # fmt: skip

    def _flush_key(self, key: tuple[str, str]) -> None:
        held = self._streams.pop(key, None)
        if held is not None:
            line = held.splitter.flush()
            if line is not None:
                self._send(held, line)

    def _prefix(self, name: str, stream: str, pid: int) -> bytes:
        fields = {
            "PRIORITY": UNIT_OUTPUT_PRIORITY,
            "SYSLOG_IDENTIFIER": name,
            "DYNSUP_UNIT": name,
            "DYNSUP_STREAM": stream,
            "DYNSUP_PID": pid,
            "DYNSUP_NODE": self.node,
        }
        return encode_entry(fields.items())

    def _send(self, held: _Stream, line: bytes) -> None:
        # Lines hold no newline: MESSAGE=<line> is the plain form of the field.
        self.sender.send_payload(b"%sMESSAGE=%s\n" % (held.prefix, line))
