"""Load unit directories: find files, name units, dispatch on kind, check across units.

A file's stem is its unit's name. Each file is read on its own (TOML,
the common ``[unit]`` table, then the parser of its kind); the directory
as a whole is then checked for duplicate names and for ``requires`` that
name no unit or form a cycle. Every problem of every file is gathered and
raised at the end as one :class:`~dynsup.units.errors.UnitErrors`.

Kinds are told apart by their top-level table. :data:`KIND_PARSERS` maps
a kind to its parser; a kind in :data:`KINDS` without a parser is
recognised but refused ("not supported yet") until its module registers
one (``KIND_PARSERS["model"] = parse_model``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Protocol

from .errors import (
    DependencyError,
    DuplicateUnitError,
    Problems,
    UnitError,
    UnitErrors,
    UnitSyntaxError,
    as_bool,
    as_list_of,
    as_nonempty_str,
    as_str,
    did_you_mean,
    show,
)
from .service import SERVICE_TABLES, parse_service, section
from .spec import ServiceSpec
from .stack import parse_model, parse_stack
from .tomlfile import TOO_DEEP, TomlFileError, check_values, read_toml


class KindParser(Protocol):
    """Turns the document of one unit file into its spec.

    Problems go to ``problems``; the returned spec is discarded when there
    are any. ``[unit]`` is not the parser's business: the loader reads it
    for every kind and sets ``description``, ``requires``, ``autostart``
    and ``source`` on the result.
    """

    def __call__(
        self,
        name: str,
        document: Mapping[str, Any],
        problems: Problems,
        context: Mapping[str, str] | None,
    ) -> Any: ...


class Expander(Protocol):
    """Turns model units and stack settings into services (the `dynamo` room does).

    Gets the services read from files and every other spec by kind; returns
    the complete set of services and the problems found (naming files).
    """

    def __call__(
        self, services: dict[str, ServiceSpec], others: dict[str, list[Any]]
    ) -> tuple[dict[str, ServiceSpec], list[UnitError]]: ...


KINDS = ("service", "model", "dynamo")
KIND_PARSERS: dict[str, KindParser] = {
    "service": parse_service,
    "model": parse_model,
    "dynamo": parse_stack,
}
# Every top-level table any kind may use; a kind's parser checks which of
# them make sense for it.
TOP_LEVEL_TABLES = ("unit", *KINDS, *SERVICE_TABLES)
UNIT_KEYS = ("description", "requires", "autostart")

_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


@dataclass(frozen=True)
class _Parsed:
    """One file after its own checks, before the cross-unit ones."""

    name: str
    file: str
    requires: tuple[str, ...]
    spec: Any  # a ServiceSpec, ModelSpec or StackSpec; None when the file has problems


def load_units(
    dirs: Sequence[str | Path],
    *,
    context: Mapping[str, str] | None = None,
    expand: Expander | None = None,
) -> dict[str, ServiceSpec]:
    """Specs of every ``*.toml`` unit in ``dirs``, keyed by unit name.

    ``context`` fills placeholders such as ``{state_dir}`` (None: leave them).
    ``expand`` turns ``[model]``/``[dynamo]`` units into services; without
    it such units are an error. Raises :class:`UnitErrors` with every
    problem found, if there is any.
    """
    errors: list[UnitError] = []
    files = _find_files(dirs, errors)
    errors.extend(_check_duplicates(files))
    parsed: list[_Parsed] = []
    for path in files:
        one, problems = _parse_file(path, context)
        parsed.append(one)
        errors.extend(problems)
    services = {one.name: one.spec for one in parsed if isinstance(one.spec, ServiceSpec)}
    others: dict[str, list[Any]] = {}
    for one in parsed:
        if one.spec is not None and not isinstance(one.spec, ServiceSpec):
            others.setdefault(type(one.spec).__name__, []).append(one.spec)
    if others and expand is None:
        for one in parsed:
            if one.spec is not None and not isinstance(one.spec, ServiceSpec):
                errors.append(UnitError(one.file, "", "[model] and [dynamo] units need dynsupd"))
    elif expand is not None and not errors:
        services, expand_errors = expand(services, others)
        errors.extend(expand_errors)
        # Implicit units (etcd, frontend, workers) take part in the checks too.
        parsed = [
            *(one for one in parsed if isinstance(one.spec, ServiceSpec) or one.spec is None),
            *(
                _Parsed(name, spec.source, spec.requires, spec)
                for name, spec in services.items()
                if name not in {one.name for one in parsed}
            ),
        ]
    errors.extend(_check_requires(parsed))
    if errors:
        raise UnitErrors(errors)
    return dict(sorted(services.items()))


def load_unit_file(path: str | Path, *, context: Mapping[str, str] | None = None) -> ServiceSpec:
    """The spec of one unit file, without the checks that need its directory."""
    one, problems = _parse_file(Path(path), context)
    if problems or one.spec is None:
        raise UnitErrors(problems)
    return one.spec


def dependency_order(specs: Mapping[str, ServiceSpec]) -> list[list[str]]:
    """Start levels: every unit's requirements are in earlier levels.

    Units of one level may start concurrently; stop in reverse order.
    Raises ``ValueError`` when a unit requires one not in ``specs`` and
    ``graphlib.CycleError`` on a cycle (both impossible after load_units).
    """
    missing = {req for spec in specs.values() for req in spec.requires} - specs.keys()
    if missing:
        raise ValueError(f"required units not given: {', '.join(sorted(missing))}")
    sorter = TopologicalSorter({name: spec.requires for name, spec in specs.items()})
    sorter.prepare()
    levels: list[list[str]] = []
    while sorter.is_active():
        level = sorted(sorter.get_ready())
        levels.append(level)
        sorter.done(*level)
    return levels


# --- finding and naming files ---------------------------------------------


def _find_files(dirs: Sequence[str | Path], errors: list[UnitError]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for directory in map(Path, dirs):
        # The same directory given twice would make every unit its own duplicate.
        if directory.resolve() in seen:
            continue
        seen.add(directory.resolve())
        if not directory.exists():
            errors.append(UnitError(str(directory), "", "unit directory does not exist"))
        elif not directory.is_dir():
            errors.append(UnitError(str(directory), "", "not a directory"))
        else:
            # Hidden files are editors' lock and backup files (".#web.toml").
            found = (p for p in directory.glob("*.toml") if not p.name.startswith("."))
            files.extend(sorted(found))
    return files


def normalise(name: str) -> str:
    """The form two unit names must not share: case and "_" vs "-" ignored."""
    return name.lower().replace("_", "-")


def _check_duplicates(files: Iterable[Path]) -> list[UnitError]:
    errors: list[UnitError] = []
    first: dict[str, Path] = {}
    for path in files:
        other = first.setdefault(normalise(path.stem), path)
        if other is path:
            continue
        if other.stem == path.stem:
            message = f"unit {show(path.stem)} is also defined in {other}"
        else:
            message = (
                f"unit name {show(path.stem)} clashes with {show(other.stem)} ({other}): "
                'names must differ when case is ignored and "_" counts as "-"'
            )
        errors.append(DuplicateUnitError(str(path), "", message))
    return errors


# --- one file ----------------------------------------------------------------


def _parse_file(path: Path, context: Mapping[str, str] | None) -> tuple[_Parsed, list[UnitError]]:
    problems = Problems(str(path))
    name = path.stem
    if not _NAME.fullmatch(name):
        problems.add(
            "",
            f"invalid unit name {show(name)} (the file name without .toml): "
            'use only letters, digits, "-", "_", "." and "@"',
        )
    document = _read_toml(path, problems)
    if document is None or not _check_values(document, problems):
        return _Parsed(name, str(path), (), None), problems.errors
    _check_top_level(document, problems)
    unit = section(problems, document, "unit", UNIT_KEYS)
    requires = _requires(name, unit.get("requires", as_list_of(as_nonempty_str), []), problems)
    header = {
        "description": unit.get("description", as_str, ""),
        "requires": requires,
        "autostart": unit.get("autostart", as_bool, True),
        "source": str(path),
    }
    spec = _parse_kind(name, document, problems, context)
    if spec is None or problems.errors:
        return _Parsed(name, str(path), requires, None), problems.errors
    # [unit] applies to every kind that has its fields (stack settings: source only).
    own = {f.name for f in fields(spec)}
    return _Parsed(
        name,
        str(path),
        requires,
        replace(spec, **{key: value for key, value in header.items() if key in own}),
    ), []


def _read_toml(path: Path, problems: Problems) -> dict[str, Any] | None:
    try:
        return read_toml(path)
    except FileNotFoundError as exc:  # removed since the directory was listed
        problems.add("", f"cannot read: {exc.strerror or exc}", UnitSyntaxError)
    except TomlFileError as exc:
        problems.add("", str(exc), UnitSyntaxError)
    return None


def _check_values(document: dict[str, Any], problems: Problems) -> bool:
    """Report NUL characters and values nested too deeply; False: read no further.

    A NUL is reported at its key and the file is read on (every converter
    may then assume there is none); below a value nested too deeply, the
    converters are not run at all.
    """
    deep = False
    for key, message in check_values(document):
        problems.add(key, message)
        deep = deep or message == TOO_DEEP
    return not deep


def _check_top_level(document: Mapping[str, Any], problems: Problems) -> None:
    for key, value in document.items():
        if key in TOP_LEVEL_TABLES:
            continue
        guess = did_you_mean(key, TOP_LEVEL_TABLES)
        known = ", ".join(f"[{table}]" for table in TOP_LEVEL_TABLES)
        what = f"unknown table [{key}]" if isinstance(value, dict) else f"unknown key '{key}'"
        hint = f"did you mean [{guess}]?" if guess else f"expected tables: {known}"
        problems.add(key, f"{what}; {hint}")


def _requires(name: str, requires: list[str], problems: Problems) -> tuple[str, ...]:
    """Requirements without repeats or the unit itself (a self-require is reported)."""
    if name in requires:
        problems.add("unit.requires", f"unit {show(name)} requires itself", DependencyError)
    return tuple(dict.fromkeys(req for req in requires if req != name))


def _parse_kind(
    name: str,
    document: Mapping[str, Any],
    problems: Problems,
    context: Mapping[str, str] | None,
) -> Any:
    kinds = [kind for kind in KINDS if kind in document]
    if not kinds:
        tables = " or ".join(f"[{kind}]" for kind in KINDS)
        problems.add("", f"no kind: a unit file needs one of the tables {tables}")
        return None
    if len(kinds) > 1:
        found = " and ".join(f"[{kind}]" for kind in kinds)
        problems.add(kinds[1], f"a unit has one kind, but this file has {found}")
        return None
    parser = KIND_PARSERS.get(kinds[0])
    if parser is None:
        problems.add(kinds[0], f"[{kinds[0]}] units are not supported yet")
        return None
    return parser(name, document, problems, context)


# --- across units ---------------------------------------------------------------


def _check_requires(parsed: Sequence[_Parsed]) -> list[UnitError]:
    # Units whose own file has problems still count as existing, so that one
    # bad file does not also turn into "missing unit" errors elsewhere.
    names = {one.name for one in parsed}
    owner: dict[str, _Parsed] = {}
    for one in parsed:
        owner.setdefault(one.name, one)
    errors = [error for one in owner.values() for error in _missing(one, names)]
    graph = {one.name: {req for req in one.requires if req in names} for one in owner.values()}
    errors.extend(_cycles(graph, owner))
    return errors


def _missing(one: _Parsed, names: set[str]) -> Iterable[UnitError]:
    for req in one.requires:
        if req in names:
            continue
        guess = did_you_mean(req, names) or next(
            (n for n in sorted(names) if normalise(n) == normalise(req)), None
        )
        hint = f"; did you mean {show(guess)}?" if guess else ""
        message = f"unit {show(one.name)} requires {show(req)}, but no unit {show(req)} exists"
        yield DependencyError(one.file, "unit.requires", message + hint)


def _cycles(graph: dict[str, set[str]], owner: Mapping[str, _Parsed]) -> list[UnitError]:
    """One error per dependency cycle, on the file of its first unit by name."""
    errors: list[UnitError] = []
    while True:
        try:
            TopologicalSorter(graph).prepare()
            return errors
        except CycleError as exc:
            # graphlib lists [a, b, ..., a] with each node a requirement of the
            # next; reversed, each unit requires the one after it.
            cycle: list[str] = list(reversed(exc.args[1]))[:-1]
            start = cycle.index(min(cycle))
            cycle = cycle[start:] + cycle[:start]
            chain = " → ".join(show(unit) for unit in [*cycle, cycle[0]])
            message = f"dependency cycle: {chain} (each requires the next)"
            errors.append(DependencyError(owner[cycle[0]].file, "unit.requires", message))
            # Break this cycle at one edge and look again: there may be others.
            graph[cycle[0]].discard(cycle[1])
