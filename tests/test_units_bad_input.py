"""Hostile unit files: each is refused with file, key and reason, never a traceback.

Every scenario here crashed the loader once (RecursionError, OverflowError,
ValueError, TypeError) or let a value through that broke later (a NUL in a
path, a port in fullwidth digits).
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from dynsup.config import DaemonConfig
from dynsup.daemon import Settings, load_specs
from dynsup.units import UnitErrors, load_units

from .daemon_helpers import DYNSUPD, run_dynsupd, write_unit

SERVICE = '[service]\ncommand = ["true"]\n'
MODEL = '[model]\nname = "m"\npath = "m"\nengine = "mocker"\n'

# name of the scenario → (unit file body, key named, words of the message)
SCENARIOS: dict[str, tuple[str, str, str]] = {
    "date_in_engine_args": (
        MODEL + "engine_args = { when = 1979-05-27T07:32:00Z }\n",
        "model.engine_args.when",
        "date/time",
    ),
    "date_deep_in_engine_args": (
        MODEL + "engine_args = { cfg = { at = [07:32:00] } }\n",
        "model.engine_args.cfg.at[0]",
        "date/time",
    ),
    "arrays_nested_3000_deep": (
        "[service]\ncommand = " + "[" * 3000 + "]" * 3000 + "\n",
        "",
        "nested too deeply",
    ),
    "inline_tables_nested_3000_deep": (
        SERVICE + "environment = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n",
        "",
        "nested too deeply",
    ),
    "engine_args_nested_40_deep": (
        MODEL + "engine_args = { a = " + "[" * 40 + "]" * 40 + " }\n",
        "model.engine_args.a" + "[0]" * 13,
        "nested too deeply",
    ),
    "duration_of_10_to_the_400": (
        SERVICE + "stop_timeout = 1" + "0" * 400 + "\n",
        "service.stop_timeout",
        "at most one year",
    ),
    "duration_string_of_400_digits": (
        SERVICE + 'restart_delay = "1' + "0" * 400 + 's"\n',
        "service.restart_delay",
        "at most one year",
    ),
    "duration_of_a_century": (
        SERVICE + "start_limit_interval = 3153600000\n",
        "service.start_limit_interval",
        "at most one year",
    ),
    "duration_in_arabic_indic_digits": (
        SERVICE + 'stop_timeout = "\u0665s"\n',
        "service.stop_timeout",
        "expected a duration",
    ),
    "integer_of_5000_digits": (
        SERVICE + "start_limit_burst = " + "7" * 5000 + "\n",
        "",
        "more than 4300 digits",
    ),
    "integer_of_4000_digits": (
        SERVICE + "start_limit_burst = " + "7" * 4000 + "\n",
        "service.start_limit_burst",
        "must be at most 2147483647",
    ),
    "tcp_port_in_fullwidth_digits": (
        SERVICE + '[ready]\ntcp = "127.0.0.1:\uff18\uff10\uff10\uff10"\n',
        "ready.tcp",
        "port number 1..65535",
    ),
    "tcp_port_in_arabic_indic_digits": (
        SERVICE + '[ready]\ntcp = "127.0.0.1:\u0668\u0660\u0660\u0660"\n',
        "ready.tcp",
        "port number 1..65535",
    ),
    "http_url_with_unclosed_ipv6_bracket": (
        SERVICE + '[ready]\nhttp = "http://[::1"\n',
        "ready.http",
        "cannot parse URL",
    ),
    "http_url_with_a_line_break": (
        SERVICE + '[ready]\nhttp = "http://127.0.0.1:80/a\\r\\nX-Evil: 1"\n',
        "ready.http",
        "control characters",
    ),
    "models_url_with_unclosed_ipv6_bracket": (
        SERVICE + '[ready]\nmodels = "http://[::1/v1/models"\nnames = ["m"]\n',
        "ready.models",
        "cannot parse URL",
    ),
    "log_regex_nested_1000_deep": (
        SERVICE + '[ready]\nlog = "' + "(" * 1000 + ")" * 1000 + '"\n',
        "ready.log",
        "nested too deeply",
    ),
    "nul_in_working_directory": (
        SERVICE + 'working_directory = "/tmp\\u0000x"\n',
        "service.working_directory",
        "NUL",
    ),
    "nul_in_engine_args": (
        MODEL + 'engine_args = { tokenizer = "x\\u0000y" }\n',
        "model.engine_args.tokenizer",
        "NUL",
    ),
    "nul_in_model_path": (
        '[model]\nname = "m"\npath = "m\\u0000"\nengine = "mocker"\n',
        "model.path",
        "NUL",
    ),
    "nul_in_stack_host": (
        '[dynamo]\nhost = "127.0.0.1\\u0000"\n',
        "dynamo.host",
        "NUL",
    ),
    "model_path_longer_than_a_file_name": (
        '[model]\nname = "m"\npath = "' + "p" * 5000 + '"\nengine = "mocker"\nreplicas = -1\n',
        "model.replicas",
        "at least 0",
    ),
}


def load_with_dynsupd_rules(units: Path, state: Path) -> None:
    """What dynsupd and `update` run: load, then expand model units."""
    settings = Settings(DaemonConfig(), (str(units),), str(state / "s.sock"), state, "json")
    load_specs(settings)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_hostile_unit_file_is_named_not_crashed(tmp_path: Path, scenario: str) -> None:
    body, key, words = SCENARIOS[scenario]
    units = tmp_path / "units"
    path = write_unit(units, "x", body)
    with pytest.raises(UnitErrors) as caught:
        load_with_dynsupd_rules(units, tmp_path / "state")
    errors = caught.value.errors
    assert any(e.file == str(path) and e.key == key and words in e.message for e in errors), [
        str(e)[:300] for e in errors
    ]
    assert all(len(str(e)) < 1000 for e in errors)  # no 4,000-digit numbers in messages


def test_unit_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    fifo = units / "pipe.toml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_units([units])
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    loader.join(timeout=30)
    if loader.is_alive():  # blocked opening the FIFO: give it a writer so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        loader.join()
        pytest.fail("load_units waited for a writer on a FIFO")
    [error] = outcome
    assert isinstance(error, UnitErrors)
    assert [(e.key, e.message) for e in error.errors] == [("", "not a regular file")]


def test_dynsupd_exits_2_naming_each_hostile_file(tmp_path: Path) -> None:
    units = tmp_path / "units"
    for scenario in ("date_in_engine_args", "arrays_nested_3000_deep", "duration_of_10_to_the_400"):
        write_unit(units, scenario, SCENARIOS[scenario][0])
    done = subprocess.run(
        [
            DYNSUPD,
            "--socket",
            str(tmp_path / "s.sock"),
            "--state-dir",
            str(tmp_path / "st"),
            str(units),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    for scenario in ("date_in_engine_args", "arrays_nested_3000_deep", "duration_of_10_to_the_400"):
        assert f"{scenario}.toml" in done.stderr


def test_update_with_a_date_in_engine_args_is_bad_config_not_internal(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(units, "base", '[service]\ncommand = ["sleep", "60"]\nstart_seconds = 0\n')
    with run_dynsupd(tmp_path, units) as daemon:
        write_unit(units, "model", SCENARIOS["date_in_engine_args"][0])
        done = daemon.ctl("--json", "update")
        assert done.returncode == 2, done.stdout + done.stderr
        assert "BAD_CONFIG" in done.stdout + done.stderr
        assert "model.engine_args.when" in done.stdout + done.stderr
