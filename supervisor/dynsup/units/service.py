"""The ``[service]`` kind: ``[service]``, ``[ready]`` and ``[resources]`` → ServiceSpec.

Keys and defaults are those of DESIGN.md ("Units") and of
:class:`~dynsup.units.spec.ServiceSpec`. Points worth knowing:

* ``command`` is an argv array, never run through a shell. A string is
  split the way a POSIX shell splits words (``shlex.split``), and nothing
  else: no variables, globs or pipes.
* ``start_seconds`` (default 1.0) matters only without a ``[ready]``
  probe: such a unit counts as RUNNING once it has stayed alive that long.
  ``start_seconds = 0`` makes it RUNNING as soon as it is spawned. With a
  probe, the probe decides and ``[ready] timeout`` bounds the wait.
* ``restart_delay_max`` defaults to 30 seconds, or to ``restart_delay``
  when that is larger, so that a long first delay alone is not an error.
* ``success_exit_codes`` is a set: order and repeats do not matter.
* Placeholders such as ``{state_dir}`` in ``command``, ``environment``
  values and ``working_directory`` are replaced from the loader's
  ``context``; ``{{`` and ``}}`` stand for literal braces. Without a
  context the strings are kept exactly as written.
"""

from __future__ import annotations

import re
import shlex
import signal
import string
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..signals import parse_signal
from .durations import parse_duration, parse_positive_duration
from .errors import (
    Invalid,
    Problems,
    Table,
    as_list_of,
    as_nonempty_str,
    as_str,
    as_table,
    describe,
    did_you_mean,
    expected,
    int_at_least,
    show,
)
from .spec import LiveSpec, ProbeKind, ReadySpec, RestartPolicy, ServiceSpec, freeze_env

SERVICE_KEYS = (
    "command",
    "environment",
    "working_directory",
    "restart",
    "restart_delay",
    "restart_delay_max",
    "start_limit_burst",
    "start_limit_interval",
    "success_exit_codes",
    "stop_signal",
    "stop_timeout",
    "start_seconds",
)
PROBES = tuple(kind.value for kind in ProbeKind)
READY_KEYS = (*PROBES, "names", "timeout", "interval")
# A line is printed once: liveness is asked again and again, so no log probe.
LIVE_PROBES = tuple(kind.value for kind in ProbeKind if kind is not ProbeKind.LOG)
LIVE_KEYS = (*LIVE_PROBES, "names", "timeout", "interval", "failures", "grace")
RESOURCES_KEYS = ("gpus",)
# Top-level tables that belong to a [service] unit besides [service] itself.
SERVICE_TABLES = ("ready", "live", "resources")

_DEFAULTS = ServiceSpec(name="", command=())
_READY_DEFAULTS = ReadySpec(kind=ProbeKind.TCP, target="")
_LIVE_DEFAULTS = LiveSpec(kind=ProbeKind.TCP, target="")
ProbeSpec = TypeVar("ProbeSpec", bound=ReadySpec)


def parse_service(
    name: str,
    document: Mapping[str, Any],
    problems: Problems,
    context: Mapping[str, str] | None,
) -> ServiceSpec:
    """The spec of a ``[service]`` unit; problems go to ``problems``.

    Always returns a spec (invalid values replaced by defaults); the caller
    must discard it when ``problems`` gained errors.
    """
    service = section(problems, document, "service", SERVICE_KEYS)
    fill = Placeholders(context)
    restart_delay = service.get("restart_delay", parse_duration, _DEFAULTS.restart_delay)
    return ServiceSpec(
        name=name,
        command=service.require("command", lambda v: fill.argv(as_argv(v)), ()),
        environment=freeze_env(
            service.get("environment", lambda v: fill.environment(as_environment(v)), {})
        ),
        working_directory=service.get(
            "working_directory", lambda v: fill.text(as_nonempty_str(v)), None
        ),
        restart=service.get("restart", as_restart, _DEFAULTS.restart),
        restart_delay=restart_delay,
        restart_delay_max=_restart_delay_max(service, restart_delay),
        start_limit_burst=service.get(
            "start_limit_burst", int_at_least(1), _DEFAULTS.start_limit_burst
        ),
        start_limit_interval=service.get(
            "start_limit_interval", parse_duration, _DEFAULTS.start_limit_interval
        ),
        success_exit_codes=service.get(
            "success_exit_codes", as_exit_codes, _DEFAULTS.success_exit_codes
        ),
        stop_signal=service.get("stop_signal", as_signal, _DEFAULTS.stop_signal),
        stop_timeout=service.get("stop_timeout", parse_duration, _DEFAULTS.stop_timeout),
        start_seconds=service.get("start_seconds", parse_duration, _DEFAULTS.start_seconds),
        ready=parse_ready(problems, document),
        live=parse_live(problems, document),
        gpus=parse_gpus(problems, document),
    )


def section(
    problems: Problems, document: Mapping[str, Any], name: str, known: Sequence[str]
) -> Table:
    """Top-level table ``name`` of the document (empty when absent or not a table)."""
    try:
        data = as_table(document.get(name, {}))
    except Invalid as invalid:
        problems.add_invalid(name, invalid)
        data = {}
    return Table(problems, name, data, known)


def _restart_delay_max(service: Table, restart_delay: float) -> float:
    default = max(_DEFAULTS.restart_delay_max, restart_delay)
    delay_max = service.get("restart_delay_max", parse_duration, default)
    if delay_max < restart_delay:
        service.report(
            "restart_delay_max",
            f"must be at least restart_delay ({restart_delay:g}s), got {delay_max:g}s",
        )
    return delay_max


def parse_ready(problems: Problems, document: Mapping[str, Any]) -> ReadySpec | None:
    """The ``[ready]`` probe, or None without one (or when it is invalid)."""
    if "ready" not in document:
        return None
    ready = section(problems, document, "ready", READY_KEYS)
    timeout = ready.get("timeout", parse_positive_duration, _READY_DEFAULTS.timeout)
    interval = ready.get("interval", parse_positive_duration, _READY_DEFAULTS.interval)
    found = _probe(problems, ready, PROBES)
    if found is None:
        return None
    kind, value, names = found
    return _probe_spec(ReadySpec, kind, value, names, timeout=timeout, interval=interval)


def parse_live(problems: Problems, document: Mapping[str, Any]) -> LiveSpec | None:
    """The ``[live]`` probe, or None without one (or when it is invalid)."""
    if "live" not in document:
        return None
    live = section(problems, document, "live", LIVE_KEYS)
    found = _probe(problems, live, LIVE_PROBES)
    settings = {
        "timeout": live.get("timeout", parse_positive_duration, _LIVE_DEFAULTS.timeout),
        "interval": live.get("interval", parse_positive_duration, _LIVE_DEFAULTS.interval),
        "failures": live.get("failures", int_at_least(1), _LIVE_DEFAULTS.failures),
        "grace": live.get("grace", parse_duration, _LIVE_DEFAULTS.grace),
    }
    if found is None:
        return None
    kind, value, names = found
    return _probe_spec(LiveSpec, kind, value, names, **settings)


def _probe(
    problems: Problems, table: Table, kinds: tuple[str, ...]
) -> tuple[ProbeKind, str | tuple[str, ...], tuple[str, ...]] | None:
    """The one probe of a ``[ready]``/``[live]`` table: kind, value, model names."""
    names = tuple(table.get("names", as_models_names, []))
    # Check every probe given, even when there are too many, so that all of
    # their problems show up in one pass.
    probes = {key: table.get(key, _PROBE_CONVERTERS[key], None) for key in kinds if key in table}
    if "names" in table and "models" not in table:
        table.report("names", "only used with the 'models' probe")
    if "models" in table and "names" not in table:
        table.report("names", "the 'models' probe needs names = [...], the models to wait for")
    if len(probes) != 1:
        problems.add(table.path, _probe_count_message(list(probes), kinds))
        return None
    [(key, value)] = probes.items()
    if value is None:  # the probe's value was invalid, already reported
        return None
    return ProbeKind(key), value, names


def _probe_count_message(found: list[str], kinds: tuple[str, ...]) -> str:
    choices = ", ".join(repr(k) for k in kinds[:-1]) + f" or {kinds[-1]!r}"
    if not found:
        return f"expected one probe: {choices}"
    return f"expected one probe, found {len(found)}: {', '.join(repr(k) for k in found)}"


def _probe_spec(
    cls: type[ProbeSpec],
    kind: ProbeKind,
    value: str | tuple[str, ...],
    names: tuple[str, ...],
    **settings: Any,
) -> ProbeSpec:
    if isinstance(value, tuple):  # exec: keep a readable target for status output
        return cls(kind, shlex.join(value), argv=value, **settings)
    models = names if kind is ProbeKind.MODELS else ()
    return cls(kind, value, models=models, **settings)


def parse_gpus(problems: Problems, document: Mapping[str, Any]) -> int:
    resources = section(problems, document, "resources", RESOURCES_KEYS)
    return resources.get("gpus", int_at_least(0), _DEFAULTS.gpus)


# --- converters -------------------------------------------------------------
# Each takes a raw TOML value and returns the checked value or raises Invalid.


def as_argv(value: object) -> tuple[str, ...]:
    """An argv: an array of non-empty strings, or one string split like a shell."""
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise Invalid(f"cannot split into arguments: {exc}") from None
    elif not isinstance(value, list):
        raise expected("an array of strings (the program and its arguments) or a string", value)
    if not value:
        raise Invalid("must not be empty: expected the program and its arguments")
    # NUL characters are refused for the whole file by the loader (tomlfile).
    return tuple(as_list_of(as_nonempty_str)(value))


def as_environment(value: object) -> dict[str, str]:
    table = as_table(value)
    problems: list[tuple[str, str]] = []
    for key, item in table.items():
        if not key or "=" in key:
            problems.append((f".{key}", f"invalid environment variable name {show(key)}"))
        elif not isinstance(item, str):
            message = f"expected a string, got {describe(item)}; quote numbers and booleans"
            problems.append((f".{key}", message))
    if problems:
        raise Invalid.many(problems)
    return dict(table)


def as_restart(value: object) -> RestartPolicy:
    choices = ", ".join(show(policy.value) for policy in RestartPolicy)
    if not isinstance(value, str):
        raise expected(f"one of {choices}", value)
    try:
        return RestartPolicy(value)
    except ValueError:
        guess = did_you_mean(value, [policy.value for policy in RestartPolicy])
        hint = f"; did you mean {show(guess)}?" if guess else ""
        raise Invalid(f"expected one of {choices}, got {show(value)}{hint}") from None


def as_exit_code(value: object) -> int:
    code = int_at_least(0)(value)
    if code > 255:
        raise Invalid(f"an exit code is 0..255, got {code}")
    return code


def as_exit_codes(value: object) -> tuple[int, ...]:
    return tuple(sorted(set(as_list_of(as_exit_code)(value))))


def as_signal(value: object) -> signal.Signals:
    """A signal by name ("SIGTERM", "TERM", any case) or by number."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise expected('a signal name such as "SIGTERM" or "TERM", or a number', value)
    try:
        return parse_signal(value)
    except ValueError:
        if isinstance(value, int):
            raise Invalid(f"no signal has the number {value} on this system") from None
        name = value.strip().upper()
        guess = did_you_mean(
            name if name.startswith("SIG") else "SIG" + name, signal.Signals.__members__
        )
        hint = f"; did you mean {show(guess)}?" if guess else ""
        raise Invalid(f"unknown signal {show(value)}{hint}") from None


def as_models_names(value: object) -> list[str]:
    names = as_list_of(as_nonempty_str)(value)
    if not names:
        raise Invalid("must not be empty: list the models that must be served")
    return names


def as_host_port(value: object) -> str:
    text = as_str(value)
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise Invalid(f'expected "host:port", got {show(text)}')
    if as_port_number(port) is None:
        raise Invalid(f"expected a port number 1..65535 after the last ':', got {show(text)}")
    return text


def as_port_number(text: str) -> int | None:
    """The port written in ``text`` (ASCII digits only, 1..65535), or None.

    ``str.isdigit()`` and ``int()`` accept fullwidth and Arabic-Indic digits;
    nothing that connects or binds should see those.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def as_http_url(value: object) -> str:
    text = as_str(value)
    if not text.isprintable() or " " in text:  # it would end up in the request line
        raise Invalid(f"expected a URL without spaces or control characters, got {show(text)}")
    try:
        parts = urllib.parse.urlsplit(text)
        hostname = parts.hostname
    except ValueError as exc:  # "http://[::1": unbalanced brackets
        raise Invalid(f"cannot parse URL {show(text)}: {exc}") from None
    if parts.scheme != "http" or not hostname:
        raise Invalid(f'expected a URL starting with "http://", got {show(text)}')
    # The port as written (after any "user@" and "[v6]"), checked here because
    # urlsplit's own .port takes non-ASCII digits on some Python versions.
    _, colon, port = parts.netloc.rpartition("@")[2].rpartition("]")[2].rpartition(":")
    if colon and port and as_port_number(port) is None:
        raise Invalid(f"bad port in URL {show(text)}: expected 1..65535")
    return text


def as_regex(value: object) -> str:
    pattern = as_str(value)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise Invalid(f"bad regular expression {show(pattern)}: {exc}") from None
    except (RecursionError, OverflowError, ValueError) as exc:  # "((((…))))", "a{99999999999}"
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise Invalid(f"bad regular expression: {reason}") from None
    return pattern


_PROBE_CONVERTERS: dict[str, Callable[[object], str | tuple[str, ...]]] = {
    "tcp": as_host_port,
    "http": as_http_url,
    "log": as_regex,
    "exec": as_argv,
    "models": as_http_url,
}


# --- placeholders -----------------------------------------------------------

_FORMATTER = string.Formatter()


class Placeholders:
    """Replaces ``{name}`` from a context; ``None`` means leave strings alone."""

    def __init__(self, context: Mapping[str, str] | None) -> None:
        self.context = context

    def text(self, text: str) -> str:
        if self.context is None:
            return text
        return substitute(text, self.context)

    def argv(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        # Substituted after splitting, so that a value with spaces stays one
        # argument.
        return tuple(self._each({f"[{i}]": arg for i, arg in enumerate(argv)}).values())

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        filled = self._each({f".{key}": value for key, value in env.items()})
        return {key: filled[f".{key}"] for key in env}

    def _each(self, items: dict[str, str]) -> dict[str, str]:
        """Substitutes every value, gathering the problems of all of them."""
        result: dict[str, str] = {}
        problems: list[tuple[str, str]] = []
        for at, text in items.items():
            try:
                result[at] = self.text(text)
            except Invalid as invalid:
                problems.extend((at + sub, message) for sub, message in invalid.problems)
        if problems:
            raise Invalid.many(problems)
        return result


def substitute(text: str, context: Mapping[str, str]) -> str:
    """``text`` with each ``{name}`` replaced by ``context[name]``.

    Unlike ``str.format_map`` with a forgiving mapping, an unknown name is
    an error: a typo such as ``{stat_dir}`` must not reach a command line.
    """
    try:
        parts = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise Invalid(
            f"{exc} in {show(text)}; write '{{{{' or '}}}}' for a literal brace"
        ) from None
    out: list[str] = []
    for literal, field, spec, conversion in parts:
        out.append(literal)
        if field is None:
            continue
        if spec or conversion:
            raise Invalid(f"placeholder {{{field}}} takes no conversion or format spec")
        if field not in context:
            raise Invalid(_unknown_placeholder(field, context))
        out.append(context[field])
    return "".join(out)


def _unknown_placeholder(field: str, context: Mapping[str, str]) -> str:
    known = ", ".join(f"{{{name}}}" for name in sorted(context)) or "none"
    guess = did_you_mean(field, context)
    hint = f"; did you mean {{{guess}}}?" if guess else ""
    return f"unknown placeholder {{{field}}}{hint} (known placeholders: {known})"
