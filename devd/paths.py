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


def check_private_tree(path: Path, root: Path, create: bool = False) -> None:
    """Refuse to trust what is in `path` unless no other user can have put it there: above
    devd's `root` each dir belongs to us or root and is sticky if others may write it (else
    they could swap our dirs); from `root` down to `path` each is a real dir of ours (devd's
    levels above `path` are tightened to 0700, as ensure_private_dir does), and `path` is
    writable by us alone. With `create`, missing levels are made 0700 on the way down, each
    only once the level above passed (nothing is made inside another user's dir)."""
    rel = path.relative_to(root)
    root = root.resolve()  # a symlinked root is the user's choice; below it, none is followed
    uid = os.getuid()
    if create:  # a new user may have no ~/.cache yet: the levels that exist are checked
        # first, so nothing is made inside an unsafe one; then all of them
        _refuse(path, next(filter(None, (_not_safe_above(d, uid) for d in root.parents
                                         if os.path.lexists(d))), ""))
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    _refuse(path, next(filter(None, (_not_safe_above(d, uid) for d in root.parents)), ""))
    for level in (root, *(root / part for part in reversed(rel.parents[:-1])), root / rel):
        if create:
            level.mkdir(exist_ok=True, mode=0o700)
        _refuse(path, _not_private(level, uid, tighten=level != root / rel))


def _refuse(path: Path, problem: str) -> None:
    if problem:
        from devd.errors import DevdError

        raise DevdError(f"{problem}: another user could have made or changed what is in "
                        f"{path}, so devd does not trust it",
                        "use a DEVD_HOME only you can write (or remove what you did not "
                        "make), then provision again", code="unsafe_path")


def _not_private(path: Path, uid: int, tighten: bool) -> str:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a real directory"
    if info.st_uid != uid:
        return f"{path} belongs to uid {info.st_uid}, not to you (uid {uid})"
    if info.st_mode & 0o022 and not tighten:
        return f"{path} is writable by other users (mode {info.st_mode & 0o7777:o})"
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return ""


def _not_safe_above(path: Path, uid: int) -> str:
    info = os.lstat(path)
    if info.st_uid not in (uid, 0):
        return f"{path} belongs to uid {info.st_uid}"
    others = 0o002 if _private_group(info.st_gid) else 0o022
    if info.st_mode & others and not info.st_mode & stat.S_ISVTX:
        return f"{path} is writable by other users without the sticky bit"
    return ""


def _private_group(gid: int) -> bool:
    """Whether a group holds only us: a umask of 002 makes ~/.cache group-writable, which
    is harmless when the group is the user's own (Debian's and Ubuntu's default)."""
    import grp
    import pwd

    try:
        me, members = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(gid).gr_mem
    except KeyError:
        return False
    return gid == os.getgid() and set(members) <= {me}


def write_atomic(target: Path, data: bytes, mode: int = 0o600) -> None:
    """Write via a temp file beside `target` and a rename: a crash or a full disk leaves
    the old file or none, never part of one."""
    import contextlib
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


TMP_SUFFIX = ".devd-tmp"
UNREPRESENTABLE = "unrepresentable_path"
RENAME_HINT = ("rename it (git worktree move OLD NEW) to a UTF-8 path without control "
               "characters")
_CONTROL_NAMES = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab"}


def faithful(path: str) -> str:
    """`path` itself if devd can store, print and write it exactly; else a clear refusal
    (a newline would split it in git's output and .env, a control character rewrites a
    terminal, and bytes that are not UTF-8 cannot go into JSON or SQLite as they are)."""
    bad = next((c for c in path if c < " " or "\x7f" <= c <= "\x9f"
                or "\ud800" <= c <= "\udfff"), None)
    if bad is None:
        return path
    from devd.errors import DevdError

    what = "is not valid UTF-8" if bad >= "\ud800" else \
        f"contains {_CONTROL_NAMES.get(bad, f'the control character {bad!r}')}"
    raise DevdError(f"the path {shown(path)} {what}; devd cannot name it exactly",
                    RENAME_HINT, code=UNREPRESENTABLE)


def shown(path: str | Path) -> str:
    """A path as printable text: control characters and undecodable bytes escaped."""
    text = str(path)
    return text if text.isprintable() else repr(text)


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
