"""dynsupctl's output and exit codes, from fixed results: pure functions, no daemon."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from dynsup import ctl
from dynsup.control.protocol import BAD_CONFIG, BAD_NAME, FAILED, NOT_RUNNING, CommandError


def unit(name: str, state: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "state": state,
        "description": "",
        "pid": None,
        "node": "box",
        "gpus": [],
        "uptime": None,
        "since": 1_700_000_000.0,
        "exit_status": None,
        "reason": "",
        "restarts": 0,
        "last_line": None,
        "wanted": True,
    }
    return base | fields


RUNNING = unit("etcd", "RUNNING", pid=4242, uptime=184.7, reason="ready")
CRASHING = unit(
    "worker-0",
    "BACKOFF",
    exit_status="exit status 1",
    reason="exit status 1; restart in 0.4s",
    restarts=3,
    gpus=[0, 1],
    last_line="INFO engine: step 7",
)
NEVER = unit("frontend", "STOPPED", wanted=False)


# -- status ---------------------------------------------------------------------------


def test_status_columns_like_supervisorctl() -> None:
    out = ctl.format_status({"units": [RUNNING, CRASHING, NEVER]})
    assert out.text.splitlines() == [
        "etcd      RUNNING   pid 4242, uptime 0:03:04",
        "worker-0  BACKOFF   exit status 1; restart in 0.4s; restarts 3; gpus 0,1",
        "frontend  STOPPED   Not started",
    ]
    assert out.code == ctl.EXIT_NOT_RUNNING


def test_status_last_shows_how_a_restarted_unit_last_exited_not_its_last_log_line() -> None:
    back = RUNNING | {"restarts": 2, "exit_status": "killed by SIGKILL", "last_line": "INFO ok"}
    out = ctl.format_status({"units": [back, CRASHING]})
    assert out.text.splitlines() == [
        "etcd      RUNNING   pid 4242, uptime 0:03:04, restarts 2, last: killed by SIGKILL",
        "worker-0  BACKOFF   exit status 1; restart in 0.4s; restarts 3; gpus 0,1",
    ]
    # `status -v`: the last stderr line too.
    verbose = ctl.format_status({"units": [back, CRASHING]}, last_line=True).text.splitlines()
    assert verbose[0].endswith("last: killed by SIGKILL, last line: INFO ok")
    assert verbose[1].endswith("gpus 0,1; last line: INFO engine: step 7")


def test_status_all_running_exits_0_and_shows_restarts() -> None:
    twice = RUNNING | {"restarts": 2, "gpus": [3]}
    out = ctl.format_status({"units": [twice]})
    assert out.text == "etcd  RUNNING   pid 4242, uptime 0:03:04, restarts 2, gpus 3\n"
    assert out.code == ctl.EXIT_OK


def test_status_fatal_spawn_error_and_long_uptime() -> None:
    fatal = unit("nats", "FATAL", reason="cannot spawn: [Errno 2] No such file: 'nats-server'")
    old = RUNNING | {"uptime": 2 * 86400 + 3661}
    lines = ctl.format_status({"units": [old, fatal]}).text.splitlines()
    assert lines[0] == "etcd  RUNNING   pid 4242, uptime 2 days, 1:01:01"
    assert lines[1] == "nats  FATAL     cannot spawn: [Errno 2] No such file: 'nats-server'"


def test_status_does_not_repeat_the_exit_status_and_shows_a_starting_pid() -> None:
    exited = unit("job", "EXITED", exit_status="exit status 0", reason="exit status 0")
    starting = unit("w", "STARTING", pid=77, reason="spawned")
    lines = ctl.format_status({"units": [exited, starting]}).text.splitlines()
    assert lines == ["job  EXITED    exit status 0", "w    STARTING  pid 77; spawned"]


def test_status_shows_nodes_only_when_units_span_several() -> None:
    elsewhere = RUNNING | {"name": "w1", "node": "gpu-2"}
    text = ctl.format_status({"units": [RUNNING, elsewhere]}).text
    assert "node box" in text and "node gpu-2" in text
    assert "node" not in ctl.format_status({"units": [RUNNING]}).text


def test_status_neutralises_terminal_escapes_from_children() -> None:
    evil = CRASHING | {"last_line": "\x1b[2J\x1b]0;pwned\x07oops\r"}
    text = ctl.format_status({"units": [evil]}, last_line=True).text
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "last line: ?[2J?]0;pwned?oops?" in text


def test_status_trims_a_long_last_line() -> None:
    long = CRASHING | {"last_line": "x" * 500}
    line = ctl.format_status({"units": [long]}, last_line=True).text
    assert line.rstrip().endswith("...") and len(line) < 300


def test_status_of_nothing() -> None:
    assert ctl.format_status({"units": []}) == ctl.Output("No units\n", ctl.EXIT_OK)


# -- start / stop / restart -------------------------------------------------------------


def test_start_results() -> None:
    fatal = unit("nats", "FATAL", reason="cannot spawn: no such file")
    died = unit(
        "w",
        "FATAL",
        exit_status="exit status 1",
        reason="exit status 1; start limit: more than 5 starts within 60s",
        last_line="INFO worker: shutting down",
    )
    out = ctl.format_started({"units": [RUNNING, fatal, died]})
    assert out.text.splitlines() == [
        "etcd: started",
        "nats: ERROR (spawn error: cannot spawn: no such file)",
        "w: ERROR (abnormal termination: exit status 1; start limit: more than 5 starts"
        " within 60s)",
    ]
    assert out.code == ctl.EXIT_FAILED
    assert ctl.format_started({"units": [RUNNING]}).code == ctl.EXIT_OK


def test_start_without_waiting() -> None:
    pending = unit("w", "PENDING", reason="waiting for etcd")
    out = ctl.format_started({"units": [pending]}, wait=False)
    assert out == ctl.Output("w: starting\n", ctl.EXIT_OK)
    # Waiting, a unit still on its way is a failure (the daemon gave up waiting).
    assert ctl.format_started({"units": [pending]}).code == ctl.EXIT_FAILED


def test_restart_prints_stopped_then_started() -> None:
    out = ctl.format_started({"units": [RUNNING]}, restart=True)
    assert out.text == "etcd: stopped\netcd: started\n"


def test_stop_results() -> None:
    stopped = unit("etcd", "STOPPED", exit_status="terminated by SIGTERM")
    stuck = unit("w", "STOPPING", pid=5)
    assert ctl.format_stopped({"units": [stopped]}) == ctl.Output("etcd: stopped\n")
    out = ctl.format_stopped({"units": [stopped, stuck]})
    assert out.text.splitlines()[1] == "w: ERROR (still STOPPING)" and out.code == 1
    assert ctl.format_stopped({"units": [stuck]}, wait=False).text == "w: stopping\n"


# -- reread / update / avail / pid / tail ---------------------------------------------------


def test_reread() -> None:
    plan = {
        "added": ["new"],
        "changed": {"etcd": ["command", "environment"]},
        "removed": ["old"],
    }
    assert ctl.format_reread(plan).text.splitlines() == [
        "old: disappeared",
        "etcd: changed (command, environment)",
        "new: available",
    ]
    empty = {"added": [], "changed": {}, "removed": []}
    assert ctl.format_reread(empty).text == "No config updates to processes\n"


def test_update_applied_and_dry_run() -> None:
    plan = {"added": ["new"], "changed": {"etcd": ["command"]}, "removed": ["old"]}
    assert ctl.format_update(plan | {"applied": True}).text.splitlines() == [
        "old: stopped",
        "old: removed process group",
        "etcd: stopped",
        "etcd: updated process group",
        "new: added process group",
    ]
    assert ctl.format_update(plan | {"applied": False}).text.splitlines() == [
        "old: would remove process group",
        "etcd: would update process group (command)",
        "new: would add process group",
    ]
    nothing = {"added": [], "changed": {}, "removed": [], "applied": True}
    assert ctl.format_update(nothing).text == "No config updates to processes\n"


def test_a_rollouts_steps_as_progress_lines() -> None:
    steps = [
        {"unit": "tiny", "step": "rolling", "detail": "drain first, one replica at a time"},
        {"unit": "tiny-0", "step": "draining"},
        {"unit": "tiny-0", "step": "started", "pid": 41},
        {"unit": "tiny-0", "step": "running", "pid": 41},
        {"unit": "tiny-0", "step": "admitted"},
        {"unit": "tiny-1", "step": "failed", "detail": "BACKOFF: exit status 2"},
        {"unit": "tiny-2", "step": "kept", "detail": "old spec: the rollout halted at tiny-1"},
    ]
    assert [ctl.format_step(step) for step in steps] == [
        "tiny: rolling update: drain first, one replica at a time",
        "tiny-0: draining",
        "tiny-0: started (pid 41)",
        "tiny-0: RUNNING",
        "tiny-0: admitted (the frontends route to it)",
        "tiny-1: ERROR (BACKOFF: exit status 2)",
        "tiny-2: kept (old spec: the rollout halted at tiny-1)",
    ]


def test_a_settled_a_failed_and_an_unwaited_rollout() -> None:
    plan = {"added": [], "changed": {"tiny-0": ["command"]}, "removed": []}
    done = plan | {"applied": True, "settled": True, "progress": [], "failed": []}
    assert ctl.format_update(done) == ctl.Output("tiny-0: updated process group\nsettled\n")
    failed = done | {"failed": [{"unit": "tiny-0", "reason": "FATAL: exit status 2"}]}
    out = ctl.format_update(failed)
    assert out.code == ctl.EXIT_FAILED
    assert out.text.splitlines()[1:] == [
        "tiny-0: ERROR (FATAL: exit status 2)",
        "not settled: 1 unit(s) failed to come up",
    ]
    early = ctl.format_update(done | {"settled": False})
    assert early.code == ctl.EXIT_OK and "not waiting" in early.text


def test_avail() -> None:
    units = [
        {"name": "etcd", "in_use": True, "autostart": True, "kind": "service"},
        {"name": "qwen", "in_use": False, "autostart": False, "kind": "model"},
    ]
    lines = ctl.format_avail({"units": units}).text.splitlines()
    assert lines[0] == "etcd".ljust(32) + " in use   auto    service"
    assert lines[1] == "qwen".ljust(32) + " avail    manual  model"


def test_pid() -> None:
    assert ctl.format_pid({"pid": 4242}) == ctl.Output("4242\n", ctl.EXIT_OK)
    assert ctl.format_pid({"pid": None}) == ctl.Output("0\n", ctl.EXIT_NOT_RUNNING)


def test_tail_prints_raw_and_reports_missed_bytes_on_stderr() -> None:
    out = ctl.format_tail({"data": "a\nb", "missed": 0})
    assert out == ctl.Output("a\nb", ctl.EXIT_OK, "")
    lost = ctl.format_tail({"data": "", "missed": 1234})
    assert lost.err == "dynsupctl: [1234 bytes missed]\n"


# -- errors and exit codes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [(BAD_NAME, 4), (BAD_CONFIG, 2), (NOT_RUNNING, 3), (FAILED, 1), ("SOMETHING_NEW", 1)],
)
def test_error_exit_codes(code: str, exit_code: int) -> None:
    assert ctl.format_error(CommandError(code, "msg")).code == exit_code


def test_bad_name_lists_each_unknown_unit() -> None:
    out = ctl.format_error(CommandError(BAD_NAME, "no such units", details=["ghost", "nope"]))
    assert out.err == "ghost: ERROR (no such unit)\nnope: ERROR (no such unit)\n"


def test_bad_config_prints_every_error_line() -> None:
    details = ["units/a.toml: service.command: missing", "units/b.toml: unit.requires: no x"]
    out = ctl.format_error(CommandError(BAD_CONFIG, "2 invalid units", details=details))
    assert out.code == ctl.EXIT_BAD_CONFIG
    assert out.err.splitlines() == [
        "dynsupctl: BAD_CONFIG: 2 invalid units",
        "  units/a.toml: service.command: missing",
        "  units/b.toml: unit.requires: no x",
    ]


# -- requests from the command line --------------------------------------------------------


def request(*argv: str) -> tuple[str, dict[str, Any]]:
    ns = ctl.build_parser().parse_args(list(argv))
    return ns.verb, ctl.VERBS[ns.verb].request(ns)


def test_requests_built_from_arguments() -> None:
    assert request("status") == ("status", {"names": []})
    assert request("status", "a", "b") == ("status", {"names": ["a", "b"]})
    assert request("start", "all") == ("start", {"names": ["all"], "wait": True})
    assert request("stop", "--no-wait", "a") == ("stop", {"names": ["a"], "wait": False})
    assert request("signal", "sighup", "all") == ("signal", {"signal": "HUP", "names": ["all"]})
    assert request("pid") == ("pid", {"name": None})
    assert request("tail", "-f", "-n", "5", "w", "stderr") == (
        "tail",
        {"name": "w", "stream": "stderr", "lines": 5, "follow": True, "raw": True},
    )
    assert request("update", "--dry-run") == (
        "update",
        {"dry_run": True, "names": [], "wait": True},
    )
    assert request("update", "--no-wait") == (
        "update",
        {"dry_run": False, "names": [], "wait": False},
    )
    assert request("scale", "tiny", "3", "--no-wait") == (
        "scale",
        {"name": "tiny", "replicas": 3, "wait": False},
    )
    assert request("version") == ("version", {})


def test_all_cannot_be_mixed_with_names() -> None:
    with pytest.raises(ctl.UsageError):
        request("stop", "all", "etcd")


def test_signal_results() -> None:
    out = ctl.format_signalled({"signalled": ["a"], "not_running": ["b"]})
    assert out == ctl.Output("a: signalled\nb: ERROR (not running)\n", ctl.EXIT_FAILED)
    assert ctl.format_signalled({"signalled": ["a"], "not_running": []}).code == ctl.EXIT_OK


def test_json_flag_before_or_after_the_verb() -> None:
    parser = ctl.build_parser()
    assert parser.parse_args(["--json", "status"]).json is True
    assert parser.parse_args(["status", "--json"]).json is True
    assert parser.parse_args(["status"]).json is False


class FakeClient:
    """Answers like a daemon would, without one (run_verb only needs call/stream)."""

    def __init__(self, result: Any = None, error: CommandError | None = None) -> None:
        self.result, self.error = result, error
        self.sent: list[tuple[str, Any]] = []

    def call(self, cmd: str, args: Any = None, **_: Any) -> Any:
        self.sent.append((cmd, args))
        if self.error:
            raise self.error
        return self.result


def test_json_output_keeps_the_exit_code() -> None:
    ns = ctl.build_parser().parse_args(["--json", "status"])
    result = {"units": [RUNNING, CRASHING]}
    out = ctl.run_verb(FakeClient(result), "status", ns)  # type: ignore[arg-type]
    assert json.loads(out.text) == result and out.code == ctl.EXIT_NOT_RUNNING


def test_json_error_is_an_object_on_stdout() -> None:
    ns = ctl.build_parser().parse_args(["--json", "status", "ghost"])
    error = CommandError(BAD_NAME, "no such unit", details=["ghost"])
    out = ctl.run_verb(FakeClient(error=error), "status", ns)  # type: ignore[arg-type]
    assert json.loads(out.text) == {"error": error.to_json()} and out.code == ctl.EXIT_UNKNOWN


def test_progress_line_appears_after_a_second() -> None:
    now = [0.0]
    screen = io.StringIO()
    progress = ctl.Progress(screen, clock=lambda: now[0])
    progress.update(unit("w", "STARTING"))
    assert screen.getvalue() == ""  # quick starts show nothing
    now[0] = 3.2
    progress.update(None)  # an idle tick
    assert screen.getvalue().endswith("w: STARTING (3s)")
    progress.update(unit("w", "RUNNING"))
    progress.clear()
    assert screen.getvalue().endswith("\r\x1b[K")
