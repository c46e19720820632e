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
