"""A private cache dir and browser profile per worktree, each marked as devd's.

A marker is trusted only in a dir no other user can have written (paths.check_private_tree),
and is written atomically; a dir of devd's that is still empty (a crash or a full disk came
between the mkdir and the marker) is adopted rather than refused forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from devd.errors import DevdError, OwnershipConflict
from devd.paths import TMP_SUFFIX, Paths, check_private_tree, write_atomic
from devd.provisioners.base import Context, Health, Progress, Provisioner

MARKER = ".devd-owner"


class DirsProvisioner(Provisioner):
    kind = "dirs"

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        cache, profile = cache_dir(ctx), profile_dir(ctx)
        for path in (cache, profile):
            make_owned_dir(path, ctx.worktree.id, root_of(ctx.paths, path))
        for var in ctx.config.cache.env:
            (cache / var.lower()).mkdir(exist_ok=True)
        return {"cache_dir": str(cache), "browser_profile": str(profile)}

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        missing = [key for key in ("cache_dir", "browser_profile")
                   if not (Path(detail.get(key, "")) / MARKER).is_file()]
        return Health(not missing, f"missing: {', '.join(missing)}" if missing else "")

    def check_teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        for path in _recorded(detail):
            if _exists(path) and _claim(path, ctx.worktree.id, root_of(ctx.paths, path)) \
                    == "foreign":
                raise _conflict(path, ctx.worktree.id)

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        recorded = _recorded(detail)
        for path in recorded:
            remove_owned_dir(path, ctx.worktree.id, root_of(ctx.paths, path))
        # A run that failed half-way recorded nothing, but names are derived: find its dirs.
        for path in {cache_dir(ctx), profile_dir(ctx)} - recorded:
            if _ours_or_empty(path, ctx.worktree.id, root_of(ctx.paths, path)):
                shutil.rmtree(path)

    def env(self, ctx: Context, detail: dict[str, Any]) -> dict[str, str]:
        cache = detail["cache_dir"]
        result = {"DEVD_CACHE_DIR": cache, "DEVD_BROWSER_PROFILE": detail["browser_profile"]}
        result.update({var: str(Path(cache) / var.lower()) for var in ctx.config.cache.env})
        return result


def _recorded(detail: dict[str, Any]) -> set[Path]:
    return {Path(detail[key]) for key in ("cache_dir", "browser_profile") if key in detail}


def cache_dir(ctx: Context) -> Path:
    return ctx.paths.cache_dir / "worktrees" / ctx.worktree.id


def profile_dir(ctx: Context) -> Path:
    return ctx.paths.data_dir / "browser-profiles" / ctx.worktree.id


def root_of(paths: Paths, path: Path) -> Path:
    """devd's private root that holds `path` (its cache or data dir); refused elsewhere."""
    for root in (paths.cache_dir, paths.data_dir):
        if path.is_relative_to(root) and path != root:
            return root
    raise OwnershipConflict(f"{path} is outside devd's own dirs; devd does not touch it",
                            "release the worktree with the DEVD_HOME it was provisioned with")


def make_owned_dir(path: Path, owner: str, root: Path) -> None:
    """Create `path` with devd's marker, or adopt it if the marker names the same owner or
    it is a still-empty dir of devd's."""
    _refuse_foreign_leaf(path)
    try:
        check_private_tree(path, root, create=True)
        claim = _claim(path, owner, root)
        if claim == "empty":
            _write_marker(path, owner)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and exc.filename != str(path) else ""
        raise DevdError(f"cannot make {path}: {exc.strerror}{where}",
                        "free some space (or fix the permissions, or move aside what stands "
                        "in the way), then provision again: devd adopts its empty dir",
                        code="io_error") from exc
    if claim == "foreign":
        raise _conflict(path, owner)


def remove_owned_dir(path: Path, owner: str, root: Path) -> None:
    if not _exists(path):
        return
    if _claim(path, owner, root) == "foreign":
        raise _conflict(path, owner)
    shutil.rmtree(path)


def _claim(path: Path, owner: str, root: Path) -> str:
    """"ours" (marked for owner), "empty" (devd's, no marker yet) or "foreign"."""
    check_private_tree(path, root)
    found = _marker(path)
    if found == owner:
        return "ours"
    rest = set(os.listdir(path)) - set(_leftovers(path))
    return "empty" if found == "" and rest <= {MARKER} else "foreign"


def _leftovers(path: Path) -> list[str]:
    """Marker temp files a crash or a full disk left behind."""
    return [e for e in os.listdir(path) if e.startswith(f".{MARKER}.") and e.endswith(TMP_SUFFIX)]


def _ours_or_empty(path: Path, owner: str, root: Path) -> bool:
    """For dirs nothing recorded: remove devd's, leave anything else (another user's too)."""
    try:
        return _exists(path) and _claim(path, owner, root) != "foreign"
    except DevdError:
        return False


def _marker(path: Path) -> str | None:
    """The marker's owner; "" when it is absent or empty (cut short); None when unreadable,
    not a regular file of ours, or naming nobody."""
    try:
        fd = os.open(path / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        data = handle.read(4096)
    try:
        owner = json.loads(data).get("owner") if data else ""
    except (ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


def _write_marker(path: Path, owner: str) -> None:
    for entry in _leftovers(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / entry)
    write_atomic(path / MARKER, json.dumps({"devd": 1, "owner": owner}).encode() + b"\n")


def _refuse_foreign_leaf(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OwnershipConflict(f"{path} exists but is not a directory devd made",
                                "devd never touches what it did not make: move it away, "
                                "then provision again")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _conflict(path: Path, owner: str) -> OwnershipConflict:
    return OwnershipConflict(
        f"{path} exists but is not marked as devd's for worktree {owner}",
        "devd never touches what it did not make: move it away, then provision again",
    )
