"""`dynsupctl`: drive dynsupd over its control socket, with supervisorctl's verbs.

    dynsupctl [--socket PATH] [--json] VERB [ARGS...]

Exit codes (supervisorctl's, which are LSB's): 0 done; 1 a command failed;
2 bad usage or invalid unit files; 3 a selected unit is not running;
4 no such unit, or no daemon to ask.

Adding a verb is one entry in `VERBS`: its arguments, the request it sends
and a pure function from its result to what is printed. Stdlib only, and
no dataclasses (~15 ms to import): this runs in scripts, start-up counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TextIO

from . import __version__
from .control.client import Client, ClientError, DaemonUnreachable, ReplyStream
from .control.paths import UnsafeSocketDir, client_socket_path
from .control.protocol import BAD_CONFIG, BAD_NAME, NOT_RUNNING, CommandError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_USAGE = 2  # argparse's own
EXIT_NOT_RUNNING = 3
EXIT_UNKNOWN = 4  # no such unit, or no daemon
EXIT_INTERRUPTED = 130

READ_TIMEOUT = 30.0  # a daemon silent this long on a query is stuck
PROGRESS_AFTER = 1.0  # seconds before a start shows progress on a terminal

_ERROR_EXIT = {BAD_NAME: EXIT_UNKNOWN, BAD_CONFIG: EXIT_BAD_CONFIG, NOT_RUNNING: EXIT_NOT_RUNNING}
_STOPPED = frozenset({"STOPPED", "EXITED", "FATAL"})
_ON_THE_WAY = frozenset({"PENDING", "STARTING", "BACKOFF"})


class Output(NamedTuple):
    """What a verb prints: stdout text (as is, newlines included), exit code, stderr text."""

    text: str = ""
    code: int = EXIT_OK
    err: str = ""


class UsageError(Exception):
    pass


# -- formatting (pure) -------------------------------------------------------


def clean(text: Any) -> str:
    """Text from the daemon, safe for a terminal: a child's stderr line may hold escapes."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def trim(text: str, width: int = 120) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    if days:
        return f"{days} day{'s' if days > 1 else ''}, {clock}"
    return clock


def format_bytes(count: float | None) -> str:
    """1536 -> "1.5K", 157286400 -> "150.0M"; None -> "-"."""
    if count is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if abs(count) < 1024:
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count:.1f}T"


def format_cpu(percent: float | None) -> str:
    return "-" if percent is None else f"{percent:.1f}%"


def resource_extras(unit: dict[str, Any]) -> list[str]:
    """CPU, memory and GPU memory of a running unit's whole tree, where measured."""
    if unit.get("rss_bytes") is None:
        return []
    extras = [
        f"cpu {format_cpu(unit.get('cpu_percent'))}",
        f"mem {format_bytes(unit['rss_bytes'])}",
    ]
    if unit.get("gpus"):  # "-": no NVML here
        extras.append(f"gpu mem {format_bytes(unit.get('gpu_memory_bytes'))}")
    return extras


def describe_unit(unit: dict[str, Any], *, show_node: bool = False, last_line: bool = False) -> str:
    """The DESCRIPTION column: supervisorctl's words, plus what dynsup knows besides.

    ``last:`` is how the last process ended (a running unit that was restarted);
    the unit's last stderr line (usually an INFO line) only with ``last_line``.
    """
    state = unit.get("state")
    extras = resource_extras(unit)
    if unit.get("restarts"):
        extras.append(f"restarts {unit['restarts']}")
    if unit.get("gpus"):
        extras.append("gpus " + ",".join(str(g) for g in unit["gpus"]))
    if show_node and unit.get("node"):
        extras.append(f"node {clean(unit['node'])}")
    line = clean(unit.get("last_line") or "") if last_line else ""
    if state == "RUNNING":
        if unit.get("restarts") and unit.get("exit_status"):
            extras.append("last: " + trim(clean(unit["exit_status"])))
        if line:
            extras.append("last line: " + trim(line))
        return ", ".join(
            [f"pid {unit.get('pid')}", f"uptime {format_uptime(unit.get('uptime'))}", *extras]
        )
    parts = []
    if unit.get("pid"):
        parts.append(f"pid {unit['pid']}")
    exit_status = clean(unit.get("exit_status") or "")
    reason = clean(unit.get("reason") or "")
    if exit_status and exit_status not in reason:  # the engine's reasons often start with it
        parts.append(exit_status)
    if reason:
        parts.append(reason)
    if not parts and state == "STOPPED":
        parts.append("Not started")
    parts += extras
    if line:
        parts.append("last line: " + trim(line))
    return "; ".join(parts)


def format_status(result: dict[str, Any], *, last_line: bool = False) -> Output:
    units = result.get("units", [])
    if not units:
        return Output("No units\n")
    name_width = max(len(u["name"]) for u in units) + 2
    nodes = {u.get("node") for u in units if u.get("node")}
    lines = [
        f"{clean(u['name']).ljust(name_width)}{clean(u['state']).ljust(10)}"
        f"{describe_unit(u, show_node=len(nodes) > 1, last_line=last_line)}".rstrip()
        for u in units
    ]
    code = EXIT_OK if all(u["state"] == "RUNNING" for u in units) else EXIT_NOT_RUNNING
    return Output(_lines(lines), code)


def _start_error(unit: dict[str, Any]) -> str:
    exit_status = clean(unit.get("exit_status") or "")
    reason = clean(unit.get("reason") or "")
    if unit["state"] == "FATAL" and not exit_status:
        what = f"spawn error: {reason}" if reason else "spawn error"
    elif exit_status:
        detail = reason if reason.startswith(exit_status) else exit_status
        what = f"abnormal termination: {detail}"
    else:
        what = f"{unit['state']}: {reason}" if reason else unit["state"]
    # Not the last stderr line (an INFO line, as often as not): the exit and the
    # reason say what happened; `status -v` and `tail` show the output.
    return what


def format_started(result: dict[str, Any], *, wait: bool = True, restart: bool = False) -> Output:
    """Exit 1 when a unit failed to start itself; 3 when it only waits on a
    requirement that ended (its reason names the requirement)."""
    lines, failed, blocked = [], False, False
    for unit in result.get("units", []):
        name, state = clean(unit["name"]), unit["state"]
        if state == "RUNNING":
            lines += [f"{name}: stopped"] if restart else []
            lines.append(f"{name}: started")
        elif not wait and state in _ON_THE_WAY:
            lines.append(f"{name}: starting")
        elif unit.get("blocked"):
            blocked = True
            lines.append(f"{name}: ERROR ({clean(unit.get('reason') or state)})")
        else:
            failed = True
            lines.append(f"{name}: ERROR ({_start_error(unit)})")
    code = EXIT_FAILED if failed else EXIT_NOT_RUNNING if blocked else EXIT_OK
    return Output(_lines(lines), code)


def format_stopped(result: dict[str, Any], *, wait: bool = True) -> Output:
    lines, failed = [], False
    for unit in result.get("units", []):
        name, state = clean(unit["name"]), unit["state"]
        if state in _STOPPED:
            lines.append(f"{name}: stopped")
        elif not wait and state == "STOPPING":
            lines.append(f"{name}: stopping")
        else:
            failed = True
            lines.append(f"{name}: ERROR (still {state})")
    return Output(_lines(lines), EXIT_FAILED if failed else EXIT_OK)


def format_signalled(result: dict[str, Any]) -> Output:
    lines = [f"{clean(name)}: signalled" for name in result.get("signalled", [])]
    missed = [f"{clean(name)}: ERROR (not running)" for name in result.get("not_running", [])]
    return Output(_lines(lines + missed), EXIT_FAILED if missed else EXIT_OK)


def format_pid(result: dict[str, Any]) -> Output:
    pid = result.get("pid")
    return Output(f"{pid or 0}\n", EXIT_OK if pid else EXIT_NOT_RUNNING)


def format_reread(result: dict[str, Any]) -> Output:
    lines = [f"{clean(name)}: disappeared" for name in sorted(result.get("removed", []))]
    lines += [
        f"{clean(name)}: changed ({', '.join(fields)})"
        for name, fields in sorted(result.get("changed", {}).items())
    ]
    lines += [f"{clean(name)}: available" for name in sorted(result.get("added", []))]
    return Output(_lines(lines or ["No config updates to processes"]))


def format_update(result: dict[str, Any]) -> Output:
    """update/scale: supervisorctl's lines, then what became of `scale` overrides:
    those a changed unit file dropped (stdout) and those still in force (a
    warning on stderr: the file's `replicas` is not what runs)."""
    removed = sorted(result.get("removed", []))
    changed = sorted(result.get("changed", {}).items())
    added = sorted(result.get("added", []))
    applied = result.get("applied", False)
    lines: list[str] = []
    failed = result.get("failed") or []
    if not (removed or changed or added):
        lines.append("No config updates to processes")
    elif not applied:
        lines += [f"{clean(n)}: would remove process group" for n in removed]
        lines += [f"{clean(n)}: would update process group ({', '.join(f)})" for n, f in changed]
        lines += [f"{clean(n)}: would add process group" for n in added]
    elif "progress" in result:
        # A rollout: its steps were shown as they came (or are still to come).
        lines += [f"{clean(name)}: removed process group" for name in removed]
        lines += [f"{clean(name)}: updated process group" for name, _fields in changed]
        lines += [f"{clean(name)}: added process group" for name in added]
        lines += [f"{clean(f['unit'])}: ERROR ({clean(f['reason'])})" for f in failed]
        if not result.get("settled"):
            lines.append("requested; not waiting ('dynsupctl events' shows the rest)")
        elif failed:
            lines.append(f"not settled: {len(failed)} unit(s) failed to come up")
        else:
            lines.append("settled")
    else:
        for name in removed:
            lines += [f"{clean(name)}: stopped", f"{clean(name)}: removed process group"]
        for name, _fields in changed:
            lines += [f"{clean(name)}: stopped", f"{clean(name)}: updated process group"]
        lines += [f"{clean(name)}: added process group" for name in added]
    for drop in result.get("overrides_dropped", []):
        lines.append(
            f"{clean(drop['pool'])}: {'would drop' if not applied else 'dropped'} scale override"
            f" of {drop['replicas']}: the unit file now says {drop['file']} replicas"
            f" (it said {drop['was']} when scaled)"
        )
    warnings = [
        f"dynsupctl: WARNING: {clean(o['pool'])}: scale override in force: {o['replicas']}"
        f" replicas, the unit file says {o['file']}"
        f" ('dynsupctl scale {clean(o['pool'])} --reset' drops it)"
        for o in result.get("overrides", [])
    ]
    return Output(_lines(lines), EXIT_FAILED if failed else EXIT_OK, _lines(warnings))


def format_step(step: dict[str, Any]) -> str:
    """One step of an update's or scale's rollout, as a progress line."""
    unit, what = clean(step.get("unit", "?")), str(step.get("step", "?"))
    detail = clean(step.get("detail") or "")
    pid = step.get("pid")
    if what == "started":
        text = f"started (pid {pid})"
    elif what == "running":
        text = "RUNNING"
    elif what == "admitted":
        text = "admitted (the frontends route to it)"
    elif what == "failed":
        text = f"ERROR ({detail})"
    elif what == "rolling":
        text = f"rolling update: {detail}"
    else:
        text = what.replace("_", " ") + (f" ({detail})" if detail else "")
    return f"{unit}: {text}"


def format_avail(result: dict[str, Any]) -> Output:
    units = result.get("units", [])
    if not units:
        return Output("No units\n")
    width = max(32, max(len(u["name"]) for u in units) + 1)
    return Output(
        _lines(
            f"{clean(u['name']).ljust(width)} {'in use' if u.get('in_use') else 'avail':<8}"
            f" {'auto' if u.get('autostart') else 'manual':<7} {clean(u.get('kind', ''))}".rstrip()
            for u in units
        )
    )


def format_tail(result: dict[str, Any] | None, labels: StreamLabels | None = None) -> Output:
    """One tail reply: a stream's text, or both streams' (``parts``, or an event
    naming its ``stream``) with `==> stderr <==` where the output switches."""
    if not result:
        return Output()
    missed = result.get("missed", 0)
    err = f"dynsupctl: [{missed} bytes missed]\n" if missed else ""
    if "parts" in result or "stream" in result:
        labels = labels or StreamLabels()
        parts = result.get("parts") or [result]
        return Output(labels.render(parts), EXIT_OK, err)
    return Output(result.get("data", ""), EXIT_OK, err)


class StreamLabels:
    """Both streams of one unit as one text, unprefixed. While only one stream
    has printed, its text is shown as is (a Dynamo process: stderr only); once
    both have, a coreutils-style `==> stderr <==` line leads each switch."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.labelled = False
        self.line_open = False  # the last text shown did not end its line

    def render(self, parts: list[dict[str, Any]]) -> str:
        spoken = [p for p in parts if p.get("data")]
        if len({p.get("stream") for p in spoken}) > 1:
            self.labelled = True  # both at once (the past lines): label from the first
        out = []
        for part in spoken:
            data = str(part["data"])
            out.append(self.label(str(part.get("stream")), data.endswith("\n")))
            out.append(data)
        return "".join(out)

    def label(self, stream: str, ends_line: bool) -> str:
        """What goes before a stream's next text (often nothing); ``ends_line``:
        whether that text ends with a newline."""
        if self.last is not None and stream != self.last:
            self.labelled = True
        text = ""
        if self.labelled and stream != self.last:
            text = ("\n" if self.line_open else "") + f"==> {clean(stream)} <==\n"
        self.last, self.line_open = stream, not ends_line
        return text


def format_error(exc: CommandError) -> Output:
    """A daemon's error as dynsupctl prints it, with supervisorctl's exit code."""
    code = _ERROR_EXIT.get(exc.code, EXIT_FAILED)
    details = exc.details if isinstance(exc.details, list) else []
    if exc.code == BAD_NAME and details:
        return Output("", code, _lines(f"{clean(n)}: ERROR (no such unit)" for n in details))
    lines = [f"dynsupctl: {exc.code}: {clean(exc.message)}"]
    lines += [f"  {clean(line)}" for line in details]
    return Output("", code, _lines(lines))


def _lines(lines: Iterable[str]) -> str:
    text = "\n".join(lines)
    return text + "\n" if text else ""


# -- requests --------------------------------------------------------------------


def unit_names(names: list[str], *, required: bool = False) -> list[str]:
    """CLI names as sent: ["all"] means every unit; [] too, for verbs that only read.

    Write verbs require a name or "all", so a client bug cannot stop everything.
    """
    if "all" in names and len(names) > 1:
        raise UsageError('"all" cannot be combined with unit names')
    if required and not names:
        raise UsageError("name the units, or say all")
    return names


def signal_name(text: str) -> str:
    name = text.upper()
    return name[3:] if name.startswith("SIG") else name


# -- running a verb ----------------------------------------------------------------

Runner = Callable[[Client, str, dict[str, Any], argparse.Namespace], Any]


def run_call(client: Client, cmd: str, args: dict[str, Any], ns: argparse.Namespace) -> Any:
    return client.call(cmd, args)


def run_waiting(client: Client, cmd: str, args: dict[str, Any], ns: argparse.Namespace) -> Any:
    """For verbs that may take as long as stopping a unit does: no timeout."""
    return client.call(cmd, args, timeout=None)


def run_start(client: Client, cmd: str, args: dict[str, Any], ns: argparse.Namespace) -> Any:
    """start/restart: with wait, the daemon streams unit snapshots; show them on a terminal."""
    progress = Progress(sys.stderr) if sys.stderr.isatty() and not ns.json else None
    replies = client.stream(cmd, args, timeout=None, idle=0.5 if progress else None)
    try:
        for event in replies:
            if progress is not None:
                progress.update(event)
    finally:
        if progress is not None:
            progress.clear()
    return replies.result


def run_rollout(client: Client, cmd: str, args: dict[str, Any], ns: argparse.Namespace) -> Any:
    """update/scale: the daemon streams the rollout's steps; each is a line as it comes."""
    replies = client.stream(cmd, args, timeout=None)
    for step in replies:
        if not ns.json:
            sys.stdout.write(format_step(step) + "\n")
            sys.stdout.flush()
    return replies.result


def run_tail(client: Client, cmd: str, args: dict[str, Any], ns: argparse.Namespace) -> Any:
    if not args["follow"]:
        return client.call(cmd, args)
    replies: ReplyStream = client.stream(cmd, args, timeout=None)
    prefixer = Prefixer(sys.stdout, args["names"]) if "names" in args else None
    labels = StreamLabels()
    try:
        for event in replies:
            show_tail_event(event, ns.json, prefixer, labels)
    except KeyboardInterrupt:
        return None  # the way out of tail -f: quietly, exit 0
    finally:
        if prefixer is not None:
            prefixer.flush()
    if replies.result:  # the daemon ended the stream (the unit went away)
        show_tail_event(replies.result, ns.json, prefixer, labels)
    return None


def show_tail_event(
    event: dict[str, Any],
    as_json: bool,
    prefixer: Prefixer | None = None,
    labels: StreamLabels | None = None,
) -> None:
    raw = event.pop("bytes", None)
    if raw is not None and not as_json and prefixer is None:
        write_raw_tail(event, raw, labels)
        return
    if raw is not None:
        event["data"] = raw.decode("utf-8", "replace")
    if as_json:
        print(json.dumps(event), flush=True)
        return
    if prefixer is not None and ("unit" in event or "units" in event):
        prefixer.write(event)
        return
    out = format_tail(event, labels)
    sys.stdout.write(out.text)
    sys.stdout.flush()
    if out.err:
        sys.stderr.write(out.err)


def write_raw_tail(event: dict[str, Any], data: bytes, labels: StreamLabels | None) -> None:
    """A raw tail event's bytes to stdout as the unit printed them (no decoding and
    encoding again: a flood followed costs dynsupctl half the CPU)."""
    out = sys.stdout
    stream = event.get("stream")
    if data:
        if stream is not None and labels is not None:
            out.write(labels.label(str(stream), data.endswith(b"\n")))
        out.flush()
        out.buffer.write(data)
        out.buffer.flush()
    if event.get("missed"):
        sys.stderr.write(f"dynsupctl: [{event['missed']} bytes missed]\n")


class Prefixer:
    """Output of several units as whole lines, each led by its unit's name
    (``docker compose logs -f``); a partial line waits for its end."""

    def __init__(self, out: TextIO, names: list[str]) -> None:
        self.out = out
        self.width = max((len(n) for n in names if n != "all"), default=8)
        self.partial: dict[tuple[str, str], str] = {}

    def write(self, event: dict[str, Any]) -> None:
        if "units" in event:  # the stream's header: every name it follows
            self.width = max((len(clean(n)) for n in event["units"]), default=self.width)
            return
        unit, stream = clean(event["unit"]), str(event.get("stream", "stdout"))
        self.width = max(self.width, len(unit))
        if event.get("missed"):
            sys.stderr.write(f"dynsupctl: [{unit}: {event['missed']} bytes missed]\n")
        text = self.partial.pop((unit, stream), "") + str(event.get("data", ""))
        *complete, rest = text.split("\n")
        if rest:
            self.partial[(unit, stream)] = rest
        self.out.write("".join(f"{self._lead(unit)}{line}\n" for line in complete))
        self.out.flush()

    def flush(self) -> None:
        for (unit, _stream), rest in self.partial.items():
            self.out.write(f"{self._lead(unit)}{rest}\n")
        self.partial.clear()
        self.out.flush()

    def _lead(self, unit: str) -> str:
        return f"{unit.ljust(self.width)} | "


def format_event(event: dict[str, Any]) -> str:
    """One state change as a line: time, unit, old -> new, pid, reason."""
    when = time.strftime("%H:%M:%S", time.localtime(event.get("time") or 0))
    millis = int(((event.get("time") or 0) % 1) * 1000)
    old = event.get("old")
    change = f"{old} -> {event['new']}" if old else str(event["new"])
    parts = [f"{when}.{millis:03d}", clean(event["unit"]), change]
    if event.get("pid"):
        parts.append(f"pid {event['pid']}")
    line = " ".join(parts)
    if event.get("reason"):
        line += f" ({trim(clean(event['reason']))})"
    return line


def run_events(client: Client, cmd: str, args: dict[str, Any], ns: argparse.Namespace) -> Any:
    """Every unit's state, then each change as it happens, until Ctrl-C (exit 0)."""
    replies: ReplyStream = client.stream(cmd, args, timeout=None)
    try:
        for event in replies:
            line = json.dumps(event) if ns.json else format_event(event)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return None
    return None


class Progress:
    """One line on a terminal: which units are still on their way, and for how long."""

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.clock = clock
        self.began = clock()
        self.states: dict[str, str] = {}
        self.shown = False

    def update(self, event: dict[str, Any] | None) -> None:
        if isinstance(event, dict) and "name" in event:
            self.states[event["name"]] = event.get("state", "?")
        elapsed = self.clock() - self.began
        waiting = [(n, s) for n, s in self.states.items() if s in _ON_THE_WAY]
        if elapsed < PROGRESS_AFTER or not waiting:
            return
        line = ", ".join(f"{clean(n)}: {s} ({elapsed:.0f}s)" for n, s in waiting)
        self.out.write("\r\x1b[K" + trim(line, _terminal_width() - 1))
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 80


# -- the verb table ----------------------------------------------------------------


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


class Verb(NamedTuple):
    help: str
    request: Callable[[argparse.Namespace], dict[str, Any]]
    render: Callable[[Any, argparse.Namespace], Output]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    run: Runner = run_call


def _names_arguments(
    required: bool, wait: bool = False
) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "names", nargs="+" if required else "*", metavar="NAME", help='unit names, or "all"'
        )
        if wait:
            parser.add_argument(
                "--no-wait", dest="wait", action="store_false", help="return once requested"
            )

    return add


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _names_arguments(required=False)(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also each unit's last stderr line"
    )


def _signal_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("signal", metavar="SIG", help="HUP, SIGHUP, USR1, 15, ...")
    parser.add_argument("names", nargs="+", metavar="NAME", help='unit names, or "all"')


def _pid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="a unit (default: the daemon)")


def _tail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="follow", action="store_true", help="follow until Ctrl-C")
    parser.add_argument("-n", dest="lines", type=int, default=10, metavar="N", help="last N lines")
    parser.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help='a unit [stdout|stderr] (default: both); with -f, several units or "all"'
        " (lines led by the name)",
    )


def tail_request(ns: argparse.Namespace) -> dict[str, Any]:
    """One unit: `tail NAME [stdout|stderr]`; both streams unless the last word
    names one. Several (or all): follow only, both streams unless named too."""
    names, stream = list(ns.names), None
    if len(names) > 1 and names[-1] in ("stdout", "stderr"):
        stream = names.pop()
    if len(names) == 1 and names != ["all"]:
        one: dict[str, Any] = {"name": names[0], "lines": ns.lines, "follow": ns.follow}
        if ns.follow:
            one["raw"] = True  # the output's bytes as they are: nothing to escape or parse
        if stream is not None:
            one["stream"] = stream
        return one
    if not ns.follow:
        raise UsageError("several units are tailed with -f only")
    request = {"names": unit_names(names, required=True), "lines": ns.lines, "follow": True}
    if stream is not None:
        request["stream"] = stream
    return request


def run_top(client: Client, cmd: str, args: dict[str, Any], ns: argparse.Namespace) -> Any:
    """The live view needs Rich (the [tui] extra); dynsupctl alone stays stdlib-only."""
    try:
        from . import top
    except ImportError as exc:
        raise UsageError(f"needs the [tui] extra (pip install 'dynsup[tui]'): {exc}") from None
    top.run(client.path)
    return None


def _events_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these units")


def _no_wait_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return once the change is accepted, not when it has settled",
    )


def _update_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    _no_wait_argument(parser)
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these units")


def _shutdown_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--detach",
        action="store_true",
        help="leave the units running under their Ray agents for the next dynsupd to adopt",
    )


def _scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="MODEL[:ROLE]")
    parser.add_argument("replicas", type=int, metavar="N", nargs="?")
    parser.add_argument(
        "--reset", action="store_true", help="drop the override: the unit file's count again"
    )
    _no_wait_argument(parser)


def scale_request(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.reset == (ns.replicas is not None):
        raise UsageError("give N or --reset")
    if ns.reset:
        return {"name": ns.name, "reset": True, "wait": ns.wait}
    return {"name": ns.name, "replicas": ns.replicas, "wait": ns.wait}


def format_gpus(result: dict[str, Any]) -> Output:
    """One line per GPU: node, id, and the unit/replica/rank holding it (or free)."""
    if not result.get("ray"):
        return Output("no GPUs: Ray is off (no unit asks for GPUs)\n")
    rows = result.get("gpus") or []
    lines = []
    for row in rows:
        holder = "free"
        if row.get("unit"):
            holder = str(row["unit"])
            if row.get("replica") is not None:
                holder += f" replica {row['replica']}"
            if row.get("rank") is not None:
                holder += f" rank {row['rank']}"
        lines.append(
            f"{clean(str(row.get('node'))):<20} gpu {clean(str(row.get('gpu'))):<6} {clean(holder)}"
        )
    return Output("\n".join(lines) + "\n" if lines else "no GPUs\n")


def _names_and_wait(ns: argparse.Namespace) -> dict[str, Any]:
    return {"names": unit_names(ns.names, required=True), "wait": ns.wait}


VERBS: dict[str, Verb] = {
    "status": Verb(
        "show units (exit 3 if one is not running)",
        lambda ns: {"names": unit_names(ns.names)},
        lambda result, ns: format_status(result, last_line=ns.verbose),
        _status_arguments,
    ),
    "start": Verb(
        "start units and wait until they run",
        _names_and_wait,
        lambda result, ns: format_started(result, wait=ns.wait),
        _names_arguments(required=True, wait=True),
        run_start,
    ),
    "stop": Verb(
        "stop units (those that require them first)",
        _names_and_wait,
        lambda result, ns: format_stopped(result, wait=ns.wait),
        _names_arguments(required=True, wait=True),
        run_waiting,
    ),
    "restart": Verb(
        "stop, then start units",
        _names_and_wait,
        lambda result, ns: format_started(result, wait=ns.wait, restart=True),
        _names_arguments(required=True, wait=True),
        run_start,
    ),
    "signal": Verb(
        "send a signal to units' process groups",
        lambda ns: {"signal": signal_name(ns.signal), "names": unit_names(ns.names, required=True)},
        lambda result, ns: format_signalled(result),
        _signal_arguments,
    ),
    "pid": Verb(
        "print a unit's pid, or the daemon's",
        lambda ns: {"name": ns.name},
        lambda result, ns: format_pid(result),
        _pid_arguments,
    ),
    "tail": Verb(
        "print a unit's output (-f: follow)",
        tail_request,
        lambda result, ns: format_tail(result),
        _tail_arguments,
        run_tail,
    ),
    "top": Verb(
        "a live view of every unit (state, restarts, CPU, memory, GPUs); q quits",
        lambda ns: {},
        lambda result, ns: Output(),
        _no_arguments,
        run_top,
    ),
    "events": Verb(
        "print every unit's state, then each change as it happens (until Ctrl-C)",
        lambda ns: {"names": unit_names(ns.names)},
        lambda result, ns: Output(),
        _events_arguments,
        run_events,
    ),
    "reread": Verb(
        "read unit files again; show what changed",
        lambda ns: {},
        lambda result, ns: format_reread(result),
    ),
    "update": Verb(
        "apply changed unit files, and wait until the change has settled",
        lambda ns: {"dry_run": ns.dry_run, "names": ns.names, "wait": ns.wait},
        lambda result, ns: format_update(result),
        _update_arguments,
        run_rollout,
    ),
    "avail": Verb(
        "list the units the daemon knows",
        lambda ns: {},
        lambda result, ns: format_avail(result),
    ),
    "shutdown": Verb(
        "stop every unit, then the daemon (--detach: leave them to the next daemon)",
        lambda ns: {"detach": ns.detach},
        lambda result, ns: Output("Shut down\n"),
        _shutdown_arguments,
        run_waiting,
    ),
    "scale": Verb(
        "set a model's replica count (MODEL or MODEL:prefill|decode); --reset: the file's",
        scale_request,
        lambda result, ns: format_update(result),
        _scale_arguments,
        run_rollout,
    ),
    "gpus": Verb(
        "show which unit holds each GPU",
        lambda ns: {},
        lambda result, ns: format_gpus(result),
    ),
    "version": Verb(
        "print the daemon's version",
        lambda ns: {},
        lambda result, ns: Output(f"{result.get('version')}\n"),
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that verb's sub-parser (each costs ~1 ms to build)."""
    parser = argparse.ArgumentParser(prog="dynsupctl", description="control dynsupd")
    parser.add_argument(
        "--socket", metavar="PATH", help="control socket (default: $DYNSUP_SOCKET, ...)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--version", action="version", version=f"dynsupctl {__version__}")
    # Also accept --json after the verb ("dynsupctl status --json"); SUPPRESS
    # keeps a sub-parser's default from overwriting the main one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, verb in VERBS.items():
        if only is None or name == only:
            verb.arguments(verbs.add_parser(name, help=verb.help, parents=[common]))
    return parser


def find_verb(argv: list[str]) -> str | None:
    """The verb in argv, found without argparse (None when unsure: then build every verb)."""
    args = iter(argv)
    for arg in args:
        if arg == "--socket":
            next(args, None)
        elif arg in VERBS:
            return arg
        elif not arg.startswith("-"):
            return None
    return None


def run_verb(client: Client, name: str, ns: argparse.Namespace) -> Output:
    verb = VERBS[name]
    try:
        result = verb.run(client, name, verb.request(ns), ns)
    except CommandError as exc:
        if ns.json:
            return Output(_json({"error": exc.to_json()}), format_error(exc).code)
        return format_error(exc)
    out = verb.render(result, ns)
    if ns.json and not ((name == "tail" and ns.follow) or name in ("events", "top")):
        return out._replace(text=_json(result), err="")
    return out


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser(find_verb(argv)).parse_args(argv)
    # A child's output may not be valid in the terminal's encoding; never die on it.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        path = client_socket_path(ns.socket)
    except UnsafeSocketDir as exc:
        print(f"dynsupctl: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    try:
        with Client(path, timeout=READ_TIMEOUT) as client:
            out = run_verb(client, ns.verb, ns)
        sys.stdout.write(out.text)
        sys.stdout.flush()
        sys.stderr.write(out.err)
        return out.code
    except UsageError as exc:
        print(f"dynsupctl {ns.verb}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnreachable as exc:
        print(f"dynsupctl: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    except ClientError as exc:
        print(f"dynsupctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("dynsupctl: interrupted (dynsupd carries on with what was asked)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Reader went away (| head): silence the flush at exit, as Python's docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
