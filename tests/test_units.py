"""The units room against real unit files under tests/fixtures/units/.

good/       one directory with every key, used for specs and start order
bad/<x>/    one scenario each: exactly one problem, in the file named below
many_bad/   several bad files (and a good one) that must be reported at once
"""

from __future__ import annotations

import math
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from dynsup.units import (
    KIND_PARSERS,
    DependencyError,
    DuplicateUnitError,
    ProbeKind,
    ReadySpec,
    RestartPolicy,
    ServiceSpec,
    UnitError,
    UnitErrors,
    UnitFileError,
    UnitSyntaxError,
    dependency_order,
    load_unit_file,
    load_units,
    parse_duration,
)
from dynsup.units.errors import Invalid, Problems

FIXTURES = Path(__file__).parent / "fixtures" / "units"
GOOD = FIXTURES / "good"
BAD = FIXTURES / "bad"
CONTEXT = {"state_dir": "/var/lib/dynsup", "unit_dir": "/etc/dynsup/units"}


def load_errors(*dirs: Path) -> list[UnitError]:
    with pytest.raises(UnitErrors) as caught:
        load_units(dirs, context=CONTEXT)
    return caught.value.errors


# --- the good directory ------------------------------------------------------


def test_good_directory_every_key() -> None:
    specs = load_units([GOOD], context=CONTEXT)

    assert list(specs) == ["etcd", "frontend", "nats", "sidecar", "worker"]
    assert specs["etcd"] == ServiceSpec(
        name="etcd",
        command=("etcd", "--data-dir", "/var/lib/dynsup/etcd", "--name={literal}"),
        description="etcd for Dynamo discovery",
        requires=(),
        autostart=True,
        environment=(("DATA", "/var/lib/dynsup/data"), ("ETCD_LOG_LEVEL", "warn")),
        working_directory="/var/lib/dynsup",
        restart=RestartPolicy.ALWAYS,
        restart_delay=0.25,
        restart_delay_max=120.0,
        start_limit_burst=3,
        start_limit_interval=90.0,
        success_exit_codes=(0, 143),
        stop_signal=signal.SIGINT,
        stop_timeout=7.5,
        start_seconds=2.0,
        ready=ReadySpec(
            kind=ProbeKind.HTTP,
            target="http://127.0.0.1:2379/health",
            timeout=45.0,
            interval=0.2,
        ),
        gpus=0,
    )
    assert specs["etcd"].source == str(GOOD / "etcd.toml")


def test_good_directory_defaults_and_probe_kinds() -> None:
    specs = load_units([GOOD], context=CONTEXT)

    nats = specs["nats"]
    assert nats.autostart is False
    assert nats.ready == ReadySpec(kind=ProbeKind.TCP, target="127.0.0.1:4222")
    assert (nats.restart, nats.restart_delay, nats.restart_delay_max) == (
        RestartPolicy.ON_FAILURE,
        0.1,
        30.0,
    )
    assert (nats.start_seconds, nats.stop_signal, nats.stop_timeout) == (1.0, signal.SIGTERM, 10.0)

    sidecar = specs["sidecar"]
    assert sidecar.command == ("sh", "-c", "sleep 1000")  # a string is split like a shell
    assert sidecar.stop_signal is signal.SIGTERM  # "term" without the SIG prefix
    assert sidecar.start_seconds == 0.0
    assert sidecar.restart is RestartPolicy.NO
    assert sidecar.ready is not None
    assert sidecar.ready.kind is ProbeKind.EXEC
    assert sidecar.ready.argv == ("test", "-e", "/tmp/some file")

    frontend = specs["frontend"]
    assert frontend.requires == ("etcd", "nats")
    assert frontend.stop_signal is signal.SIGINT  # given as the number 2
    assert frontend.ready == ReadySpec(
        kind=ProbeKind.MODELS, target="http://127.0.0.1:8000", models=("Qwen/Qwen3-0.6B",)
    )

    worker = specs["worker"]
    assert worker.gpus == 1
    assert worker.restart_delay == 60.0
    assert worker.restart_delay_max == 60.0  # the default max grows with a longer delay
    assert worker.ready is not None
    assert worker.ready.kind is ProbeKind.LOG
    assert worker.ready.target == r"Model loaded in \d+(\.\d+)? s"
    assert worker.ready.timeout == 600.0


def test_dependency_order_levels() -> None:
    specs = load_units([GOOD], context=CONTEXT)

    assert dependency_order(specs) == [["etcd", "nats", "sidecar"], ["frontend"], ["worker"]]


def test_dependency_order_refuses_unknown_requirement() -> None:
    specs = load_units([GOOD], context=CONTEXT)
    del specs["etcd"]

    with pytest.raises(ValueError, match="etcd"):
        dependency_order(specs)


def test_without_context_placeholders_are_kept_as_written() -> None:
    etcd = load_units([GOOD])["etcd"]

    assert etcd.command[2:] == ("{state_dir}/etcd", "--name={{literal}}")
    assert etcd.working_directory == "{state_dir}"


def test_load_unit_file_matches_directory_load() -> None:
    assert (
        load_unit_file(GOOD / "etcd.toml", context=CONTEXT)
        == (load_units([GOOD], context=CONTEXT)["etcd"])
    )


def test_load_unit_file_raises_unit_errors() -> None:
    with pytest.raises(UnitErrors) as caught:
        load_unit_file(BAD / "bad_signal" / "bad-signal.toml")

    [error] = caught.value.errors
    assert error.key == "service.stop_signal"


def test_empty_directory_gives_no_units(tmp_path: Path) -> None:
    assert load_units([tmp_path]) == {}


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    shutil.copy(GOOD / "nats.toml", tmp_path / "nats.toml")
    (tmp_path / ".#nats.toml").write_text("not toml at all [")

    assert list(load_units([tmp_path])) == ["nats"]


def test_same_directory_twice_is_not_a_duplicate() -> None:
    assert len(load_units([GOOD, GOOD / "." / ".." / "good"], context=CONTEXT)) == 5


def test_registered_kind_parser_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse_model(
        name: str,
        document: Mapping[str, Any],
        problems: Problems,
        context: Mapping[str, str] | None,
    ) -> ServiceSpec:
        return ServiceSpec(name=name, command=("serve", document["model"]["name"]))

    monkeypatch.setitem(KIND_PARSERS, "model", parse_model)

    spec = load_unit_file(BAD / "model_kind" / "model-kind.toml")
    assert spec.command == ("serve", "Qwen/Qwen3-0.6B")


# --- one problem per scenario ------------------------------------------------


class Case(NamedTuple):
    scenario: str  # directory under bad/
    file: str
    key: str
    fragment: str  # part of the message
    kind: type[UnitError] = UnitError


SCENARIOS = [
    Case(
        "syntax_error",
        "syntax-error.toml",
        "",
        "invalid TOML: Unclosed array (at line 3",
        UnitSyntaxError,
    ),
    Case(
        "wrong_type",
        "wrong-type.toml",
        "service.working_directory",
        "expected a string, got an integer (5)",
    ),
    Case(
        "bool_for_int",
        "bool-for-int.toml",
        "service.start_limit_burst",
        "expected an integer, got a boolean (true)",
    ),
    Case(
        "unknown_key",
        "unknown-key.toml",
        "service.restart_dealy",
        "unknown key 'restart_dealy' in [service]; did you mean 'restart_delay'?",
    ),
    Case(
        "unknown_table",
        "unknown-table.toml",
        "resource",
        "unknown table [resource]; did you mean [resources]?",
    ),
    Case(
        "negative_duration",
        "negative-duration.toml",
        "service.stop_timeout",
        "must not be negative, got -1",
    ),
    Case(
        "bad_duration",
        "bad-duration.toml",
        "service.restart_delay",
        'expected a duration (seconds as a number, or a string like "500ms" or "2m"), got "abc"',
    ),
    Case(
        "bad_signal",
        "bad-signal.toml",
        "service.stop_signal",
        'unknown signal "SIGTREM"; did you mean "SIGTERM"?',
    ),
    Case("empty_command", "empty-command.toml", "service.command", "must not be empty"),
    Case("empty_arg", "empty-arg.toml", "service.command[1]", "must not be an empty string"),
    Case("missing_command", "missing-command.toml", "service.command", "[service] needs 'command'"),
    Case(
        "unterminated_quote", "unterminated-quote.toml", "service.command", "No closing quotation"
    ),
    Case(
        "missing_dependency",
        "missing-dependency.toml",
        "unit.requires",
        'unit "missing-dependency" requires "nosuch-db", but no unit "nosuch-db" exists',
        DependencyError,
    ),
    Case(
        "cycle",
        "cycle-a.toml",
        "unit.requires",
        'dependency cycle: "cycle-a" → "cycle-b" → "cycle-c" → "cycle-a"',
        DependencyError,
    ),
    Case(
        "self_require",
        "self-require.toml",
        "unit.requires",
        'unit "self-require" requires itself',
        DependencyError,
    ),
    Case(
        "duplicate_normalised",
        "my_app.toml",
        "",
        'unit name "my_app" clashes with "My-App"',
        DuplicateUnitError,
    ),
    Case(
        "bad_restart",
        "bad-restart.toml",
        "service.restart",
        'expected one of "no", "on-failure", "always", got "sometimes"',
    ),
    Case("two_probes", "two-probes.toml", "ready", "expected one probe, found 2: 'tcp', 'http'"),
    Case(
        "bad_regex",
        "bad-regex.toml",
        "ready.log",
        'bad regular expression "listening on ([0-9": unterminated character set',
    ),
    Case("bad_tcp_port", "bad-tcp-port.toml", "ready.tcp", "expected a port number 1..65535"),
    Case("http_scheme", "http-scheme.toml", "ready.http", 'expected a URL starting with "http://"'),
    Case(
        "models_without_names",
        "models-without-names.toml",
        "ready.names",
        "the 'models' probe needs names",
    ),
    Case("negative_gpus", "negative-gpus.toml", "resources.gpus", "must be at least 0, got -1"),
    Case(
        "delay_max_below",
        "delay-max-below.toml",
        "service.restart_delay_max",
        "must be at least restart_delay (5s), got 1s",
    ),
    Case(
        "exit_code_range",
        "exit-code-range.toml",
        "service.success_exit_codes[1]",
        "an exit code is 0..255, got 256",
    ),
    Case(
        "env_not_string",
        "env-not-string.toml",
        "service.environment.PORT",
        "expected a string, got an integer (8080)",
    ),
    Case(
        "unknown_placeholder",
        "unknown-placeholder.toml",
        "service.command[2]",
        "unknown placeholder {stat_dir}; did you mean {state_dir}? "
        "(known placeholders: {state_dir}, {unit_dir})",
    ),
    Case(
        "no_kind",
        "no-kind.toml",
        "",
        "a unit file needs one of the tables [service] or [model] or [dynamo]",
    ),
    Case(
        "two_kinds",
        "two-kinds.toml",
        "dynamo",
        "a unit has one kind, but this file has [service] and [dynamo]",
    ),
    Case("model_kind", "model-kind.toml", "model.engine", 'expected one of "vllm", "mocker"'),
    Case("bad_name", "bad+name.toml", "", 'invalid unit name "bad+name"'),
    Case(
        "autostart_not_bool",
        "autostart-not-bool.toml",
        "unit.autostart",
        'expected a boolean (true or false), got a string ("yes")',
    ),
]


@pytest.mark.parametrize("case", SCENARIOS, ids=[case.scenario for case in SCENARIOS])
def test_bad_scenario(case: Case) -> None:
    [error] = load_errors(BAD / case.scenario)

    assert Path(error.file) == BAD / case.scenario / case.file
    assert error.key == case.key
    assert case.fragment in error.message
    assert type(error) is case.kind


def test_every_scenario_at_once() -> None:
    errors = load_errors(*(BAD / case.scenario for case in SCENARIOS))

    found = {(Path(e.file).name, e.key) for e in errors}
    assert found == {(case.file, case.key) for case in SCENARIOS}
    assert len(errors) == len(SCENARIOS)


def test_same_name_in_two_directories_names_both_files() -> None:
    first, second = BAD / "duplicate_across" / "a", BAD / "duplicate_across" / "b"

    [error] = load_errors(first, second)

    assert isinstance(error, DuplicateUnitError)
    assert Path(error.file) == second / "twin.toml"
    assert error.message == f'unit "twin" is also defined in {first / "twin.toml"}'


def test_duplicate_after_normalisation_names_both_files() -> None:
    directory = BAD / "duplicate_normalised"

    [error] = load_errors(directory)

    assert Path(error.file) == directory / "my_app.toml"
    assert f"({directory / 'My-App.toml'})" in error.message


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    [error] = load_errors(missing, GOOD)

    assert (error.file, error.key, error.message) == (
        str(missing),
        "",
        "unit directory does not exist",
    )


# --- many problems at once ------------------------------------------------------


def test_directory_with_several_bad_files_reports_all_of_them() -> None:
    with pytest.raises(UnitErrors) as caught:
        load_units([FIXTURES / "many_bad"])

    errors = caught.value.errors
    assert [(Path(e.file).name, e.key) for e in errors] == [
        ("broken.toml", ""),
        ("several.toml", "service.command[1]"),
        ("several.toml", "service.restart"),
        ("several.toml", "service.stop_timeout"),
        ("several.toml", "unit.requires"),
        ("typo.toml", "service.comand"),
        ("typo.toml", "service.command"),
    ]
    assert "Expected ']' at the end of a table declaration (at line 1" in errors[0].message
    assert "did you mean 'command'?" in errors[5].message
    # str() lists every problem on its own line as "file: key: message".
    lines = str(caught.value).splitlines()
    assert lines == [str(error) for error in errors]
    assert lines[1] == f"{errors[1].file}: service.command[1]: must not be an empty string"
    assert lines[0].startswith(f"{errors[0].file}: invalid TOML: ")


def test_errors_share_one_root() -> None:
    for kind in (UnitError, UnitErrors, UnitSyntaxError, DuplicateUnitError, DependencyError):
        assert issubclass(kind, UnitFileError)


# --- durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (10, 10.0),
        (0, 0.0),
        (0.5, 0.5),
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("250us", 0.00025),
        (" 3 s ", 3.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert math.isclose(parse_duration(value), seconds)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (True, "got a boolean (true)"),
        ("abc", 'got "abc"'),
        ("5", 'got "5"'),  # a string needs a unit
        ("1d", 'got "1d"'),
        ("-5s", 'must not be negative, got "-5s"'),
        (-0.5, "must not be negative, got -0.5"),
        (float("inf"), "expected a finite duration"),
        ([1], "got an array"),
    ],
)
def test_parse_duration_refuses(value: object, fragment: str) -> None:
    with pytest.raises(Invalid) as caught:
        parse_duration(value)

    assert fragment in str(caught.value)
