"""Desired state that survives the daemon: which units were stopped or started by hand.

Written atomically (temporary file, fsync, rename) in the state directory,
so a crash mid-write leaves the old file whole.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATE_FILE = "state.toml"


class DesiredState:
    """Per-unit overrides of `autostart`: True = started by hand, False = stopped by hand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.overrides: dict[str, bool] = {}
        # `dynsupctl scale MODEL[:ROLE] N`: replica counts that override the unit files.
        self.replicas: dict[str, int] = {}
        # Each model unit's port block, kept across reloads and restarts.
        self.port_blocks: dict[str, int] = {}

    @classmethod
    def load(cls, state_dir: Path) -> DesiredState:
        state = cls(state_dir / STATE_FILE)
        try:
            data = tomllib.loads(state.path.read_text())
        except FileNotFoundError:
            return state
        except (OSError, tomllib.TOMLDecodeError):
            # A damaged state file must not keep the daemon down: start from the unit files.
            return state
        for name, wanted in data.get("wanted", {}).items():
            if isinstance(wanted, bool):
                state.overrides[name] = wanted
        for key, count in data.get("replicas", {}).items():
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                state.replicas[key] = count
        for name, port in data.get("port_blocks", {}).items():
            if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
                state.port_blocks[name] = port
        return state

    def set_replicas(self, key: str, count: int) -> None:
        self.replicas[key] = count
        self.save()

    def remember_port_blocks(self, blocks: dict[str, int]) -> None:
        """The blocks of the models that exist now (a removed model's is forgotten)."""
        if blocks != self.port_blocks:
            self.port_blocks = dict(blocks)
            self.save()

    def wants(self, name: str, autostart: bool) -> bool:
        return self.overrides.get(name, autostart)

    def set(self, name: str, wanted: bool, autostart: bool) -> None:
        if wanted == autostart:
            self.overrides.pop(name, None)
        else:
            self.overrides[name] = wanted
        self.save()

    def forget_except(self, names: set[str]) -> None:
        stale = set(self.overrides) - names
        for name in stale:
            del self.overrides[name]
        if stale:
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = tomli_w.dumps(
            {
                "wanted": dict(sorted(self.overrides.items())),
                "replicas": dict(sorted(self.replicas.items())),
                "port_blocks": dict(sorted(self.port_blocks.items())),
            }
        )
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
