"""Where devd keeps its files: platformdirs by default, everything under DEVD_HOME if set.

Kept free of pydantic so the CLI can find the socket without the daemon's imports.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import NamedTuple

# tempfile and hashlib are imported where needed: this module is on every CLI call's path.
APP = "devd"
# sun_path is 108 bytes on Linux and 104 on macOS, including the NUL.
MAX_SOCKET_PATH = 100


class Paths(NamedTuple):
    """The directories devd uses, resolved once at an entry point and passed down.

    A NamedTuple rather than a dataclass: dataclasses imports inspect, a cost every
    `devd status` would pay."""

    config_dir: Path
    state_dir: Path
    cache_dir: Path
    data_dir: Path
    runtime_dir: Path

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "devd.sock"

    @property
    def registry(self) -> Path:
        return self.state_dir / "registry.sqlite3"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "daemon.log"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "daemon.lock"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @classmethod
    def resolve(cls, environ: dict[str, str] | None = None) -> Paths:
        env = os.environ if environ is None else environ
        home = env.get("DEVD_HOME")
        if home:
            return cls.under(Path(home).expanduser().absolute())
        return cls._platform(env)

    @classmethod
    def under(cls, home: Path) -> Paths:
        return cls(
            config_dir=home / "config",
            state_dir=home / "state",
            cache_dir=home / "cache",
            data_dir=home / "data",
            runtime_dir=_short_enough(home / "run", key=str(home)),
        )

    @classmethod
    def _platform(cls, env: dict[str, str] | os._Environ[str]) -> Paths:
        import platformdirs

        return cls(
            config_dir=Path(platformdirs.user_config_dir(APP)),
            state_dir=Path(platformdirs.user_state_dir(APP)),
            cache_dir=Path(platformdirs.user_cache_dir(APP)),
            data_dir=Path(platformdirs.user_data_dir(APP)),
            runtime_dir=_short_enough(_runtime_dir(env), key="default"),
        )


def _runtime_dir(env: dict[str, str] | os._Environ[str]) -> Path:
    """The per-user runtime dir, without platformdirs' warning when XDG_RUNTIME_DIR is unset.
    The /tmp fallback is a single level, so the one ownership check covers all of it."""
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / APP
    if sys.platform == "darwin":
        # launchd gives each user a private temp dir; the socket belongs there.
        return Path(os.environ.get("TMPDIR", "/tmp")) / APP
    return Path(_tempdir()) / f"devd-{os.getuid()}"


def _short_enough(runtime_dir: Path, *, key: str) -> Path:
    """Fall back to a short per-user temp path when the socket path would not fit in sun_path."""
    if len(os.fsencode(runtime_dir / "devd.sock")) <= MAX_SOCKET_PATH:
        return runtime_dir
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(_tempdir()) / f"devd-{os.getuid()}-{digest}"


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()


def ensure_private_dir(path: Path) -> None:
    """Create a directory readable by its owner only (0700), tightening an existing one.
    Refuses one that is a symlink or belongs to someone else (e.g. planted in /tmp)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        from devd.errors import DevdError

        what = "a symlink" if stat.S_ISLNK(info.st_mode) else f"owned by uid {info.st_uid}"
        raise DevdError(
            f"{path} is {what}, not a private directory of yours",
            "remove it if you did not make it, or set XDG_RUNTIME_DIR / DEVD_HOME elsewhere",
            code="unsafe_path",
        )
    if info.st_mode & 0o077:
        path.chmod(0o700)


def flock_held(path: Path) -> bool:
    """Whether another process holds an exclusive flock on `path` right now (a probe)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def current_dir() -> str:
    """The process's directory; a usage error once it was removed (a shell left in a
    worktree that was just removed)."""
    from devd.errors import UsageError

    try:
        return os.getcwd()
    except FileNotFoundError:
        raise UsageError("the current directory no longer exists",
                         "cd into the worktree (or pass its absolute path)") from None
