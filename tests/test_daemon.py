"""dynsupd as a whole process: refuses bad units, stops everything in order on SIGTERM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import psutil

from .daemon_helpers import DYNSUPD, py_command, run_dynsupd, write_unit

FIXTURES = Path(__file__).parent / "fixtures" / "units"


def test_bad_units_exit_2_and_spawn_nothing(tmp_path: Path) -> None:
    units = tmp_path / "units"
    shutil.copytree(FIXTURES / "many_bad", units)
    marker = tmp_path / "spawned"
    # A valid unit beside the bad ones: it must not be started either.
    write_unit(
        units,
        "witness",
        f"""
        [service]
        command = {py_command(f"open({str(marker)!r}, 'w').close()")}
    """,
    )
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
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    header = lines.index("dynsupd: invalid units, nothing started:")
    errors = lines[header + 1 :]
    assert len(errors) >= 4
    assert all(".toml" in line for line in errors)  # every error names its file
    assert not marker.exists()
    assert not (tmp_path / "s.sock").exists()


def test_bad_daemon_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "dynsupd.toml"
    config.write_text('[daemon]\nlog_fromat = "json"\n')
    done = subprocess.run(
        [DYNSUPD, "--config", str(config), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "daemon.log_fromat: unknown key" in done.stderr and str(config) in done.stderr


def test_sigterm_stops_dependents_first_and_exits_0(tmp_path: Path) -> None:
    units = tmp_path / "units"
    write_unit(
        units,
        "a",
        f"""
        [service]
        command = {
            py_command('''
            import time
            time.sleep(0.3)
            print("a ready", flush=True)
            time.sleep(600)
        ''')
        }
        [ready]
        log = "a ready"
    """,
    )
    write_unit(
        units,
        "b",
        f"""
        [unit]
        requires = ["a"]
        [service]
        command = {py_command("import time; time.sleep(600)")}
        start_seconds = 0.2
    """,
    )
    with run_dynsupd(tmp_path, units) as daemon:
        daemon.wait_state("b", "RUNNING")
        rc = daemon.stop()
        assert rc == 0
        events = [(e["unit"], e["new"]) for e in daemon.events() if e.get("event") == "unit.state"]
    assert events.index(("a", "RUNNING")) < events.index(("b", "STARTING"))
    assert events.index(("b", "STOPPED")) < events.index(("a", "STOPPING"))


def test_relative_state_dir_is_made_absolute(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Regression: `--state-dir .state/demo` gave Dynamo's frontend a relative HOME, and
    its model-card cache then failed: the demo's model was never listed."""
    from dynsup.daemon import parse_args, resolve_settings

    monkeypatch.chdir(tmp_path)
    settings = resolve_settings(parse_args(["--state-dir", ".state/demo", str(tmp_path)]))
    assert settings.state_dir == tmp_path / ".state" / "demo"
    assert settings.state_dir.is_absolute()


def test_a_sigkilled_daemon_leaves_no_unit_behind(tmp_path: Path) -> None:
    """With the in-process agent, its warden kills every process of every unit, escapees
    included."""
    units = tmp_path / "units"
    escapee = str(tmp_path / "escapee.pid")
    write_unit(
        units,
        "forker",
        f"""
        [service]
        command = {
            py_command(f'''
            import subprocess, sys, time
            sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
            subprocess.Popen(sleeper)  # stays in the unit's group
            # Double fork: the middle process exits, the escapee has a session of its own.
            # (No braces: unit commands treat them as placeholders.)
            middle = (
                "import subprocess, sys; "
                "p = subprocess.Popen(" + repr(sleeper) + ", start_new_session=True); "
                "open({escapee!r}, 'w').write(str(p.pid))"
            )
            subprocess.run([sys.executable, "-c", middle], check=True)
            print("forked", flush=True)
            time.sleep(600)
        ''')
        }
        [ready]
        log = "forked"
    """,
    )
    write_unit(units, "plain", f"[service]\ncommand = {py_command('import time; time.sleep(600)')}")
    # The in-process agent: units die with their daemon (the agent process
    # outlives it on purpose: tests/test_agent_process.py).
    with run_dynsupd(tmp_path, units, env={"DYNSUP_AGENT": "inprocess"}) as daemon:
        daemon.wait_state("forker", "RUNNING")
        daemon.wait_state("plain", "RUNNING")
        status = daemon.ctl_json("status")["units"]
        leaders = [psutil.Process(unit["pid"]) for unit in status]
        victims = [*leaders, *(c for p in leaders for c in p.children(recursive=True))]
        victims.append(psutil.Process(int(Path(escapee).read_text())))
        assert len(victims) == 4, victims
        daemon.proc.kill()  # no clean-up of its own
        daemon.proc.wait(10)
        _gone, alive = psutil.wait_procs(victims, timeout=30)
    assert alive == []
