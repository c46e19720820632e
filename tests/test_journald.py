"""The journald native protocol, against a real journald and against plain sockets."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import structlog

from dynsup.agent_api import LogChunk
from dynsup.logs import (
    JournalSender,
    LineSplitter,
    RateLimit,
    UnitOutputForwarder,
    configure_logging,
    journal_is_live,
)
from dynsup.logs.journald import MEMFD_THRESHOLD, encode_entry, field_name

from .daemon_helpers import py_command, run_dynsupd, write_unit

if TYPE_CHECKING:
    from tests.journald_fixture import Journald

# The journald fixtures, wherever else they are registered (a conftest's win).


def unique(prefix: str = "dynsup-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sender(journald: str) -> Iterator[JournalSender]:
    opened = JournalSender.open(journald)
    assert opened is not None
    with opened:
        yield opened


@pytest.fixture
def dgram_server(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for journald, which the test reads itself."""
    path = str(tmp_path / "socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    with server:
        yield path, server


# Encoding


def test_encode_entry_uses_binary_form_only_for_newlines() -> None:
    payload = encode_entry([("MESSAGE", "a\nb"), ("PRIORITY", 6), ("RAW", b"x=y")])
    assert payload == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\nPRIORITY=6\nRAW=x=y\n"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("unit", "UNIT"),
        ("my-field.x", "MY_FIELD_X"),
        ("__trusted", "TRUSTED"),
        ("9lives", "F9LIVES"),
        ("___", None),
        ("x" * 80, "X" * 64),
    ],
)
def test_field_names_are_sanitised(key: str, name: str | None) -> None:
    assert field_name(key) == name


# Line splitting


def test_line_splitter_holds_an_unfinished_line() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == [b"one"]
    assert splitter.pending == b"tw"
    assert splitter.feed(b"o\n\nthr") == [b"two", b""]
    assert splitter.flush() == b"thr"
    assert splitter.flush() is None


def test_line_splitter_cuts_long_lines() -> None:
    splitter = LineSplitter(max_line=4)
    assert splitter.feed(b"abcdefghij\nxy") == [b"abcd", b"efgh", b"ij"]
    # An unfinished line never holds more than max_line bytes.
    assert splitter.feed(b"z" * 9) == [b"xyzz", b"zzzz"]
    assert splitter.pending == b"zzz"
    assert splitter.feed(b"z\n") == [b"zzzz"]
    assert splitter.pending == b""


# Against a real journald


def test_entry_with_multiline_message_and_fields(
    sender: JournalSender, journald_instance: Journald
) -> None:
    ident = unique()
    assert sender.send(
        "first line\nsecond line",
        priority=4,
        identifier=ident,
        fields={"unit": "web", "my-field": "a=b", "__pid": 7, "MESSAGE": "ignored"},
    )
    [entry] = journald_instance.entries(ident)
    assert entry["MESSAGE"] == "first line\nsecond line"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == ident
    assert entry["UNIT"] == "web"
    assert entry["MY_FIELD"] == "a=b"
    assert entry["PID"] == "7"
    assert entry["_PID"] == str(os.getpid())  # trusted, set by journald itself
    assert sender.statistics().sent == 1


def test_one_megabyte_message_goes_by_memfd(
    sender: JournalSender, journald_instance: Journald
) -> None:
    ident = unique()
    message = "".join(f"{i:07d}\n" for i in range(128 * 1024))  # 1 MiB, many lines
    assert sender.send(message, priority=6, identifier=ident)
    [entry] = journald_instance.entries(ident)
    assert entry["MESSAGE"] == message


def test_unit_output_is_one_entry_per_line(sender: JournalSender, journald_instance: Journald):
    unit = unique("unit")
    forwarder = UnitOutputForwarder(sender, node="node-7")
    chunks = [b"line one\nline ", b"two\n\xffraw\nno newline"]
    for data in chunks:
        forwarder.feed(LogChunk(1, unit, "stderr", 4242, 0, data, 0.0))
    forwarder.flush(unit)
    entries = journald_instance.entries(unit, count=4)
    assert [e["MESSAGE"] for e in entries] == [
        "line one",
        "line two",
        list(b"\xffraw"),  # not UTF-8: journalctl shows the bytes
        "no newline",  # sent by flush
    ]
    for entry in entries:
        assert entry["SYSLOG_IDENTIFIER"] == unit
        assert entry["PRIORITY"] == "6"
        assert entry["DYNSUP_UNIT"] == unit
        assert entry["DYNSUP_STREAM"] == "stderr"
        assert entry["DYNSUP_PID"] == "4242"
        assert entry["DYNSUP_NODE"] == "node-7"


@pytest.mark.parametrize("agent", ["process", "inprocess"])
def test_every_line_a_unit_prints_reaches_journald_with_its_fields(
    tmp_path: Path, journald_instance: Journald, agent: str
) -> None:
    """Through the whole daemon: pipes, rings, the agent's forwarder; both streams, in order."""
    unit = unique("unit")
    stdout_lines = 3000
    stderr_lines = stdout_lines // 100
    command = py_command(f"""
        import os, sys
        pid = os.getpid()
        out = open(1, "w", buffering=8192, closefd=False)  # block-buffered: big reads
        for i in range({stdout_lines}):
            out.write("%d out %d %s\\n" % (pid, i, "x" * (i % 300)))
            if i % 100 == 0:
                print(pid, "err", i // 100, file=sys.stderr, flush=True)
        out.flush()
    """)
    units = tmp_path / "units"
    unit_file = f"""
        [unit]
        autostart = false
        [service]
        command = {command}
        restart = "no"
        start_seconds = 0
    """
    write_unit(units, unit, unit_file)
    env = {"DYNSUP_JOURNAL_SOCKET": journald_instance.socket_path, "DYNSUP_AGENT": agent}
    with run_dynsupd(tmp_path, units, env=env) as daemon:
        assert daemon.ctl("start", "--no-wait", unit).returncode == 0
        entries = journald_instance.entries(unit, count=stdout_lines + stderr_lines)
    by_stream: dict[str, list[str]] = {"stdout": [], "stderr": []}
    pids = set()
    for entry in entries:
        assert entry["SYSLOG_IDENTIFIER"] == unit
        assert entry["DYNSUP_UNIT"] == unit
        assert entry["DYNSUP_NODE"] == socket.gethostname()
        assert entry["PRIORITY"] == "6"
        pid, rest = entry["MESSAGE"].split(" ", 1)
        assert entry["DYNSUP_PID"] == pid
        pids.add(pid)
        by_stream[entry["DYNSUP_STREAM"]].append(rest)
    assert len(pids) == 1
    assert by_stream["stdout"] == [f"out {i} {'x' * (i % 300)}" for i in range(stdout_lines)]
    assert by_stream["stderr"] == [f"err {i}" for i in range(stderr_lines)]


def test_lines_reach_journald_while_the_daemon_is_sigkilled_and_the_last_unfinished_one_at_exit(
    tmp_path: Path, journald_instance: Journald
) -> None:
    """The agent process forwards on its own: no daemon needed between a line and journald."""
    unit = unique("unit")
    go = tmp_path / "go"
    os.mkfifo(go)
    command = py_command(f"""
        import sys
        print("before the daemon died", flush=True)
        open({str(go)!r}).read()  # until the test has killed the daemon
        for i in range(5):
            print("no daemon runs", i, flush=True)
        sys.stderr.write("last words, no newline")
        sys.stderr.flush()
    """)
    units = tmp_path / "units"
    write_unit(
        units,
        unit,
        f"""
        [unit]
        autostart = false
        [service]
        command = {command}
        restart = "no"
        start_seconds = 0
        """,
    )
    env = {"DYNSUP_JOURNAL_SOCKET": journald_instance.socket_path, "DYNSUP_AGENT": "process"}
    agent = None
    try:
        with run_dynsupd(tmp_path, units, env=env) as daemon:
            started = daemon.wait_event(lambda e: e.get("event") == "agent.started")
            agent = psutil.Process(started["pid"])
            assert daemon.ctl("start", "--no-wait", unit).returncode == 0
            [first] = journald_instance.entries(unit)
            assert first["MESSAGE"] == "before the daemon died"
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(30)
            with open(go, "w") as release:  # the unit waits on the other end
                release.write("go")
            entries = journald_instance.entries(unit, count=7)
            assert daemon.proc.poll() is not None  # and no other daemon ran meanwhile
    finally:
        if agent is not None:  # left running by the SIGKILLed daemon: stop it and the unit
            agent.terminate()
            agent.wait(60)
    assert [e["MESSAGE"] for e in entries] == [
        "before the daemon died",
        *(f"no daemon runs {i}" for i in range(5)),
        "last words, no newline",  # sent when its pipe closed: the process ended
    ]
    assert [e["DYNSUP_STREAM"] for e in entries] == ["stdout"] * 6 + ["stderr"]
    assert len({e["DYNSUP_PID"] for e in entries}) == 1
    for entry in entries:
        assert entry["SYSLOG_IDENTIFIER"] == entry["DYNSUP_UNIT"] == unit
        assert entry["DYNSUP_NODE"] == socket.gethostname()


def test_a_process_s_unfinished_line_is_flushed_only_by_its_own_end(
    dgram_server: tuple[str, socket.socket],
) -> None:
    """An old process's pipes may close after its successor printed half a line."""
    path, server = dgram_server
    server.setblocking(False)
    with JournalSender(path) as sender:
        forwarder = UnitOutputForwarder(sender, node="n")
        forwarder.feed(LogChunk(1, "web", "stdout", 200, 0, b"half of the new one's", 0.0))
        forwarder.flush("web", "stdout", pid=100)  # the old process's EOF
        forwarder.flush("web", pid=100)
        with pytest.raises(BlockingIOError):
            server.recv(4096)
        forwarder.flush("web", "stdout", pid=200)
    entry = server.recv(4096)
    assert b"MESSAGE=half of the new one's\n" in entry
    assert b"DYNSUP_PID=200\n" in entry


def test_unfinished_line_keeps_the_pid_that_wrote_it(dgram_server: tuple[str, socket.socket]):
    path, server = dgram_server
    with JournalSender(path) as sender:
        forwarder = UnitOutputForwarder(sender, node="n")
        forwarder.feed(LogChunk(1, "web", "stdout", 100, 0, b"dying wor", 0.0))
        forwarder.feed(LogChunk(2, "web", "stdout", 200, 9, b"restarted\n", 0.0))
    first, second = server.recv(4096), server.recv(4096)
    assert b"MESSAGE=dying wor\n" in first
    assert b"DYNSUP_PID=100\n" in first
    assert b"MESSAGE=restarted\n" in second
    assert b"DYNSUP_PID=200\n" in second


def test_a_flooding_unit_is_rate_limited_like_journald_does(
    sender: JournalSender, journald_instance: Journald
) -> None:
    unit, quiet = unique("flood"), unique("quiet")
    now = [1000.0]
    forwarder = UnitOutputForwarder(
        sender, node="n", rate_limit=RateLimit(interval=30, burst=5), clock=lambda: now[0]
    )
    offset = 0

    def feed(name: str, data: bytes) -> None:
        nonlocal offset
        forwarder.feed(LogChunk(1, name, "stdout", 7, offset, data, 0.0))
        offset += len(data)

    feed(unit, b"".join(b"line %d\n" % i for i in range(3)))
    feed(unit, b"".join(b"line %d\n" % i for i in range(3, 8)) + b"half ")
    feed(unit, b"of a line\n" + b"more\n" * 1000)  # over the limit: only counted
    feed(quiet, b"another unit has its own budget\n")
    now[0] += 30  # a new window: the count is reported, lines flow again
    feed(unit, b"after the window\n")
    entries = journald_instance.entries(unit, count=7)
    assert [e["MESSAGE"] for e in entries] == [
        *(f"line {i}" for i in range(5)),
        f"dynsup: suppressed 1004 lines of {unit}'s output (more than 5 lines in 30s;"
        " all of it is in `dynsupctl tail`'s buffer while it lasts)",
        "after the window",
    ]
    assert entries[5]["PRIORITY"] == "4" and entries[5]["DYNSUP_SUPPRESSED"] == "1004"
    assert [e["MESSAGE"] for e in journald_instance.entries(quiet)] == [
        "another unit has its own budget"
    ]


@pytest.fixture
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_daemon_events_go_to_journald_and_stderr(
    sender: JournalSender,
    journald_instance: Journald,
    capsys: pytest.CaptureFixture[str],
    reset_structlog: None,
) -> None:
    configure_logging("json", journal=sender)
    ident_unit = unique("unit")
    with structlog.contextvars.bound_contextvars(unit=ident_unit):
        structlog.get_logger().warning("unit.backoff", pid=12, delay=1.5)
    line = json.loads(capsys.readouterr().err)
    assert line["event"] == "unit.backoff"
    assert line["unit"] == ident_unit
    assert line["level"] == "warning"
    assert "timestamp" in line

    found = [
        e for e in journald_instance.entries("dynsupd", count=1) if e.get("UNIT") == ident_unit
    ]
    if not found:  # the daemon's identifier is shared: look again for ours
        found = [
            e
            for e in journald_instance.entries("dynsupd", count=10**9, timeout=5)
            if e.get("UNIT") == ident_unit
        ]
    [entry] = found
    assert entry["PRIORITY"] == "4"
    assert entry["EVENT"] == "unit.backoff"
    assert entry["PID"] == "12"
    assert entry["DELAY"] == "1.5"
    assert entry["MESSAGE"] == f"unit.backoff pid=12 delay=1.5 unit={ident_unit}"


def test_console_format_is_key_value(
    capsys: pytest.CaptureFixture[str], reset_structlog: None
) -> None:
    configure_logging("console")
    structlog.get_logger().info("daemon.started", pid=3)
    err = capsys.readouterr().err
    assert "daemon.started" in err
    assert "pid=3" in err


# Without journald, or when it cannot keep up


def test_missing_socket_reports_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "no-such-socket")
    assert not journal_is_live(path)
    assert JournalSender.open(path) is None
    with JournalSender(path) as sender:  # journald went away after open
        assert sender.send("x", priority=6, identifier="t") is False
        assert sender.statistics().failed == 1


def test_stale_socket_file_is_not_live(tmp_path: Path) -> None:
    path = str(tmp_path / "socket")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    assert JournalSender.open(path) is None


def test_full_socket_drops_entries_without_blocking(
    dgram_server: tuple[str, socket.socket],
) -> None:
    path, _server = dgram_server  # never reads
    with JournalSender(path) as sender:
        # More than journald's queue and the backlog hold (8 MiB) together.
        results = [sender.send("x" * 1000, priority=6, identifier="t") for _ in range(10000)]
        stats = sender.statistics()
    assert results[0] is True
    assert results[-1] is False
    assert stats.dropped == results.count(False) > 0
    assert stats.sent + stats.backlog == results.count(True)
    assert stats.backlog > 0


def test_large_entry_is_a_sealed_memfd(dgram_server: tuple[str, socket.socket]) -> None:
    path, server = dgram_server
    message = "y" * (MEMFD_THRESHOLD + 1)
    with JournalSender(path) as sender:
        assert sender.send(message, priority=6, identifier="big")
    data, fds, _flags, _addr = socket.recv_fds(server, 1024, 1)
    assert data == b""
    [fd] = fds
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        assert seals & wanted == wanted
        content = os.pread(fd, 2 * MEMFD_THRESHOLD, 0)
    finally:
        os.close(fd)
    assert content == encode_entry(
        [("MESSAGE", message), ("PRIORITY", 6), ("SYSLOG_IDENTIFIER", "big")]
    )


# The daemon logs from worker threads (state writes, /proc scans) into the
# sender whose backlog is woken on the loop. Run in a child with asyncio's
# debug checks: the old wake-up (an anyio.Event set off its loop) wedged
# the loop there, so a hang must end as a failure, not hang the suite.
THREAD_LOGGING = """
import socket, sys, threading
import anyio
from dynsup.logs import JournalSender

path, count = sys.argv[1], int(sys.argv[2])

async def main() -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.setblocking(False)
    with server, JournalSender(path) as sender:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.run_backlog)
            await anyio.wait_all_tasks_blocked()  # the backlog is empty: its sender waits

            def log_in_a_thread() -> None:
                for n in range(count):
                    sender.send(f"event {n}", priority=6, identifier="dynsupd")

            await anyio.to_thread.run_sync(log_in_a_thread)
            assert sender.statistics().backlog > 0, "journald's queue never filled"
            got = []
            while len(got) < count:
                await anyio.wait_readable(server)
                got.append(server.recv(4096))
            tg.cancel_scope.cancel()
    for n, entry in enumerate(got):
        fields = dict(line.split(b"=", 1) for line in entry.splitlines())
        assert fields[b"MESSAGE"] == b"event %d" % n, (n, fields)
    print("ok")

anyio.run(main, backend_options={"debug": True})
"""


def test_a_worker_thread_logging_while_journald_is_full_wakes_the_backlog(
    tmp_path: Path,
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", THREAD_LOGGING, str(tmp_path / "journal"), "300"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0 and child.stdout == "ok\n", child.stderr[-3000:]
