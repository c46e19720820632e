"""The daemon's configuration file: every error names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynsup.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dynsupd.toml"
    path.write_text(text)
    return path


def test_journal_rate_limit_takes_a_duration_and_a_count(tmp_path: Path) -> None:
    body = '[daemon]\njournal_rate_limit_interval = "2m"\njournal_rate_limit_burst = 0\n'
    config = load_config(write(tmp_path, body))
    assert (config.journal_rate_limit_interval, config.journal_rate_limit_burst) == (120.0, 0)
    default = load_config(write(tmp_path, "[daemon]\n"))
    assert (default.journal_rate_limit_interval, default.journal_rate_limit_burst) == (30.0, 10000)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('interval = "soon"', "interval: expected a duration"),
        ('interval = "-1s"', "interval: a duration must not be negative"),
        ("burst = -5", "burst: expected 0 or more lines, got -5"),
        ('burst = "many"', "burst: expected int, got str"),
    ],
)
def test_bad_journal_rate_limits_are_refused(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, f"[daemon]\njournal_rate_limit_{body}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}: daemon.journal_rate_limit_{message}" in str(caught.value)


# name of the scenario → (file body, what the error must say after "<file>: ")
HOSTILE_CONFIGS: dict[str, tuple[bytes, str]] = {
    "units_not_a_list": (b"[daemon]\nunits = 5\n", "daemon.units: expected list, got int"),
    "arrays_nested_3000_deep": (
        b"[daemon]\nunits = " + b"[" * 3000 + b"]" * 3000 + b"\n",
        "invalid TOML: nested too deeply",
    ),
    "integer_of_5000_digits": (
        b"[ray]\nnum_gpus = " + b"9" * 5000 + b"\n",
        "invalid TOML: an integer has more than 4300 digits",
    ),
    "num_gpus_of_400_digits": (
        b"[ray]\nnum_gpus = " + b"9" * 400 + b"\n",
        "ray.num_gpus: must be at most 2147483647",
    ),
    "rate_limit_interval_of_10_to_the_400": (
        b"[daemon]\njournal_rate_limit_interval = 1" + b"0" * 400 + b"\n",
        "daemon.journal_rate_limit_interval: a duration must be at most one year",
    ),
    "nul_in_socket_path": (
        b'[daemon]\nsocket = "/run/x\\u0000y"\n',
        "daemon.socket: must not contain a NUL character",
    ),
    "not_utf8": (b'[daemon]\nsocket = "\xff"\n', "not UTF-8 text"),
}


@pytest.mark.parametrize("scenario", sorted(HOSTILE_CONFIGS))
def test_hostile_daemon_config_is_a_config_error(tmp_path: Path, scenario: str) -> None:
    body, message = HOSTILE_CONFIGS[scenario]
    path = tmp_path / "dynsupd.toml"
    path.write_bytes(body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}: {message}" in str(caught.value)
    assert len(str(caught.value)) < 1000


def test_daemon_config_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path}: not a regular file"


def test_the_agent_mode_and_its_orphan_timeout(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, "[daemon]\n"))
    assert (default.agent, default.agent_orphan_timeout) == ("process", 0.0)
    body = '[daemon]\nagent = "inprocess"\nagent_orphan_timeout = "10m"\n'
    config = load_config(write(tmp_path, body))
    assert (config.agent, config.agent_orphan_timeout) == ("inprocess", 600.0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('agent = "ray"', 'daemon.agent: expected "process" or "inprocess"'),
        ('agent_orphan_timeout = "later"', "daemon.agent_orphan_timeout: expected a duration"),
    ],
)
def test_a_bad_agent_setting_is_refused_naming_the_key(
    tmp_path: Path, body: str, message: str
) -> None:
    path = write(tmp_path, f"[daemon]\n{body}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}: {message}" in str(caught.value)
