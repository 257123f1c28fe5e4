"""A private cache dir and browser profile per worktree, each marked as devd's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from devd.errors import OwnershipConflict
from devd.provisioners.base import Context, Health, Progress, Provisioner

MARKER = ".devd-owner"


class DirsProvisioner(Provisioner):
    kind = "dirs"

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        cache, profile = cache_dir(ctx), profile_dir(ctx)
        for path in (cache, profile):
            make_owned_dir(path, ctx.worktree.id)
        for var in ctx.config.cache.env:
            (cache / var.lower()).mkdir(exist_ok=True)
        return {"cache_dir": str(cache), "browser_profile": str(profile)}

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        missing = [key for key in ("cache_dir", "browser_profile")
                   if not (Path(detail.get(key, "")) / MARKER).is_file()]
        return Health(not missing, f"missing: {', '.join(missing)}" if missing else "")

    def check_teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        for path in _recorded(detail):
            if path.exists() or path.is_symlink():
                _check_owner(path, ctx.worktree.id)

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        recorded = _recorded(detail)
        for path in recorded:
            remove_owned_dir(path, ctx.worktree.id)
        # A run that failed half-way recorded nothing, but names are derived: find its dirs.
        for path in {cache_dir(ctx), profile_dir(ctx)} - recorded:
            if owned_by(path, ctx.worktree.id):
                remove_owned_dir(path, ctx.worktree.id)

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


def make_owned_dir(path: Path, owner: str) -> None:
    """Create `path` with devd's marker, or adopt it if the marker names the same owner."""
    if path.exists() or path.is_symlink():
        _check_owner(path, owner)
        return
    path.mkdir(parents=True, mode=0o700)
    (path / MARKER).write_text(json.dumps({"devd": 1, "owner": owner}) + "\n")


def remove_owned_dir(path: Path, owner: str) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    _check_owner(path, owner)
    shutil.rmtree(path)


def owned_by(path: Path, owner: str) -> bool:
    """True if `path` is a real directory whose marker names `owner`."""
    marker = path / MARKER
    if not path.is_dir() or path.is_symlink() or not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("owner") == owner)
    except (OSError, ValueError, AttributeError):
        return False


def _check_owner(path: Path, owner: str) -> None:
    if not owned_by(path, owner):
        raise OwnershipConflict(
            f"{path} exists but is not marked as devd's for worktree {owner}",
            "devd never touches what it did not make: move it away, then provision again",
        )
