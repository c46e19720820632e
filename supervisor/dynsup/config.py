"""The daemon's own configuration: `/etc/dynsup/dynsupd.toml`, overridden by flags.

```toml
[daemon]
units = ["/etc/dynsup/units"]
socket = "/run/dynsup/dynsup.sock"
state_dir = "/var/lib/dynsup"
log_format = "auto"            # "auto" | "console" | "json"
socket_group = ""              # group allowed to act (socket mode 0660)
readonly_group = ""            # group allowed read-only verbs
journal_rate_limit_interval = "30s"  # at most journal_rate_limit_burst lines of
journal_rate_limit_burst = 10000     # one unit per interval go to journald (0: all)
agent = "process"              # without Ray: "process" (units outlive a daemon restart)
                               # | "inprocess" (units die with the daemon)
agent_orphan_timeout = 0       # "process": with no daemon for this long, the agent
                               # stops every unit and exits (0: waits forever)

[ray]
enabled = "auto"               # true | false | "auto" (on when a unit asks for GPUs)
address = ""                   # "": embedded local Ray; "auto" / "ray://...": join
num_gpus = -1                  # embedded only: GPUs to declare (-1: detect)
gpus_per_node = -1             # GPUs of one node, for model units' multi-node TP ranks
                               # (-1: num_gpus of the embedded head; set it when joining)

[metrics]
listen = "127.0.0.1:9464"      # serve GET /metrics (Prometheus) here; off when absent
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .listen import parse_listen
from .units.durations import parse_duration
from .units.errors import MAX_INT, Invalid, short_int
from .units.tomlfile import TomlFileError, check_values, read_toml

DEFAULT_CONFIG = Path("/etc/dynsup/dynsupd.toml")
AGENT_MODES = ("process", "inprocess")


class ConfigError(Exception):
    """The daemon's configuration file is invalid; the message names file and key."""


@dataclass(frozen=True)
class RayConfig:
    enabled: bool | str = "auto"
    address: str = ""
    num_gpus: int = -1
    gpus_per_node: int = -1


@dataclass(frozen=True)
class DaemonConfig:
    units: tuple[str, ...] = ()
    socket: str = ""
    state_dir: str = ""
    log_format: str = "auto"
    socket_group: str = ""
    readonly_group: str = ""
    journal_rate_limit_interval: float = 30.0
    journal_rate_limit_burst: int = 10000
    ray: RayConfig = field(default_factory=RayConfig)
    metrics_listen: str = ""  # HOST:PORT of /metrics; "" = off
    agent: str = "process"  # "process" | "inprocess"; $DYNSUP_AGENT overrides
    agent_orphan_timeout: float = 0.0  # 0: the agent process waits for a daemon forever
    source: str = ""


_DAEMON_KEYS: dict[str, type | tuple[type, ...]] = {
    "units": list,
    "socket": str,
    "state_dir": str,
    "log_format": str,
    "socket_group": str,
    "readonly_group": str,
    "journal_rate_limit_interval": (int, float, str),
    "journal_rate_limit_burst": int,
    "agent": str,
    "agent_orphan_timeout": (int, float, str),
}
_RAY_KEYS: dict[str, type | tuple[type, ...]] = {
    "enabled": (bool, str),
    "address": str,
    "num_gpus": int,
    "gpus_per_node": int,
}
_METRICS_KEYS: dict[str, type | tuple[type, ...]] = {"listen": str}


def _check_table(path: Path, table: str, data: Any, keys: dict[str, Any]) -> list[str]:
    errors = []
    if not isinstance(data, dict):
        return [f"{path}: [{table}]: expected a table"]
    for key, value in data.items():
        if key not in keys:
            errors.append(f"{path}: {table}.{key}: unknown key (known: {', '.join(keys)})")
        elif not isinstance(value, keys[key]) or (keys[key] is int and isinstance(value, bool)):
            expected = keys[key]
            names = (
                " or ".join(t.__name__ for t in expected)
                if isinstance(expected, tuple)
                else expected.__name__
            )
            errors.append(f"{path}: {table}.{key}: expected {names}, got {type(value).__name__}")
        elif keys[key] is int and value > MAX_INT:  # a typo; it would overflow further on
            errors.append(
                f"{path}: {table}.{key}: must be at most {MAX_INT}, got {short_int(value)}"
            )
    return errors


def load_config(path: Path | None) -> DaemonConfig:
    """Read the file (path None: the default one if it exists, else defaults)."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return DaemonConfig()
        path = DEFAULT_CONFIG
    try:
        data = read_toml(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except TomlFileError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    # NUL in a path or group name, or values nested too deeply: refused outright.
    errors = [f"{path}: {key}: {message}" for key, message in check_values(data)]
    if errors:
        raise ConfigError("\n".join(errors))
    errors = [
        f"{path}: {key}: unknown table (known: daemon, ray, metrics)"
        for key in data
        if key not in ("daemon", "ray", "metrics")
    ]
    daemon = data.get("daemon", {})
    ray = data.get("ray", {})
    metrics = data.get("metrics", {})
    errors += _check_table(path, "daemon", daemon, _DAEMON_KEYS)
    errors += _check_table(path, "ray", ray, _RAY_KEYS)
    errors += _check_table(path, "metrics", metrics, _METRICS_KEYS)
    listen = metrics.get("listen", "") if isinstance(metrics, dict) else ""
    if isinstance(listen, str) and listen:
        try:
            parse_listen(listen)
        except ValueError as exc:
            errors.append(f"{path}: metrics.listen: {exc}")
    if isinstance(daemon, dict):
        if daemon.get("log_format", "auto") not in ("auto", "console", "json"):
            errors.append(f'{path}: daemon.log_format: expected "auto", "console" or "json"')
        units = daemon.get("units", [])
        if isinstance(units, list) and not all(isinstance(u, str) for u in units):
            errors.append(f"{path}: daemon.units: expected a list of directory paths")
        interval = daemon.get("journal_rate_limit_interval", 30.0)
        try:
            daemon["journal_rate_limit_interval"] = parse_duration(interval)
        except Invalid as exc:
            errors.append(f"{path}: daemon.journal_rate_limit_interval: {exc}")
        if daemon.get("agent", "process") not in AGENT_MODES:
            errors.append(f'{path}: daemon.agent: expected "process" or "inprocess"')
        try:
            daemon["agent_orphan_timeout"] = parse_duration(daemon.get("agent_orphan_timeout", 0))
        except Invalid as exc:
            errors.append(f"{path}: daemon.agent_orphan_timeout: {exc}")
        burst = daemon.get("journal_rate_limit_burst", 10000)
        if isinstance(burst, int) and burst < 0:
            errors.append(
                f"{path}: daemon.journal_rate_limit_burst: expected 0 or more lines, got {burst}"
            )
    if isinstance(ray, dict) and ray.get("enabled", "auto") not in (True, False, "auto"):
        errors.append(f'{path}: ray.enabled: expected true, false or "auto"')
    if errors:
        raise ConfigError("\n".join(errors))
    return DaemonConfig(
        units=tuple(daemon.get("units", ())),
        socket=daemon.get("socket", ""),
        state_dir=daemon.get("state_dir", ""),
        log_format=daemon.get("log_format", "auto"),
        socket_group=daemon.get("socket_group", ""),
        readonly_group=daemon.get("readonly_group", ""),
        journal_rate_limit_interval=daemon.get("journal_rate_limit_interval", 30.0),
        journal_rate_limit_burst=daemon.get("journal_rate_limit_burst", 10000),
        ray=RayConfig(**ray),
        agent=daemon.get("agent", "process"),
        agent_orphan_timeout=daemon.get("agent_orphan_timeout", 0.0),
        metrics_listen=listen if isinstance(listen, str) else "",
        source=str(path),
    )
