"""The one error tree of devd.

    DevdError(code, message, hint)
    ├── UsageError            bad arguments or input from the user
    ├── ConfigError           a malformed devd.toml or config.toml
    ├── NotAWorktree          the path is not inside a git worktree
    ├── NotRegistered         the worktree is unknown to the daemon
    ├── PortsExhausted        the port range cannot hold the request
    ├── OwnershipConflict     a name exists without devd's marker: refused
    ├── NotOwner              a process or object belongs to someone else
    ├── ProvisionFailed       one or more resources failed to provision
    ├── ProtocolError         a malformed request or reply
    └── DaemonUnreachable     no daemon answers on the socket

Every error crosses the socket as {"code", "message", "hint"} and is rebuilt on
the client side as the same class, so the CLI maps codes to exit statuses once.
"""

from __future__ import annotations

from typing import Any


class DevdError(Exception):
    """An error with a stable code, a message for people and a hint saying what to do."""

    code = "error"

    def __init__(self, message: str, hint: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DevdError:
        code = str(data.get("code", "error"))
        klass = _BY_CODE.get(code, DevdError)
        return klass(str(data.get("message", "")), str(data.get("hint", "")), code=code)


class UsageError(DevdError):
    code = "usage"


class ConfigError(DevdError):
    code = "config"


class NotAWorktree(DevdError):
    code = "not_a_worktree"


class NotRegistered(DevdError):
    code = "not_registered"


class PortsExhausted(DevdError):
    code = "ports_exhausted"


class OwnershipConflict(DevdError):
    code = "ownership_conflict"


class NotOwner(DevdError):
    code = "not_owner"


class ProvisionFailed(DevdError):
    code = "provision_failed"


class ProtocolError(DevdError):
    code = "protocol"


class DaemonUnreachable(DevdError):
    code = "daemon_unreachable"


_BY_CODE: dict[str, type[DevdError]] = {
    klass.code: klass
    for klass in (
        UsageError,
        ConfigError,
        NotAWorktree,
        NotRegistered,
        PortsExhausted,
        OwnershipConflict,
        NotOwner,
        ProvisionFailed,
        ProtocolError,
        DaemonUnreachable,
    )
}


# errno names for the storage failures a person can fix (a full disk, a read-only mount).
_STORAGE = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is exceeded",
            "EROFS": "the file system is read-only"}


def storage_error(exc: BaseException) -> DevdError | None:
    """A full or read-only disk as a clear DevdError (code `storage`), else None."""
    import errno
    import sqlite3

    if isinstance(exc, OSError):
        what = _STORAGE.get(errno.errorcode.get(exc.errno or 0, ""))
        where = exc.filename or "a file"
    elif isinstance(exc, sqlite3.OperationalError) and \
            ("full" in str(exc) or "readonly" in str(exc)):
        what, where = ("the disk is full" if "full" in str(exc)
                       else "the file system is read-only"), "the registry"
    else:
        return None
    if what is None:
        return None
    return DevdError(f"cannot write {where}: {what} ({exc})",
                     "free some space or make devd's state directory writable "
                     "(DEVD_HOME), then retry", code="storage")
