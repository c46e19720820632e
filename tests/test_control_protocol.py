"""The control socket for real: a ControlServer in-process, real Unix sockets, real clients.

Malformed input of every kind must cost the sender at most its connection,
never the server: after each case a fresh client still gets a good reply.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from structlog.testing import capture_logs

from dynsup.control import protocol
from dynsup.control.client import (
    Client,
    ConnectionLost,
    DaemonUnreachable,
)
from dynsup.control.paths import (
    UnsafeSocketDir,
    check_private_dir,
    prepare_socket_dir,
    socket_path,
)
from dynsup.control.peercred import AccessPolicy
from dynsup.control.protocol import MAX_LINE, CommandError, LogData
from dynsup.control.server import AlreadyRunning, ControlServer, Handoff, Stream

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
READ_ONLY = frozenset({"echo", "status", "count"})
# Output as a program prints it: plain text, JSON's own specials, a newline
# only, control bytes and UTF-8 cut in the middle of a character, nothing.
LOG_PIECES = [
    b"plain line\n",
    b'a "quoted" \\ tab\t\n',
    b"\n",
    b"\x1b[31mred\x00\xc3",
    b"\xa9\n",
    b"",
]


class Probe:
    """What the test handlers saw: stream generators that were closed."""

    def __init__(self) -> None:
        self.closed: dict[str, anyio.Event] = {}
        self.started: dict[str, anyio.Event] = {}

    def mark(self, table: dict[str, anyio.Event], key: str) -> None:
        table.setdefault(key, anyio.Event()).set()

    async def wait(self, table: dict[str, anyio.Event], key: str) -> None:
        await table.setdefault(key, anyio.Event()).wait()


def make_handlers(probe: Probe) -> dict[str, Any]:
    async def echo(args: dict[str, Any]) -> Any:
        return args

    async def status(args: dict[str, Any]) -> Any:
        return {"units": []}

    async def write(args: dict[str, Any]) -> Any:
        return {"written": True}

    async def boom(args: dict[str, Any]) -> Any:
        raise ValueError("boom")

    async def fail(args: dict[str, Any]) -> Any:
        raise CommandError(protocol.BAD_CONFIG, "2 errors", details=["a.toml: x", "b.toml: y"])

    async def not_json(args: dict[str, Any]) -> Any:
        return {1, 2}

    async def count(args: dict[str, Any]) -> Any:
        n = protocol.arg(args, "n", int)

        async def events() -> AsyncIterator[int]:
            for i in range(n):
                yield i

        return Stream(events(), final=lambda: {"counted": n})

    async def forever(args: dict[str, Any]) -> Any:
        key = protocol.arg(args, "key", str)

        async def events() -> AsyncIterator[str]:
            try:
                yield "first"
                probe.mark(probe.started, key)
                await anyio.sleep_forever()
            finally:
                probe.mark(probe.closed, key)

        return Stream(events())

    async def flood(args: dict[str, Any]) -> Any:
        key = protocol.arg(args, "key", str)

        async def events() -> AsyncIterator[str]:
            try:
                while True:
                    yield "x" * 65536
            finally:
                probe.mark(probe.closed, key)

        return Stream(events())

    async def stream_fails(args: dict[str, Any]) -> Any:
        async def events() -> AsyncIterator[int]:
            yield 1
            raise RuntimeError("mid-stream bug")

        return Stream(events())

    async def bad_event(args: dict[str, Any]) -> Any:
        async def events() -> AsyncIterator[Any]:
            yield 1
            yield {1, 2}  # not JSON
            yield 3

        return Stream(events())

    async def logs(args: dict[str, Any]) -> Any:
        raw = protocol.arg(args, "raw", bool, False)

        async def events() -> AsyncIterator[Any]:
            for data in LOG_PIECES:
                yield LogData(data, missed=len(data), stream="stderr", raw=raw)

        return Stream(events())

    async def handoff(args: dict[str, Any]) -> Any:
        async def serve(sock: socket.socket, request_id: Any) -> bool:
            # Another writer takes the socket: here, blocking writes of whole events.
            sock.setblocking(True)
            sock.sendall(protocol.encode_event(request_id, LogData(b"handed", 0, raw=True)))
            return True

        return Handoff({"first": True}, serve)

    return {
        "logs": logs,
        "handoff": handoff,
        "bad_event": bad_event,
        "echo": echo,
        "status": status,
        "write": write,
        "boom": boom,
        "fail": fail,
        "not_json": not_json,
        "count": count,
        "forever": forever,
        "flood": flood,
        "stream_fails": stream_fails,
    }


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short and traversable by other users: sun_path holds 108 bytes, and
    # pytest's tmp_path is both long and private (0700).
    directory = tempfile.mkdtemp(prefix="dsc-", dir="/tmp")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "ctl.sock")


@asynccontextmanager
async def running(
    path: str, probe: Probe | None = None, **kwargs: Any
) -> AsyncIterator[ControlServer]:
    server = ControlServer(
        make_handlers(probe or Probe()), path=path, read_only_verbs=READ_ONLY, **kwargs
    )
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


class Raw:
    """A byte-level client, to say what a polite client never would."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def reply(self) -> dict[str, Any]:
        with anyio.fail_after(10):
            while b"\n" not in self.buf:
                self.buf += await self.stream.receive()
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def at_eof(self) -> bool:
        with anyio.fail_after(10):
            try:
                while True:
                    self.buf += await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True


@asynccontextmanager
async def raw(path: str) -> AsyncIterator[Raw]:
    async with await anyio.connect_unix(path) as stream:
        yield Raw(stream)


async def assert_healthy(path: str) -> None:
    async with raw(path) as client:
        await client.send(b'{"id": "ok", "cmd": "echo", "args": {"ping": 1}}\n')
        assert await client.reply() == {"id": "ok", "ok": True, "result": {"ping": 1}}


# -- malformed requests -------------------------------------------------------------

MALFORMED = [
    pytest.param(b"not json\n", protocol.BAD_REQUEST, None, id="bad-json"),
    pytest.param(b"[1, 2]\n", protocol.BAD_REQUEST, None, id="array"),
    pytest.param(b'"status"\n', protocol.BAD_REQUEST, None, id="string"),
    pytest.param(b"42\n", protocol.BAD_REQUEST, None, id="number"),
    pytest.param(b"null\n", protocol.BAD_REQUEST, None, id="null"),
    pytest.param(b'{"id": 1}\n', protocol.BAD_REQUEST, 1, id="missing-cmd"),
    pytest.param(b'{"id": 2, "cmd": 5}\n', protocol.BAD_REQUEST, 2, id="cmd-not-string"),
    pytest.param(
        b'{"id": 3, "cmd": "echo", "args": [1]}\n', protocol.BAD_REQUEST, 3, id="args-array"
    ),
    pytest.param(
        b'{"id": 3, "cmd": "echo", "args": "x"}\n', protocol.BAD_REQUEST, 3, id="args-str"
    ),
    pytest.param(b'{"id": [1], "cmd": "echo"}\n', protocol.BAD_REQUEST, None, id="id-array"),
    pytest.param(b'{"id": true, "cmd": "echo"}\n', protocol.BAD_REQUEST, None, id="id-bool"),
    pytest.param(b'{"id": 1.5, "cmd": "echo"}\n', protocol.BAD_REQUEST, None, id="id-float"),
    pytest.param(b'{"id": 4, "cmd": "nope"}\n', protocol.UNKNOWN_COMMAND, 4, id="unknown-verb"),
    pytest.param(b'{"v": 2, "id": 5, "cmd": "echo"}\n', protocol.BAD_VERSION, 5, id="v2"),
    pytest.param(b'{"v": "1", "id": 6, "cmd": "echo"}\n', protocol.BAD_REQUEST, 6, id="v-str"),
    pytest.param(b"\x00\x01\xff\xfe garbage\n", protocol.BAD_REQUEST, None, id="binary"),
    pytest.param(b"\xc3\x28\n", protocol.BAD_REQUEST, None, id="invalid-utf8"),
    pytest.param(b"\x00\n", protocol.BAD_REQUEST, None, id="nul"),
    pytest.param(b"\n", protocol.BAD_REQUEST, None, id="only-newline"),
    pytest.param(b" \t\r\n", protocol.BAD_REQUEST, None, id="blank"),
    pytest.param(b"[" * 200_000 + b"\n", protocol.BAD_REQUEST, None, id="nested-deep"),
    pytest.param(
        b'{"id": 7, "cmd": "echo", "args": {"x": NaN}}\n', protocol.BAD_REQUEST, None, id="nan"
    ),
    pytest.param(
        '{"id": 8, "cmd": "echo"}'.encode("utf-16") + b"\n", protocol.BAD_REQUEST, None, id="utf16"
    ),
    pytest.param(b'{"cmd": "echo"}{"cmd": "echo"}\n', protocol.BAD_REQUEST, None, id="two-objects"),
    pytest.param(
        b'{"id": 9, "cmd": "count", "args": {"n": "x"}}\n', protocol.BAD_ARGUMENTS, 9, id="bad-arg"
    ),
    pytest.param(b'{"id": 10, "cmd": "fail"}\n', protocol.BAD_CONFIG, 10, id="command-error"),
    pytest.param(b'{"id": 11, "cmd": "not_json"}\n', protocol.INTERNAL, 11, id="result-not-json"),
]


@pytest.mark.parametrize(("line", "code", "request_id"), MALFORMED)
async def test_malformed_request_gets_an_error_and_the_connection_goes_on(
    sock_path: str, line: bytes, code: str, request_id: Any
) -> None:
    async with running(sock_path):
        async with raw(sock_path) as client:
            await client.send(line)
            reply = await client.reply()
            assert reply["ok"] is False and reply["error"]["code"] == code, reply
            assert reply["id"] == request_id
            assert reply["error"]["message"]
            # The same connection serves the next line.
            await client.send(b'{"id": 99, "cmd": "echo", "args": {}}\n')
            assert await client.reply() == {"id": 99, "ok": True, "result": {}}
        await assert_healthy(sock_path)


async def test_error_details_reach_the_client(sock_path: str) -> None:
    async with running(sock_path), raw(sock_path) as client:
        await client.send(b'{"id": 1, "cmd": "fail"}\n')
        reply = await client.reply()
    assert reply["error"] == {
        "code": "BAD_CONFIG",
        "message": "2 errors",
        "details": ["a.toml: x", "b.toml: y"],
    }


async def test_v1_and_no_id_are_accepted(sock_path: str) -> None:
    async with running(sock_path), raw(sock_path) as client:
        await client.send(b'{"v": 1, "cmd": "echo"}\n')
        assert await client.reply() == {"id": None, "ok": True, "result": {}}


async def test_oversized_line_gets_too_large_then_disconnect(sock_path: str) -> None:
    async with running(sock_path):
        async with raw(sock_path) as client:
            body = b'{"id": 1, "cmd": "echo", "args": {"x": "' + b"a" * (2 << 20) + b'"}}\n'
            # Send from a task: the server stops reading mid-line, so send may fail.
            async with anyio.create_task_group() as tg:

                async def push() -> None:
                    with suppress(anyio.BrokenResourceError, OSError):
                        await client.send(body)

                tg.start_soon(push)
                reply = await client.reply()
            assert reply["error"]["code"] == protocol.TOO_LARGE
            assert await client.at_eof()
        await assert_healthy(sock_path)


async def test_oversized_line_without_newline_is_caught_before_its_end(sock_path: str) -> None:
    async with running(sock_path):
        async with raw(sock_path) as client:
            await client.send(b"x" * (MAX_LINE + 1))
            assert (await client.reply())["error"]["code"] == protocol.TOO_LARGE
            assert await client.at_eof()
        await assert_healthy(sock_path)


async def test_line_at_the_limit_is_served(sock_path: str) -> None:
    head, tail = b'{"id": 1, "cmd": "echo", "args": {"x": "', b'"}}'
    line = head + b"a" * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(line) == MAX_LINE
    async with running(sock_path), raw(sock_path) as client:
        await client.send(line + b"\n")
        reply = await client.reply()
    assert reply["ok"] and len(reply["result"]["x"]) == MAX_LINE - len(head) - len(tail)


async def test_half_line_then_disconnect_is_dropped_silently(sock_path: str) -> None:
    async with running(sock_path):
        async with raw(sock_path) as client:
            await client.send(b'{"id": 1, "cmd": "ec')
        await assert_healthy(sock_path)


async def test_connect_and_close(sock_path: str) -> None:
    async with running(sock_path):
        for _ in range(20):
            async with raw(sock_path):
                pass
        await assert_healthy(sock_path)


async def test_half_closed_client_still_gets_its_replies(sock_path: str) -> None:
    """Like `socat`: send, shut the write side, read."""
    async with running(sock_path), raw(sock_path) as client:
        await client.send(b'{"id": 1, "cmd": "echo"}\n{"id": 2, "cmd": "echo"}\n')
        await client.stream.send_eof()
        assert (await client.reply())["id"] == 1
        assert (await client.reply())["id"] == 2
        assert await client.at_eof()


async def test_pipelined_requests_are_answered_in_order(sock_path: str) -> None:
    lines = b"".join(
        json.dumps({"id": i, "cmd": "echo", "args": {"i": i}}).encode() + b"\n" for i in range(100)
    )
    async with running(sock_path), raw(sock_path) as client:
        await client.send(lines)  # one write: many requests in one read
        replies = [await client.reply() for _ in range(100)]
    assert [r["id"] for r in replies] == list(range(100))
    assert all(r["result"] == {"i": r["id"]} for r in replies)


async def test_handler_bug_is_internal_logged_and_survived(sock_path: str) -> None:
    async with running(sock_path):
        with capture_logs() as logs:
            async with raw(sock_path) as client:
                await client.send(b'{"id": 1, "cmd": "boom"}\n')
                reply = await client.reply()
                assert reply["error"]["code"] == protocol.INTERNAL
                assert "ValueError: boom" in reply["error"]["message"]
                await client.send(b'{"id": 2, "cmd": "echo"}\n')
                assert (await client.reply())["ok"]
        await assert_healthy(sock_path)
    failures = [e for e in logs if e["event"] == "control.handler_failed"]
    assert len(failures) == 1 and failures[0]["cmd"] == "boom"
    assert isinstance(failures[0]["exc_info"], ValueError)


async def test_stream_sends_events_then_result(sock_path: str) -> None:
    async with running(sock_path), raw(sock_path) as client:
        await client.send(b'{"id": "s", "cmd": "count", "args": {"n": 3}}\n')
        replies = [await client.reply() for _ in range(4)]
    assert replies == [
        {"id": "s", "ok": True, "event": 0},
        {"id": "s", "ok": True, "event": 1},
        {"id": "s", "ok": True, "event": 2},
        {"id": "s", "ok": True, "result": {"counted": 3}},
    ]


async def test_stream_that_fails_ends_with_internal(sock_path: str) -> None:
    async with running(sock_path), raw(sock_path) as client:
        await client.send(b'{"id": 1, "cmd": "stream_fails"}\n')
        assert (await client.reply())["event"] == 1
        assert (await client.reply())["error"]["code"] == protocol.INTERNAL
        await client.send(b'{"id": 2, "cmd": "echo"}\n')
        assert (await client.reply())["ok"]


async def test_stream_event_that_is_not_json_ends_the_stream_with_internal(sock_path: str) -> None:
    async with running(sock_path), raw(sock_path) as client:
        await client.send(b'{"id": 1, "cmd": "bad_event"}\n{"id": 2, "cmd": "echo"}\n')
        assert (await client.reply())["event"] == 1
        assert (await client.reply())["error"]["code"] == protocol.INTERNAL
        assert await client.reply() == {"id": 2, "ok": True, "result": {}}


async def test_disconnect_mid_stream_closes_the_generator(sock_path: str) -> None:
    probe = Probe()
    async with running(sock_path, probe):
        async with raw(sock_path) as client:
            await client.send(b'{"id": 1, "cmd": "forever", "args": {"key": "a"}}\n')
            assert (await client.reply())["event"] == "first"
            with anyio.fail_after(5):
                await probe.wait(probe.started, "a")
        with anyio.fail_after(5):
            await probe.wait(probe.closed, "a")  # its finally ran
        await assert_healthy(sock_path)


async def test_client_that_does_not_read_is_dropped(sock_path: str) -> None:
    probe = Probe()
    async with running(sock_path, probe, send_timeout=0.5):
        async with raw(sock_path) as client:
            await client.send(b'{"id": 1, "cmd": "flood", "args": {"key": "f"}}\n')
            # Never read. Meanwhile others are served, and then the flood is cut off.
            await assert_healthy(sock_path)
            with anyio.fail_after(10):
                await probe.wait(probe.closed, "f")
        await assert_healthy(sock_path)


async def test_two_hundred_clients_at_once(sock_path: str) -> None:
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        async with raw(sock_path) as client:
            await client.send(
                json.dumps({"id": i, "cmd": "echo", "args": {"i": i}}).encode() + b"\n"
            )
            results[i] = (await client.reply())["result"]["i"]

    async with running(sock_path):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
    assert results == {i: i for i in range(200)}


async def test_shutting_down_refuses_writes_only(sock_path: str) -> None:
    async with running(sock_path) as server, raw(sock_path) as client:
        server.begin_shutdown()
        await client.send(b'{"id": 1, "cmd": "write"}\n{"id": 2, "cmd": "status"}\n')
        assert (await client.reply())["error"]["code"] == protocol.SHUTTING_DOWN
        assert (await client.reply())["result"] == {"units": []}


# -- protocol helpers and socket paths --------------------------------------------------


def test_arg_checks_types_and_never_takes_bool_for_int() -> None:
    args = {"n": 3, "flag": True, "names": ["a"], "bad": [1]}
    assert protocol.arg(args, "n", int) == 3
    assert protocol.arg(args, "missing", int, 7) == 7
    assert protocol.names_arg(args) == ["a"] and protocol.names_arg({}) == []
    for call in (
        lambda: protocol.arg(args, "flag", int),
        lambda: protocol.arg(args, "missing", int),
        lambda: protocol.names_arg(args, "bad"),
    ):
        with pytest.raises(CommandError) as info:
            call()
        assert info.value.code == protocol.BAD_ARGUMENTS


def test_socket_path_order() -> None:
    env = {
        "DYNSUP_SOCKET": "/a.sock",
        "RUNTIME_DIRECTORY": "/run/dynsup:/run/other",
        "XDG_RUNTIME_DIR": "/run/user/1000",
    }

    def path(environ: dict[str, str], uid: int = 1000, explicit: str | None = None) -> str:
        return socket_path(explicit, environ=environ, uid=uid)

    assert path(env, explicit="/flag.sock") == "/flag.sock"
    assert path(env) == "/a.sock"
    env.pop("DYNSUP_SOCKET")
    assert path(env) == "/run/dynsup/dynsup.sock"
    env.pop("RUNTIME_DIRECTORY")
    assert path(env) == "/run/user/1000/dynsup/dynsup.sock"
    assert path(env, uid=0) == "/run/dynsup/dynsup.sock"
    assert path({}, uid=4242) == "/tmp/dynsup-4242/dynsup.sock"


def test_tmp_socket_dir_must_be_private(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o755)
    with pytest.raises(UnsafeSocketDir):
        check_private_dir(sock_dir, os.geteuid())
    os.chmod(sock_dir, 0o700)
    check_private_dir(sock_dir, os.geteuid())
    with pytest.raises(UnsafeSocketDir):
        check_private_dir(sock_dir, os.geteuid() + 1)  # someone else's


def test_socket_dir_writable_by_others_is_refused(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o777)
    with pytest.raises(UnsafeSocketDir, match="writable"):
        prepare_socket_dir(os.path.join(sock_dir, "s.sock"))
    nested = os.path.join(sock_dir, "new", "s.sock")
    os.chmod(sock_dir, 0o755)
    prepare_socket_dir(nested)
    assert stat.S_IMODE(os.stat(os.path.dirname(nested)).st_mode) == 0o700


# -- the socket file -------------------------------------------------------------


async def test_socket_is_0600_and_removed_on_exit(sock_path: str) -> None:
    async with running(sock_path):
        info = os.stat(sock_path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert not os.path.exists(sock_path)
    # The lock file stays (unlinking a lock file lets two holders exist); harmless.
    assert os.path.exists(sock_path + ".lock")


async def test_group_socket_is_0660_and_group_owned(sock_path: str) -> None:
    gid = grp.getgrnam("daemon").gr_gid if _group_exists("daemon") else os.getegid()
    async with running(sock_path, access=AccessPolicy(group=gid)):
        info = os.stat(sock_path)
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == gid


async def test_stale_socket_file_is_replaced(sock_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays, nobody listens: a crashed daemon's leftover
    async with running(sock_path):
        await assert_healthy(sock_path)


async def test_live_daemon_means_already_running(sock_path: str) -> None:
    async with running(sock_path):
        with pytest.raises(AlreadyRunning):
            await ControlServer({}, path=sock_path).serve()
        await assert_healthy(sock_path)  # and the first one was not disturbed


async def test_bind_first_raises_already_running_unwrapped(sock_path: str) -> None:
    first = ControlServer(make_handlers(Probe()), path=sock_path)
    await first.bind()
    try:
        with pytest.raises(AlreadyRunning):
            await ControlServer({}, path=sock_path).bind()
        async with anyio.create_task_group() as tg:
            await tg.start(first.serve)  # serves on the socket bind() took
            await assert_healthy(sock_path)
            tg.cancel_scope.cancel()
    finally:
        first.close()
    assert not os.path.exists(sock_path)
    second = ControlServer({}, path=sock_path)
    await second.bind()  # the lock was released
    second.close()


async def test_foreign_listener_means_already_running(sock_path: str) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(sock_path)
        other.listen(1)
        with pytest.raises(AlreadyRunning):
            await ControlServer({}, path=sock_path).serve()
        assert os.path.exists(sock_path)
    finally:
        other.close()


async def test_regular_file_at_the_path_is_not_removed(sock_path: str) -> None:
    Path(sock_path).write_text("precious")
    with pytest.raises(FileExistsError):
        await ControlServer({}, path=sock_path).serve()
    assert Path(sock_path).read_text() == "precious"


# -- the synchronous client --------------------------------------------------------


async def test_log_events_raw_or_escaped_reach_the_client_as_printed(sock_path: str) -> None:
    def conversation() -> None:
        with Client(sock_path, timeout=10) as client:
            for raw in (False, True):
                events = list(client.stream("logs", {"raw": raw}))
                assert [e["missed"] for e in events] == [len(p) for p in LOG_PIECES]
                assert {e["stream"] for e in events} == {"stderr"}
                if raw:  # the bytes as printed
                    assert [bytes(e["bytes"]) for e in events] == LOG_PIECES
                else:  # text (a character cut across two events is replaced in each)
                    want = [p.decode("utf-8", "replace") for p in LOG_PIECES]
                    assert [e["data"] for e in events] == want
                assert all("size" not in e for e in events)
            # The connection is still in step after raw bytes.
            assert client.call("echo", {"after": True}) == {"after": True}
            # A handed-off stream: the first event from the server, the rest from
            # the other writer, then the server's result; the connection goes on.
            replies = client.stream("handoff")
            assert [e.get("bytes", e) for e in replies] == [{"first": True}, b"handed"]
            assert replies.result is None
            assert client.call("echo", {"after": 2}) == {"after": 2}

    async with running(sock_path):
        await anyio.to_thread.run_sync(conversation)


async def test_client_call_stream_and_errors(sock_path: str) -> None:
    def conversation() -> None:
        with Client(sock_path, timeout=10) as client:
            assert client.call("echo", {"a": [1, "é"]}) == {"a": [1, "é"]}
            replies = client.stream("count", {"n": 3})
            assert list(replies) == [0, 1, 2]
            assert replies.result == {"counted": 3}
            with pytest.raises(CommandError) as info:
                client.call("fail")
            assert info.value.code == "BAD_CONFIG" and info.value.details == [
                "a.toml: x",
                "b.toml: y",
            ]
            # A stream abandoned midway must not answer the next request.
            forever = iter(client.stream("forever", {"key": "c"}))
            assert next(forever) == "first"
            assert client.call("echo", {"after": True}) == {"after": True}

    async with running(sock_path):
        await anyio.to_thread.run_sync(conversation)


async def test_client_times_out_on_a_silent_daemon(sock_path: str) -> None:
    def silent() -> None:
        with Client(sock_path, timeout=0.3) as client, pytest.raises(ConnectionLost):
            client.call("forever", {"key": "t"})

    async with running(sock_path):
        await anyio.to_thread.run_sync(silent)


def test_client_reports_unreachable_daemon(sock_path: str) -> None:
    with pytest.raises(DaemonUnreachable, match="no such socket"):
        Client(sock_path).call("echo")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()
    with pytest.raises(DaemonUnreachable, match="refused"):
        Client(sock_path).call("echo")


# -- dynsupctl as a process ------------------------------------------------------------


def ctl_handlers() -> dict[str, Any]:
    async def status(args: dict[str, Any]) -> Any:
        names = protocol.names_arg(args)
        if "ghost" in names:
            raise CommandError(protocol.BAD_NAME, "no such unit: ghost", details=["ghost"])
        return {
            "units": [
                {"name": "etcd", "state": "RUNNING", "pid": 41, "uptime": 184, "restarts": 0},
                {
                    "name": "worker-0",
                    "state": "FATAL",
                    "exit_status": "exit status 1",
                    "reason": "exit status 1; start limit",
                    "restarts": 5,
                    "pid": None,
                },
            ]
        }

    async def version(args: dict[str, Any]) -> Any:
        return {"version": "9.9.9", "protocol": 1}

    async def tail(args: dict[str, Any]) -> Any:
        async def events() -> AsyncIterator[dict[str, Any]]:
            yield {"data": "hello\n", "missed": 0}
            await anyio.sleep_forever()

        return Stream(events())

    return {"status": status, "version": version, "tail": tail}


async def run_ctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "dynsup.ctl", *args], check=False, cwd=REPO
    )


async def test_ctl_against_a_real_server(sock_path: str) -> None:
    server = ControlServer(ctl_handlers(), path=sock_path, read_only_verbs=frozenset())
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        status = await run_ctl("--socket", sock_path, "status")
        assert status.returncode == 3, status.stderr
        lines = status.stdout.decode().splitlines()
        assert lines[0].split() == ["etcd", "RUNNING", "pid", "41,", "uptime", "0:03:04"]
        assert lines[1].startswith("worker-0  FATAL")
        unknown = await run_ctl("--socket", sock_path, "status", "ghost")
        assert unknown.returncode == 4 and b"ghost: ERROR (no such unit)" in unknown.stderr
        as_json = await run_ctl("--socket", sock_path, "version", "--json")
        assert json.loads(as_json.stdout) == {"version": "9.9.9", "protocol": 1}
        tg.cancel_scope.cancel()
    gone = await run_ctl("--socket", sock_path, "version")
    assert gone.returncode == 4
    assert gone.stderr.decode().startswith(f"dynsupctl: cannot reach dynsupd at {sock_path}: ")


async def test_ctl_tail_follow_ends_quietly_on_ctrl_c(sock_path: str) -> None:
    server = ControlServer(ctl_handlers(), path=sock_path, read_only_verbs=frozenset())
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        cmd = [sys.executable, "-m", "dynsup.ctl", "--socket", sock_path, "tail", "-f", "x"]
        async with await anyio.open_process(cmd, cwd=REPO) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            with anyio.fail_after(20):
                first = await proc.stdout.receive()
                assert first == b"hello\n"
                proc.send_signal(signal.SIGINT)
                assert await proc.wait() == 0
        tg.cancel_scope.cancel()


def test_ctl_imports_no_daemon_libraries() -> None:
    """dynsupctl runs in scripts: it must not pay for anyio, structlog, psutil or ray."""
    out = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "dynsup.ctl",
            "--socket",
            "/nonexistent",
            "version",
        ],
        capture_output=True,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 4
    imported = {
        line.split("|")[-1].strip() for line in out.stderr.decode().splitlines() if "|" in line
    }
    heavy = {
        m for m in imported if m.split(".")[0] in {"anyio", "structlog", "psutil", "ray", "trio"}
    }
    assert not heavy, heavy
    assert "dynsup.control.client" in imported


# -- peer credentials, as other users ------------------------------------------------

NOBODY = "dynsup-test-nobody"
READER = "dynsup-test-reader"
RO_GROUP = "dynsup-test-ro"

CLIENT_SNIPPET = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from dynsup.control.client import Client, DaemonUnreachable
    from dynsup.control.protocol import CommandError
    try:
        print(json.dumps({"ok": Client(sys.argv[2], timeout=10).call(sys.argv[3])}))
    except CommandError as exc:
        print(json.dumps({"error": exc.code}))
    except DaemonUnreachable as exc:
        print(json.dumps({"unreachable": exc.reason}))
    """
)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def other_users() -> dict[str, pwd.struct_passwd]:
    """A user in no group, and one in the read-only group (created once; we run as root)."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"):
        pytest.skip("needs root, setpriv and useradd")
    if not _group_exists(RO_GROUP):
        subprocess.run(["groupadd", "--system", RO_GROUP], check=True)
    if not _user_exists(NOBODY):
        subprocess.run(["useradd", "--system", "--no-create-home", NOBODY], check=True)
    if not _user_exists(READER):
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-G", RO_GROUP, READER], check=True
        )
    return {NOBODY: pwd.getpwnam(NOBODY), READER: pwd.getpwnam(READER)}


async def call_as(
    user: pwd.struct_passwd,
    path: str,
    verb: str,
    *,
    gid: int | None = None,
    init_groups: bool = False,
) -> dict[str, Any]:
    groups = ["--init-groups"] if init_groups else ["--clear-groups"]
    cmd = [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid if gid is None else gid}",
        *groups,
        sys.executable,
        "-c",
        CLIENT_SNIPPET,
        str(REPO),
        path,
        verb,
    ]
    done = await anyio.run_process(cmd, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


async def test_private_socket_refuses_other_users(
    sock_path: str, other_users: dict[str, pwd.struct_passwd]
) -> None:
    async with running(sock_path):
        outcome = await call_as(other_users[NOBODY], sock_path, "status")
    assert outcome == {"unreachable": "permission denied"}  # EACCES from connect()


async def test_read_only_group_is_gated_by_peer_credentials(
    sock_path: str, other_users: dict[str, pwd.struct_passwd]
) -> None:
    ro_gid = grp.getgrnam(RO_GROUP).gr_gid
    nobody, reader = other_users[NOBODY], other_users[READER]
    async with running(sock_path, access=AccessPolicy(readonly_group=ro_gid)):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o666
        # In no group: connects (0666), gets one PERMISSION_DENIED line.
        assert await call_as(nobody, sock_path, "status") == {"error": "PERMISSION_DENIED"}
        # In the read-only group by the user database (its groups cleared in the process):
        assert await call_as(reader, sock_path, "status") == {"ok": {"units": []}}
        assert await call_as(reader, sock_path, "write") == {"error": "PERMISSION_DENIED"}
        # In the read-only group by the gid it runs with:
        assert await call_as(nobody, sock_path, "status", gid=ro_gid) == {"ok": {"units": []}}
        assert await call_as(nobody, sock_path, "write", gid=ro_gid) == {
            "error": "PERMISSION_DENIED"
        }
        await assert_healthy(sock_path)


async def test_socket_group_members_may_write(
    sock_path: str, other_users: dict[str, pwd.struct_passwd]
) -> None:
    ro_gid = grp.getgrnam(RO_GROUP).gr_gid
    async with running(sock_path, access=AccessPolicy(group=ro_gid)):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        reader = other_users[READER]
        assert await call_as(reader, sock_path, "write", init_groups=True) == {
            "ok": {"written": True}
        }
        # Not in the group: the file mode already says no.
        assert await call_as(other_users[NOBODY], sock_path, "status") == {
            "unreachable": "permission denied"
        }


def test_names_given_twice_are_taken_once_in_order() -> None:
    names = protocol.names_arg({"names": ["b", "a", "b", "c", "a"]})
    assert names == ["b", "a", "c"]


def test_request_naming_more_units_than_the_cap_is_bad_arguments() -> None:
    names = [f"u{i}" for i in range(protocol.MAX_NAMES + 1)]
    with pytest.raises(CommandError) as caught:
        protocol.names_arg({"names": names})
    assert caught.value.code == protocol.BAD_ARGUMENTS
    assert f"at most {protocol.MAX_NAMES} names" in caught.value.message


def test_request_with_a_name_longer_than_a_file_name_is_bad_arguments() -> None:
    with pytest.raises(CommandError) as caught:
        protocol.names_arg({"names": ["x" * 256]})
    assert caught.value.code == protocol.BAD_ARGUMENTS
