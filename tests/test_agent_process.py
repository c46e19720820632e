"""Without Ray, the units run under the agent process: a daemon restart never restarts them.

A daemon killed with SIGKILL leaves the agent process and every unit
running; the next daemon on the same state directory connects to the
agent, adopts what matches its unit files (same pids), replaces what
changed, and the output continues without a gap. Only an orderly stop
that does not detach stops the units and the agent.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from .daemon_helpers import DYNSUPCTL, Dynsupd, py_command, run_dynsupd, write_unit
from .helpers import alive

pytestmark = pytest.mark.anyio(False)

TICKER = py_command("""
    import time
    i = 0
    while True:
        i += 1
        print("tick", i, flush=True)
        time.sleep(0.05)
""")
REPO = Path(__file__).resolve().parent.parent
PROCESS = {"DYNSUP_AGENT": "process"}  # the default; pinned against the environment


def write_units(units: Path, *, changed: bool = False) -> None:
    write_unit(units, "base", f"[service]\ncommand = {TICKER}\nstart_seconds = 0.2\n")
    write_unit(
        units,
        "top",
        f"""
        [unit]
        requires = ["base"]
        [service]
        command = {TICKER}
        start_seconds = 0.2
        environment = {{ VERSION = "{2 if changed else 1}" }}
        """,
    )


def pids(daemon: Dynsupd) -> dict[str, int]:
    return {u["name"]: u["pid"] for u in daemon.ctl_json("status")["units"]}


def ticks(daemon: Dynsupd, name: str) -> list[int]:
    out = daemon.ctl("tail", "-n", "100000", name).stdout
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("tick ")]


def follows_beyond(daemon: Dynsupd, name: str, tick: int) -> bool:
    """`tail -f` shows a tick after ``tick`` (within a generous deadline)."""
    cmd = [DYNSUPCTL, "--socket", str(daemon.socket), "tail", "-f", "-n", "1", name]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as tail:
        try:
            assert tail.stdout is not None
            deadline = time.monotonic() + 60
            # The unit prints every 50 ms: readline never blocks for long.
            for line in tail.stdout:
                if line.startswith("tick ") and int(line.split()[1]) > tick:
                    return True
                if time.monotonic() > deadline:
                    break
            return False
        finally:
            tail.kill()


def agent_pid(daemon: Dynsupd) -> int:
    event = daemon.wait_event(lambda e: e.get("event") in ("agent.started", "agent.found"))
    return int(event["pid"])


@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroups", "process-groups"])
def test_a_sigkilled_daemon_without_ray_leaves_its_units_to_the_next_which_adopts_them(
    tmp_path: Path, cgroups: bool
) -> None:
    units = tmp_path / "units"
    write_units(units)
    env = {**PROCESS, "DYNSUP_CGROUPS": "1" if cgroups else "0"}
    with run_dynsupd(tmp_path, units, env=env) as first:
        first.wait_state("top", "RUNNING")
        before = pids(first)
        agent = agent_pid(first)
        last_tick = max(ticks(first, "base"))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        # The daemon is gone; its agent and its units are not.
        assert alive(agent) and alive(before["base"]) and alive(before["top"])
        write_units(units, changed=True)  # top changes while no daemon runs

    (tmp_path / "dynsupd.log").rename(tmp_path / "first.log")
    with run_dynsupd(tmp_path, units, env=env) as second:
        assert agent_pid(second) == agent  # the same agent, found again
        second.wait_state("top", "RUNNING")
        after = pids(second)
        assert after["base"] == before["base"]  # adopted
        assert after["top"] != before["top"]  # replaced
        assert not alive(before["top"])
        adopted = [e["unit"] for e in second.events() if e.get("event") == "unit.adopted"]
        assert adopted == ["base"]
        # The output goes on without a gap: the agent kept its ring, and
        # printed on while no daemon ran.
        seen = ticks(second, "base")
        assert seen == list(range(1, len(seen) + 1)) and len(seen) > last_tick
        # and `tail -f` follows what it prints from now on.
        assert follows_beyond(second, "base", seen[-1])
        assert second.stop() == 0
    assert not alive(agent)
    assert not alive(after["base"]) and not alive(after["top"])


def test_shutdown_detach_leaves_the_units_and_shutdown_stops_them_and_the_agent(
    tmp_path: Path,
) -> None:
    units = tmp_path / "units"
    write_units(units)
    with run_dynsupd(tmp_path, units, env=PROCESS) as first:
        first.wait_state("top", "RUNNING")
        before = pids(first)
        agent = agent_pid(first)
        # An upgrade: leave everything running for the next daemon.
        done = first.ctl("shutdown", "--detach")
        assert done.returncode == 0, done.stderr
        assert first.proc.wait(60) == 0
        assert alive(agent) and alive(before["base"]) and alive(before["top"])

    (tmp_path / "dynsupd.log").rename(tmp_path / "first.log")
    with run_dynsupd(tmp_path, units, env=PROCESS) as second:
        assert agent_pid(second) == agent
        second.wait_state("top", "RUNNING")
        assert pids(second) == before  # both adopted
        done = second.ctl("shutdown")
        assert done.returncode == 0, done.stderr
        assert second.proc.wait(60) == 0
        # Gone when the daemon has exited, not some time later.
        assert not alive(agent)
        assert not alive(before["base"]) and not alive(before["top"])
    assert not (tmp_path / "state" / "agent.sock").exists()


def test_an_agent_left_without_a_daemon_past_its_orphan_timeout_stops_everything(
    tmp_path: Path,
) -> None:
    units = tmp_path / "units"
    write_units(units)
    config = tmp_path / "dynsupd.toml"
    config.write_text('[daemon]\nagent_orphan_timeout = "1s"\n')
    with run_dynsupd(tmp_path, units, env=PROCESS, extra=["--config", str(config)]) as daemon:
        daemon.wait_state("top", "RUNNING")
        before = pids(daemon)
        agent = psutil.Process(agent_pid(daemon))
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(30)
        agent.wait(60)  # it gives up on its own
        assert not alive(before["base"]) and not alive(before["top"])


def test_an_agent_process_that_dies_is_started_again_and_the_units_come_back(
    tmp_path: Path,
) -> None:
    """Its warden kills its units; the daemon starts a new agent and each unit's
    policy starts it again there. Before, every unit stayed FATAL ("internal
    error: AgentProcessLost") until the daemon itself was restarted."""
    units = tmp_path / "units"
    write_units(units)
    with run_dynsupd(tmp_path, units, env=PROCESS) as daemon:
        daemon.wait_state("top", "RUNNING")
        before = pids(daemon)
        agent = agent_pid(daemon)
        psutil.Process(agent).kill()
        restarted = daemon.wait_event(lambda e: e.get("event") == "agent.restarted")
        assert restarted["pid"] != agent and alive(restarted["pid"])
        # Both units RUNNING again, new processes; the old ones are gone.
        deadline = time.monotonic() + 60
        while True:
            now = daemon.ctl_json("status")["units"]
            if all(u["state"] == "RUNNING" and u["pid"] not in before.values() for u in now):
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.1)  # polling status, bounded by the deadline
        assert not alive(before["base"]) and not alive(before["top"])
        assert all(psutil.Process(u["pid"]).ppid() == restarted["pid"] for u in now)
        # Output flows again (the pump follows the new agent), and the daemon serves.
        after = ticks(daemon, "top")
        deadline = time.monotonic() + 30
        while ticks(daemon, "top")[-1:] == after[-1:]:
            assert time.monotonic() < deadline, "no output from the new agent's units"
            time.sleep(0.1)  # polling tail, bounded by the deadline
        done = daemon.ctl("shutdown")
        assert done.returncode == 0, done.stderr
        assert daemon.proc.wait(60) == 0
        # The agent asked to go is not started again.
        assert not alive(restarted["pid"])
        assert [e.get("event") for e in daemon.events()].count("agent.started") == 2


# The last release whose agent speaks wire protocol 1 (main before issue 12's
# output path): the previous build's agent processes on users' boxes.
PROTOCOL_1 = "6dc6a3b"


def test_a_daemon_upgrade_adopts_the_older_agent_process_and_its_units(tmp_path: Path) -> None:
    """The previous build's daemon and agent (its own code, from git), detached;
    this build's daemon adopts that agent's units, pids and all, and uses
    the agent within what it knows (it relays tail -f); an orderly stop then
    stops the old agent too."""
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PROTOCOL_1, "supervisor"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        pytest.skip(f"no git history to take the previous build from: {archive.stderr!r}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    units = tmp_path / "units"
    write_units(units)
    previous = {**PROCESS, "PYTHONPATH": str(old / "supervisor")}
    with run_dynsupd(tmp_path, units, env=previous) as first:
        first.wait_state("top", "RUNNING")
        before = pids(first)
        agent = agent_pid(first)
        # The previous build's agent: its code, its wire protocol.
        assert psutil.Process(agent).environ().get("PYTHONPATH") == str(old / "supervisor")
        done = first.ctl("shutdown", "--detach")
        assert done.returncode == 0, done.stderr
        assert first.proc.wait(60) == 0

    (tmp_path / "dynsupd.log").rename(tmp_path / "first.log")
    with run_dynsupd(tmp_path, units, env=PROCESS) as second:
        assert agent_pid(second) == agent  # found, not replaced
        second.wait_event(lambda e: e.get("event") == "agent.older" and e["protocol"] == 1)
        second.wait_state("top", "RUNNING")
        assert pids(second) == before  # adopted: no unit restarted by the upgrade
        # Its output still reaches tail -f, relayed by the daemon.
        tail = subprocess.Popen(
            [DYNSUPCTL, "--socket", str(second.socket), "tail", "-f", "top"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert tail.stdout is not None
            assert tail.stdout.readline().startswith("tick ")
        finally:
            tail.kill()
            tail.wait()
        done = second.ctl("shutdown")
        assert done.returncode == 0, done.stderr
        assert second.proc.wait(60) == 0
        assert not alive(agent)
        assert not alive(before["base"]) and not alive(before["top"])
