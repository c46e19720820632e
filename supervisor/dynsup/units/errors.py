"""What can be wrong with unit files, and the machinery that gathers it.

Loading never stops at the first problem: every problem of every file is
recorded as a :class:`UnitError` and the whole load raises one
:class:`UnitErrors` at the end, so an operator fixes a directory in one
pass. The hierarchy, all under one root::

    UnitFileError              root: catch this to handle any unit-file problem
    ├── UnitError              one problem: .file, .key (dotted TOML path), .message
    │   ├── UnitSyntaxError    the file cannot be read as UTF-8 TOML
    │   ├── DuplicateUnitError two files give the same unit name
    │   └── DependencyError    [unit] requires: missing unit, self-require, cycle
    └── UnitErrors             every UnitError of one load, in .errors

``str(UnitErrors)`` lists every problem, one per line, as
``file: key: message`` (``file: message`` where the problem is the whole
file, e.g. a TOML syntax error).

Below the hierarchy are the private helpers the parsers share:
:class:`Invalid` (a converter's complaint about one value, not yet tied to
a file), :class:`Problems` (the per-file list) and :class:`Table` (reads one
TOML table, reports unknown keys and turns ``Invalid`` into ``UnitError``).
"""

from __future__ import annotations

import datetime
import difflib
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class UnitFileError(Exception):
    """Root of every error about unit files."""


class UnitError(UnitFileError):
    """One problem at one key of one file."""

    def __init__(self, file: str, key: str, message: str) -> None:
        super().__init__(file, key, message)
        self.file = file
        self.key = key  # dotted path such as "service.command[1]"; "" for the whole file
        self.message = message

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}: {self.key}: {self.message}"
        return f"{self.file}: {self.message}"


class UnitSyntaxError(UnitError):
    """The file is not valid TOML (or not readable as UTF-8 text)."""


class DuplicateUnitError(UnitError):
    """Two files name the same unit (same stem, or equal after normalisation)."""


class DependencyError(UnitError):
    """A ``requires`` entry names no unit, the unit itself, or closes a cycle."""


class UnitErrors(UnitFileError):
    """Every problem found by one load; raised once, after all files were read."""

    def __init__(self, errors: Iterable[UnitError]) -> None:
        # Sorted by file (stable, so a file's errors keep their order) so that
        # cross-unit errors land next to the other problems of their file.
        self.errors: list[UnitError] = sorted(errors, key=lambda e: e.file)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


# --- describing values in messages -----------------------------------------


def show(value: object) -> str:
    """A value as TOML would write it, for messages: "abc", 3, true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def short_int(number: int) -> str:
    """An integer for a message: one of 4,000 digits is cut to its ends."""
    text = str(number)
    return text if len(text) <= 40 else f"{text[:20]}…{text[-10:]} ({len(text)} digits)"


def describe(value: object) -> str:
    """A TOML value's type and the value itself: 'a boolean (true)'."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return f"a boolean ({show(value)})"
    if isinstance(value, str):
        return f"a string ({show(value)})"
    if isinstance(value, int):
        return f"an integer ({short_int(value)})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice to a misspelt word, if any is close enough."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


# --- gathering --------------------------------------------------------------


class Invalid(ValueError):
    """A converter's complaint about one value.

    A ValueError, so that a converter used outside unit files (such as
    ``parse_duration`` for the daemon's own configuration) raises what a
    caller expects from a parse function.

    ``at`` extends the key being read (``"[2]"`` for an array item,
    ``".HOME"`` for a table entry). One ``Invalid`` may carry several
    problems so that a converter can report every bad item of an array.
    """

    def __init__(self, message: str, *, at: str = "") -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = [(at, message)]

    @classmethod
    def many(cls, problems: Sequence[tuple[str, str]]) -> Invalid:
        invalid = cls(problems[0][1], at=problems[0][0])
        invalid.problems = list(problems)
        return invalid


def expected(what: str, value: object) -> Invalid:
    return Invalid(f"expected {what}, got {describe(value)}")


class Problems:
    """The problems of one file, in the order they were found."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[UnitError] = []

    def add(self, key: str, message: str, kind: type[UnitError] = UnitError) -> None:
        self.errors.append(kind(self.file, key, message))

    def add_invalid(self, key: str, invalid: Invalid) -> None:
        for at, message in invalid.problems:
            self.add(key + at, message)


class Table:
    """One TOML table being read: unknown keys are reported on creation,
    and every conversion failure is recorded instead of raised."""

    def __init__(
        self, problems: Problems, path: str, data: Mapping[str, Any], known: Collection[str]
    ) -> None:
        self.problems = problems
        self.path = path
        self.data = data
        for name in data:
            if name not in known:
                problems.add(self.key(name), unknown_key_message(name, f"[{path}]", known))

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def report(self, name: str, message: str) -> None:
        self.problems.add(self.key(name), message)

    def get(self, name: str, convert: Callable[[Any], T], default: T) -> T:
        """The converted value, or ``default`` when absent or invalid."""
        if name not in self.data:
            return default
        try:
            return convert(self.data[name])
        except Invalid as invalid:
            self.problems.add_invalid(self.key(name), invalid)
            return default

    def require(self, name: str, convert: Callable[[Any], T], default: T) -> T:
        """Like :meth:`get`, but a missing key is a problem."""
        if name not in self.data:
            self.report(name, f"missing; [{self.path}] needs '{name}'")
            return default
        return self.get(name, convert, default)


def unknown_key_message(name: str, where: str, known: Collection[str]) -> str:
    guess = did_you_mean(name, known)
    if guess is not None:
        return f"unknown key '{name}' in {where}; did you mean '{guess}'?"
    return f"unknown key '{name}' in {where}; known keys: {', '.join(sorted(known))}"


# --- converters for plain TOML types ----------------------------------------
# Each takes a raw TOML value and returns it checked, or raises Invalid.
# bool is checked first everywhere: TOML `true` must never pass as 1.


def as_str(value: object) -> str:
    if not isinstance(value, str):
        raise expected("a string", value)
    return value


def as_nonempty_str(value: object) -> str:
    text = as_str(value)
    if not text:
        raise Invalid("must not be an empty string")
    return text


def as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise expected("a boolean (true or false)", value)
    return value


def as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise expected("an integer", value)
    return value


# No count, port or limit in a unit file comes near this; a larger number is a
# typo, and would only overflow somewhere further on (C ints, Ray resources).
MAX_INT = 2**31 - 1


def int_at_least(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        number = as_int(value)
        if number < minimum:
            raise Invalid(f"must be at least {minimum}, got {short_int(number)}")
        if number > MAX_INT:
            raise Invalid(f"must be at most {MAX_INT}, got {short_int(number)}")
        return number

    return convert


def as_table(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise expected("a table", value)
    return value


def as_list_of(item: Callable[[object], T]) -> Callable[[object], list[T]]:
    """An array whose every item passes ``item``; reports every bad item."""

    def convert(value: object) -> list[T]:
        if not isinstance(value, list):
            raise expected("an array", value)
        result: list[T] = []
        problems: list[tuple[str, str]] = []
        for index, raw in enumerate(value):
            try:
                result.append(item(raw))
            except Invalid as invalid:
                problems.extend((f"[{index}]{at}", msg) for at, msg in invalid.problems)
        if problems:
            raise Invalid.many(problems)
        return result

    return convert
