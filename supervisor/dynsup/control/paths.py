"""Where the control socket lives. Stdlib only (dynsupctl imports it).

First match wins:

1. ``--socket PATH`` (or the daemon config's ``socket``), passed as ``explicit``;
2. ``$DYNSUP_SOCKET``;
3. ``$RUNTIME_DIRECTORY/dynsup.sock`` (systemd's ``RuntimeDirectory=``; first entry);
4. as root: ``/run/dynsup/dynsup.sock`` (what the systemd unit gets, so a root
   shell without systemd's variables finds the system daemon);
5. ``$XDG_RUNTIME_DIR/dynsup/dynsup.sock``;
6. ``/tmp/dynsup-<uid>/dynsup.sock``; that directory must be ours and private,
   because anyone can create a directory of that name in /tmp first.

`client_socket_path` adds one fallback for users: when the per-user default
(5 or 6) does not exist but the system socket does, use the system socket.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

SOCKET_NAME = "dynsup.sock"
SYSTEM_SOCKET = "/run/dynsup/dynsup.sock"


class UnsafeSocketDir(OSError):
    """The socket's directory could be controlled by another user."""


def socket_path(
    explicit: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> str:
    env = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    if explicit:
        return explicit
    if env.get("DYNSUP_SOCKET"):
        return env["DYNSUP_SOCKET"]
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    if uid == 0:
        return SYSTEM_SOCKET
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "dynsup", SOCKET_NAME)
    directory = _tmp_dir(uid)
    if os.path.lexists(directory):
        check_private_dir(directory, uid)
    return os.path.join(directory, SOCKET_NAME)


def client_socket_path(
    explicit: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> str:
    env = os.environ if environ is None else environ
    path = socket_path(explicit, environ=env, uid=uid)
    per_user_default = not (explicit or env.get("DYNSUP_SOCKET") or env.get("RUNTIME_DIRECTORY"))
    if per_user_default and not os.path.exists(path) and os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return path


def prepare_socket_dir(path: str, *, shared: bool = False) -> None:
    """Create the socket's directory if missing (0700; 0755 when other users must
    reach the socket) and refuse one that another user could swap the socket in."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755 if shared else 0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSocketDir(f"{directory}: not a directory (a symlink?)")
    if info.st_uid not in (0, os.geteuid()):
        raise UnsafeSocketDir(f"{directory}: owned by uid {info.st_uid}, not by us or root")
    # Writable by others without the sticky bit: they could replace our socket.
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise UnsafeSocketDir(f"{directory}: writable by other users")


def check_private_dir(directory: str, uid: int) -> None:
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise UnsafeSocketDir(
            f"{directory}: must be a directory owned by uid {uid} with mode 0700"
            f" (found uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})"
        )


def _tmp_dir(uid: int) -> str:
    return f"/tmp/dynsup-{uid}"
