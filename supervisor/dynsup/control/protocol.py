"""The control protocol, version 1: one JSON object per line, both ways.

Stdlib only: the `dynsupctl` client imports this module and must start fast.

Request (``v`` and ``args`` optional; ``id`` optional, echoed back)::

    {"v": 1, "id": 7, "cmd": "status", "args": {"names": ["etcd"]}}

Replies carry the request's id (``null`` when the request had none or was
unreadable). A streaming verb first sends zero or more events, then every
request ends with exactly one final reply::

    {"id": 7, "ok": true, "event": {...}}                          # 0..n times
    {"id": 7, "ok": true, "result": {...}}                         # or:
    {"id": 7, "ok": false, "error": {"code": "BAD_NAME", "message": "...",
                                     "details": [...]}}            # details optional

Every request line gets exactly one final reply, malformed ones included,
so a client may pipeline. Replies are ASCII (non-ASCII is escaped), so a
reply can never contain a raw newline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_LINE = 1 << 20  # bytes per request line, newline excluded

# Error codes (the values travel on the wire; never rename one).
BAD_REQUEST = "BAD_REQUEST"  # not UTF-8, not JSON, not an object, missing/wrong-typed field
BAD_VERSION = "BAD_VERSION"  # "v" is not a version this daemon speaks
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"  # no such verb
BAD_ARGUMENTS = "BAD_ARGUMENTS"  # the verb's args are missing or of the wrong type
BAD_NAME = "BAD_NAME"  # no unit of that name (details: the unknown names)
NOT_RUNNING = "NOT_RUNNING"  # the unit has no process (signal, pid)
FAILED = "FAILED"  # the action was tried and did not work
BAD_CONFIG = "BAD_CONFIG"  # unit files are invalid (details: one line per error)
PERMISSION_DENIED = "PERMISSION_DENIED"  # the peer may not use this verb, or the socket
TOO_LARGE = "TOO_LARGE"  # request line over MAX_LINE; the connection is closed after it
SHUTTING_DOWN = "SHUTTING_DOWN"  # the daemon is stopping; only read verbs are served
INTERNAL = "INTERNAL"  # a bug in the daemon; it is logged there

ERROR_CODES = frozenset(
    {
        BAD_REQUEST,
        BAD_VERSION,
        UNKNOWN_COMMAND,
        BAD_ARGUMENTS,
        BAD_NAME,
        NOT_RUNNING,
        FAILED,
        BAD_CONFIG,
        PERMISSION_DENIED,
        TOO_LARGE,
        SHUTTING_DOWN,
        INTERNAL,
    }
)

RequestId = int | str | None


class CommandError(Exception):
    """A request failed; raised by handlers in the daemon, re-raised by the client.

    ``details`` is optional JSON for machines (e.g. every config error line).
    """

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return error

    @classmethod
    def from_json(cls, error: Any) -> CommandError:
        if not isinstance(error, dict):
            return cls(INTERNAL, f"malformed error reply: {error!r}")
        return cls(
            str(error.get("code", INTERNAL)),
            str(error.get("message", "")),
            error.get("details"),
        )


class Request:
    """One parsed request. (Not a dataclass: importing dataclasses costs dynsupctl ~15 ms.)"""

    __slots__ = ("args", "cmd", "id")

    def __init__(self, request_id: RequestId, cmd: str, args: dict[str, Any]) -> None:
        self.id = request_id
        self.cmd = cmd
        self.args = args

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, cmd={self.cmd!r}, args={self.args!r})"


class RequestRejected(CommandError):
    """A request line that cannot be served; carries the id when it was readable."""

    def __init__(self, code: str, message: str, request_id: RequestId = None) -> None:
        super().__init__(code, message)
        self.request_id = request_id


def _no_constants(name: str) -> Any:
    # NaN and Infinity are Python's extension, not JSON.
    raise ValueError(f"{name} is not JSON")


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, (int, str)) and not isinstance(value, bool))


def parse_request(line: bytes) -> Request:
    """Parse one request line (without its newline). Raises RequestRejected."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestRejected(BAD_REQUEST, "request is not UTF-8") from None
    if not text.strip():
        raise RequestRejected(BAD_REQUEST, "empty request")
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[…" nested too deep
        raise RequestRejected(BAD_REQUEST, f"request is not JSON: {_short(exc)}") from None
    if not isinstance(data, dict):
        raise RequestRejected(BAD_REQUEST, f"request must be an object, not {_kind(data)}")
    request_id = data.get("id")
    if not _valid_id(request_id):
        raise RequestRejected(
            BAD_REQUEST, f'"id" must be an integer or a string, not {_kind(request_id)}'
        )
    version = data.get("v", PROTOCOL_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise RequestRejected(
            BAD_REQUEST, f'"v" must be an integer, not {_kind(version)}', request_id
        )
    if version != PROTOCOL_VERSION:
        raise RequestRejected(
            BAD_VERSION,
            f"protocol version {version} is not spoken here (only {PROTOCOL_VERSION})",
            request_id,
        )
    cmd = data.get("cmd")
    if not isinstance(cmd, str):
        what = 'missing "cmd"' if cmd is None else f'"cmd" must be a string, not {_kind(cmd)}'
        raise RequestRejected(BAD_REQUEST, what, request_id)
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise RequestRejected(
            BAD_REQUEST, f'"args" must be an object, not {_kind(args)}', request_id
        )
    return Request(request_id, cmd, args)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _short(exc: BaseException) -> str:
    return str(exc)[:200] or type(exc).__name__


# -- encoding ------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line. Raises ValueError/TypeError for what JSON cannot carry."""
    return json.dumps(message, allow_nan=False, separators=(",", ":")).encode("ascii") + b"\n"


@dataclass(frozen=True)
class LogData:
    """A `tail -f` event, ``{"data": text, "missed": n}`` on the wire (and
    ``"stream"`` when one is named), kept as bytes until it is sent.

    ``raw`` (the client asked for ``"raw": true``): the line says how many
    bytes follow it, ``{"missed": n, "size": len}``, and the bytes follow
    the newline as they were printed. Else plain text is escaped with a few
    bytes.replace calls, several times faster than json.dumps (which a log
    flood would otherwise spend the daemon's CPU on).
    """

    data: bytes
    missed: int
    stream: str | None = None
    raw: bool = False

    def head(self) -> dict[str, Any]:
        head: dict[str, Any] = {"missed": self.missed}
        if self.stream is not None:
            head["stream"] = self.stream
        return head

    def as_json(self) -> dict[str, Any]:
        return {**self.head(), "data": self.data.decode("utf-8", "replace")}


# Printable ASCII, newline and tab: JSON only escapes \\, \", \n and \t of them.
_PLAIN_TEXT = bytes(range(0x20, 0x7F)) + b"\n\t"


def encode_event(request_id: RequestId, event: Any) -> bytes:
    """One event reply as a line (what `encode(event_reply(...))` gives, faster for
    LogData), or for raw LogData a line and the bytes it announces."""
    if not isinstance(event, LogData):
        return encode(event_reply(request_id, event))
    if event.raw:
        return (
            encode(event_reply(request_id, {**event.head(), "size": len(event.data)})) + event.data
        )
    if event.data.translate(None, _PLAIN_TEXT):  # control bytes or UTF-8: the general way
        return encode(event_reply(request_id, event.as_json()))
    text = (
        event.data.replace(b"\\", b"\\\\")
        .replace(b'"', b'\\"')
        .replace(b"\n", b"\\n")
        .replace(b"\t", b"\\t")
    )
    line = encode(event_reply(request_id, {**event.head(), "data": ""}))
    assert line.endswith(b'""}}\n')
    return line[:-4] + text + line[-4:]


def encode_request(request_id: RequestId, cmd: str, args: dict[str, Any] | None = None) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd, "args": args or {}})


def result_reply(request_id: RequestId, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def event_reply(request_id: RequestId, event: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "event": event}


def error_reply(request_id: RequestId, error: CommandError) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": error.to_json()}


# -- handler arguments -------------------------------------------------------

_REQUIRED: Any = object()


def arg(
    args: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _REQUIRED
) -> Any:
    """``args[key]`` checked against kind; BAD_ARGUMENTS when missing or mistyped.

    bool is never accepted for int (JSON true is not 1 here); None means absent.
    """
    value = args.get(key)
    if value is None:
        if default is _REQUIRED:
            raise CommandError(BAD_ARGUMENTS, f'missing argument "{key}"')
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise CommandError(
            BAD_ARGUMENTS, f'argument "{key}": expected {expected}, got {_kind(value)}'
        )
    return value


# Names per request: far above any real stack, low enough that checking them
# is cheap. A unit name is a file name, so it has at most 255 bytes.
MAX_NAMES = 10_000
MAX_NAME_LENGTH = 255


def names_arg(args: dict[str, Any], key: str = "names") -> list[str]:
    """A list of unit names, each once in the order given (empty or absent: all
    units, by convention of every verb)."""
    names = arg(args, key, list, [])
    if len(names) > MAX_NAMES:
        raise CommandError(
            BAD_ARGUMENTS, f'argument "{key}": at most {MAX_NAMES} names, got {len(names)}'
        )
    if not all(isinstance(name, str) and len(name) <= MAX_NAME_LENGTH for name in names):
        raise CommandError(
            BAD_ARGUMENTS,
            f'argument "{key}": expected a list of names of at most {MAX_NAME_LENGTH} characters',
        )
    return list(dict.fromkeys(names))
