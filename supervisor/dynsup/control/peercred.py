"""Who is on the other end of the control socket, and what may they do.

The gate (see `AccessPolicy`):

* root and the daemon's own user may do everything;
* members of ``group`` (socket mode 0660, group-owned) may do everything;
* members of ``readonly_group`` may use read-only verbs only. The socket is
  then mode 0666, because file permissions cannot tell read from write:
  every local user can connect, and SO_PEERCRED is the only gate. A peer
  in no group gets one PERMISSION_DENIED line and is disconnected.

"Member" means the peer's gid at connect time, or a supplementary group of
its uid in the user database (SO_PEERCRED carries no supplementary groups).

Stdlib only.
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeerCred:
    """The peer's credentials at connect() time, from the kernel."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return PeerCred(pid, uid, gid)


def groups_of(uid: int, gid: int) -> frozenset[int]:
    """gid plus the supplementary groups of uid in the user database (may block on NSS)."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:  # a uid with no passwd entry has only the gid it runs with
        return frozenset({gid})
    return frozenset({gid, *os.getgrouplist(user.pw_name, user.pw_gid)})


class Access(enum.Enum):
    FULL = "full"
    READ_ONLY = "read-only"
    DENIED = "denied"


class UnknownGroup(ValueError):
    """A configured socket group does not exist."""


@dataclass(frozen=True)
class AccessPolicy:
    group: int | None = None  # gid whose members may use every verb
    readonly_group: int | None = None  # gid whose members may use read-only verbs
    owner_uid: int = field(default_factory=os.geteuid)

    @classmethod
    def from_groups(cls, group: str = "", readonly_group: str = "") -> AccessPolicy:
        """From group names as the daemon's config has them ("" = none)."""
        return cls(group=_gid(group), readonly_group=_gid(readonly_group))

    @property
    def socket_mode(self) -> int:
        if self.readonly_group is not None:
            return 0o666  # the kernel cannot gate read-only use; SO_PEERCRED does
        return 0o660 if self.group is not None else 0o600

    @property
    def needs_lookup(self) -> bool:
        """Whether deciding for a stranger needs the user database (else: no NSS call)."""
        return self.group is not None or self.readonly_group is not None

    def decide(self, cred: PeerCred) -> Access:
        if cred.uid in (0, self.owner_uid):
            return Access.FULL
        if not self.needs_lookup:
            return Access.DENIED
        groups = groups_of(cred.uid, cred.gid)
        if self.group is not None and self.group in groups:
            return Access.FULL
        if self.readonly_group is not None and self.readonly_group in groups:
            return Access.READ_ONLY
        return Access.DENIED

    def trusted_without_lookup(self, cred: PeerCred) -> bool:
        return cred.uid in (0, self.owner_uid) or not self.needs_lookup


def _gid(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise UnknownGroup(f"socket group {name!r} does not exist") from None
