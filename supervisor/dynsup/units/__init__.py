"""Unit files: read ``*.toml`` unit directories into frozen, validated specs.

    specs = load_units(["/etc/dynsup/units"], context={"state_dir": "/var/lib/dynsup"})
    for level in dependency_order(specs):
        ...  # units of one level may start together

Every problem of every file is raised at once as :class:`UnitErrors`; see
:mod:`dynsup.units.errors` for the hierarchy.
"""

from .durations import parse_duration
from .errors import (
    DependencyError,
    DuplicateUnitError,
    UnitError,
    UnitErrors,
    UnitFileError,
    UnitSyntaxError,
)
from .loader import KIND_PARSERS, KINDS, KindParser, dependency_order, load_unit_file, load_units
from .spec import ProbeKind, ReadySpec, RestartPolicy, ServiceSpec, freeze_env

__all__ = [
    "KINDS",
    "KIND_PARSERS",
    "DependencyError",
    "DuplicateUnitError",
    "KindParser",
    "ProbeKind",
    "ReadySpec",
    "RestartPolicy",
    "ServiceSpec",
    "UnitError",
    "UnitErrors",
    "UnitFileError",
    "UnitSyntaxError",
    "dependency_order",
    "freeze_env",
    "load_unit_file",
    "load_units",
    "parse_duration",
]
