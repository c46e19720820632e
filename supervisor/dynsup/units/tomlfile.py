"""Read one TOML file that a person (or a crash) may have made wrong.

Shared by unit files, the daemon's configuration and ``state.toml``: each
failure is a :class:`TomlFileError` with a message fit for an operator,
never a stray ``RecursionError``, ``ValueError`` or a read that hangs.

* Only regular files are read, opened non-blocking, so a FIFO or a device
  named ``*.toml`` cannot stall the daemon; at most ``max_bytes`` are read.
* Arrays and tables nested deeper than :data:`MAX_DEPTH` are refused
  ("nested too deeply"), at parse time (tomllib recurses) and by
  :func:`check_values` afterwards, so that code which walks values
  (``json.dumps`` of ``engine_args``, message formatting) never recurses far.
* Strings must not contain NUL: execve, environment variables and paths
  cannot carry one.
"""

from __future__ import annotations

import datetime
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MAX_BYTES = 1 << 20  # a unit file or configuration of a megabyte is a mistake
# Unit files need four levels (model.prefill.engine_args.key[i]); JSON-valued
# engine args a few more.
MAX_DEPTH = 16

DATE_TIME = (datetime.date, datetime.time)  # datetime.datetime is a date
TOO_DEEP = f"nested too deeply (at most {MAX_DEPTH} levels)"


class TomlFileError(Exception):
    """The file cannot be read as TOML; the message says why (without the path)."""


def read_toml(path: Path, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """The parsed document; raises :class:`TomlFileError` (FileNotFoundError passes)."""
    return parse_toml(read_limited(path, max_bytes))


def read_limited(path: Path, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Raises FileNotFoundError as it is (callers treat "absent" apart) and
    :class:`TomlFileError` for everything else.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TomlFileError(f"cannot read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TomlFileError("not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise TomlFileError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise TomlFileError(f"larger than {max_bytes} bytes")
    return b"".join(chunks)


def parse_toml(data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TomlFileError(f"not UTF-8 text: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TomlFileError(f"invalid TOML: {exc}") from None
    except RecursionError:
        raise TomlFileError(f"invalid TOML: {TOO_DEEP}") from None
    except ValueError:  # tomllib lets int()'s digit limit through
        limit = sys.get_int_max_str_digits()
        raise TomlFileError(f"invalid TOML: an integer has more than {limit} digits") from None


def check_values(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(dotted key, problem) for each value too deep or a string with NUL.

    Iterative, so any depth tomllib managed to parse is walked safely. Below
    a value nested too deeply nothing more is reported.
    """
    todo: list[tuple[str, str, Any, int]] = [(k, k, v, 1) for k, v in document.items()]
    todo.reverse()
    while todo:
        key, name, value, depth = todo.pop()
        if "\0" in name:
            yield key, "a key must not contain a NUL character"
        if isinstance(value, str):
            if "\0" in value:
                yield key, "must not contain a NUL character"
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                yield key, TOO_DEEP
                continue
            items = (
                [(f"{key}.{k}", k, v) for k, v in value.items()]
                if isinstance(value, dict)
                else [(f"{key}[{i}]", "", v) for i, v in enumerate(value)]
            )
            todo.extend((sub, k, v, depth + 1) for sub, k, v in reversed(items))
