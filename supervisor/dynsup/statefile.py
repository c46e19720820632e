"""Desired state that survives the daemon: which units were stopped or started by hand.

``state.toml`` in the state directory::

    format = 3
    [wanted]            # unit name -> started (true) or stopped (false) by hand
    [replicas]          # "MODEL" or "MODEL:ROLE" -> count set by `dynsupctl scale`
    [replicas_file]     # the same keys -> the unit file's count when it was set
    [port_blocks]       # model unit -> first port of its block
    [slots]             # "MODEL" or "MODEL:ROLE" -> its replicas' slots, after a surge
    # end of dynsup state

Two promises:

* **Memory and disk never diverge.** Each change computes the new content,
  writes it atomically (temporary file, fsync, rename, fsync of the
  directory) and only then updates memory. A write that fails raises
  :class:`StateWriteError` and changes nothing, so it is never "written
  later" by the next successful change either.
* **A damaged file cannot lie or keep the daemon down.** The file is checked
  like a unit file (tables, types, unit names, ranges; the end marker shows
  a truncated file). One that fails (invalid UTF-8 or TOML, a wrong shape,
  a directory in its place, cut short) is renamed to
  ``state.toml.corrupt-<UTC time>``, one ``state.corrupt`` error event says
  so, and the daemon starts from the unit files.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog
import tomli_w

from .units.errors import MAX_INT
from .units.tomlfile import TomlFileError, parse_toml, read_limited

log = structlog.get_logger("dynsup.state")

STATE_FILE = "state.toml"
# 1: files without "format" and the end marker; 2: without [replicas_file]
# (read as they are: an override with no file count is never dropped by itself).
FORMAT = 3
END_MARK = "# end of dynsup state\n"
# The names a unit file may give a unit (units.loader), with ":ROLE" for replicas.
_UNIT_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
_POOL = re.compile(r"[A-Za-z0-9_.@-]+(:(prefill|decode))?")


class StateWriteError(Exception):
    """``state.toml`` could not be written; memory was left as it was."""


class CorruptState(ValueError):
    """``state.toml`` is not a state file this daemon wrote; the message says why."""


class DesiredState:
    """Per-unit overrides of `autostart`: True = started by hand, False = stopped by hand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.overrides: dict[str, bool] = {}
        # `dynsupctl scale MODEL[:ROLE] N`: replica counts that override the unit files.
        self.replicas: dict[str, int] = {}
        # The unit file's count each override was made against: once the file
        # says something else, the file wins (`update` drops the override).
        self.replicas_file: dict[str, int] = {}
        # Each model unit's port block, kept across reloads and restarts.
        self.port_blocks: dict[str, int] = {}
        # Each pool's replica slots (replica <unit>-<slot>), once a surge moved them
        # off 0..n-1: saved before the surge starts, so a daemon restarted midway
        # expands the same names and adopts the new replicas.
        self.slots: dict[str, tuple[int, ...]] = {}
        # Changes are written from worker threads (fsync stays off the event
        # loop): one read-modify-write at a time.
        self._lock = threading.RLock()

    @classmethod
    def load(cls, state_dir: Path, *, read_only: bool = False) -> DesiredState:
        """The saved state; an empty one when there is none or it was corrupt (moved
        aside, unless read_only: `dynsupd --check` writes nothing)."""
        state = cls(state_dir / STATE_FILE)
        try:
            data = read_limited(state.path)
        except FileNotFoundError:
            return state
        except TomlFileError as exc:  # a directory or FIFO in its place, too large, EIO
            if not read_only:
                state._set_aside(str(exc))
            return state
        try:
            (
                state.overrides,
                state.replicas,
                state.replicas_file,
                state.port_blocks,
                state.slots,
            ) = _validate(parse_toml(data), data)
        except (TomlFileError, CorruptState) as exc:
            if not read_only:
                state._set_aside(str(exc))
        return state

    def _set_aside(self, reason: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{STATE_FILE}.corrupt-{stamp}")
        try:
            os.rename(self.path, aside)
            moved_to: str | None = str(aside)
        except OSError as exc:
            moved_to = None
            reason = f"{reason}; and it cannot be moved aside: {exc.strerror or exc}"
        log.error(
            "state.corrupt",
            path=str(self.path),
            moved_to=moved_to,
            reason=reason,
            action="starting from the unit files",
        )

    # -- reading -------------------------------------------------------------

    def wants(self, name: str, autostart: bool) -> bool:
        return self.overrides.get(name, autostart)

    # -- changes: written first, then applied to memory ------------------------

    def set(self, name: str, wanted: bool, autostart: bool) -> None:
        self.set_many([(name, wanted, autostart)])

    def set_many(self, changes: Iterable[tuple[str, bool, bool]]) -> None:
        """(name, wanted, autostart) for each unit, in one write: all or nothing."""
        with self._lock:
            overrides = dict(self.overrides)
            for name, wanted, autostart in changes:
                if wanted == autostart:
                    overrides.pop(name, None)
                else:
                    overrides[name] = wanted
            if overrides != self.overrides:
                self._commit(overrides=overrides)

    def set_replicas(self, key: str, count: int | None, file_count: int | None = None) -> None:
        """Save a pool's replica count, made against the unit file's ``file_count``
        (None: back to the unit file's)."""
        with self._lock:
            replicas = {k: v for k, v in self.replicas.items() if k != key}
            against = {k: v for k, v in self.replicas_file.items() if k != key}
            if count is not None:
                replicas[key] = count
                if file_count is not None:
                    against[key] = file_count
            if (replicas, against) != (self.replicas, self.replicas_file):
                self._commit(replicas=replicas, replicas_file=against)

    def drop_replicas(self, keys: Iterable[str]) -> None:
        """Back to the unit files' counts for these pools, in one write."""
        with self._lock:
            gone = set(keys)
            replicas = {k: v for k, v in self.replicas.items() if k not in gone}
            against = {k: v for k, v in self.replicas_file.items() if k not in gone}
            if (replicas, against) != (self.replicas, self.replicas_file):
                self._commit(replicas=replicas, replicas_file=against)

    def remember_port_blocks(self, blocks: Mapping[str, int]) -> None:
        """The blocks of the models that exist now (a removed model's is forgotten)."""
        with self._lock:
            if dict(blocks) != self.port_blocks:
                self._commit(port_blocks=dict(blocks))

    def set_slots(self, changes: Mapping[str, tuple[int, ...] | None]) -> None:
        """Save pools' slots (None: back to 0..n-1), in one write."""
        with self._lock:
            slots = {k: v for k, v in self.slots.items() if k not in changes}
            slots.update({k: tuple(v) for k, v in changes.items() if v is not None})
            if slots != self.slots:
                self._commit(slots=slots)

    def forget_except(self, names: set[str]) -> None:
        with self._lock:
            kept = {name: wanted for name, wanted in self.overrides.items() if name in names}
            if kept != self.overrides:
                self._commit(overrides=kept)

    def _commit(
        self,
        *,
        overrides: dict[str, bool] | None = None,
        replicas: dict[str, int] | None = None,
        replicas_file: dict[str, int] | None = None,
        port_blocks: dict[str, int] | None = None,
        slots: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        new = (
            self.overrides if overrides is None else overrides,
            self.replicas if replicas is None else replicas,
            self.replicas_file if replicas_file is None else replicas_file,
            self.port_blocks if port_blocks is None else port_blocks,
            self.slots if slots is None else slots,
        )
        write_atomically(self.path, _render(*new))
        self.overrides, self.replicas, self.replicas_file, self.port_blocks, self.slots = new


def write_atomically(path: Path, payload: str) -> None:
    """Replace ``path`` with ``payload``, whole or not at all; StateWriteError on failure."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=path.parent)
        with os.fdopen(fd, "w") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        tmp = None
        # The rename itself must survive a power cut too.
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StateWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _render(
    overrides: dict[str, bool],
    replicas: dict[str, int],
    replicas_file: dict[str, int],
    blocks: dict[str, int],
    slots: dict[str, tuple[int, ...]],
) -> str:
    document = {
        "format": FORMAT,
        "wanted": dict(sorted(overrides.items())),
        "replicas": dict(sorted(replicas.items())),
        "replicas_file": dict(sorted(replicas_file.items())),
        "port_blocks": dict(sorted(blocks.items())),
        "slots": {k: list(v) for k, v in sorted(slots.items())},
    }
    return tomli_w.dumps(document) + END_MARK


def _validate(
    document: dict[str, Any], raw: bytes
) -> tuple[
    dict[str, bool], dict[str, int], dict[str, int], dict[str, int], dict[str, tuple[int, ...]]
]:
    """The five tables of a state file, checked; raises CorruptState."""
    known = {"format", "wanted", "replicas", "replicas_file", "port_blocks", "slots"}
    unknown = set(document) - known
    if unknown:
        raise CorruptState(f"unknown keys: {_cut(', '.join(sorted(unknown)))}")
    version = document.get("format", 1)
    if version not in (1, 2, FORMAT) or isinstance(version, bool):
        raise CorruptState(f"format: expected 1 to {FORMAT}, got {_cut(version)}")
    if version < FORMAT and "replicas_file" in document:
        raise CorruptState(f"replicas_file: not in a format {version} file")
    if version >= 2 and not raw.endswith(END_MARK.encode()):
        raise CorruptState("truncated: the end marker is missing")
    wanted = _table(document, "wanted", _UNIT_NAME, lambda v: isinstance(v, bool), "a boolean")
    replicas = _table(document, "replicas", _POOL, _count(0, MAX_INT), "an integer >= 0")
    against = _table(document, "replicas_file", _POOL, _count(0, MAX_INT), "an integer >= 0")
    stray = sorted(set(against) - set(replicas))
    if stray:
        raise CorruptState(f"replicas_file: {_cut(stray)} has no count in replicas")
    blocks = _table(document, "port_blocks", _UNIT_NAME, _count(1, 65535), "a port 1..65535")
    slots = _table(document, "slots", _POOL, _slot_list, "distinct slot numbers 0..999")
    return wanted, replicas, against, blocks, {k: tuple(v) for k, v in slots.items()}


def _slot_list(value: object) -> bool:
    return (
        isinstance(value, list)
        and all(_count(0, 999)(k) for k in value)
        and len(set(value)) == len(value)
    )


def _count(low: int, high: int) -> Any:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _table(document: dict[str, Any], name: str, keys: re.Pattern[str], ok: Any, what: str) -> Any:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise CorruptState(f"{name}: expected a table")
    for key, value in table.items():
        if not keys.fullmatch(key):
            raise CorruptState(f"{name}: {_cut(key)} is not a unit name")
        if not ok(value):
            raise CorruptState(f"{name}.{key}: expected {what}, got {_cut(value)}")
    return dict(table)


def _cut(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "…"
