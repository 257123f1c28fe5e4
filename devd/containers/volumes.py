"""Named volumes as tarballs: a backup before removal, its restore, a copy between volumes.

The data moves through a helper container that is created but never started (the engine's
archive API works on stopped containers), so no image needs tar or a shell, and nothing in
the volume runs while it is read.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devd.containers import engine
from devd.errors import DevdError
from devd.paths import Paths

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

MOUNT = "/devd-volume"
SOURCE = "/devd-source"


def backups_dir(paths: Paths, wt_id: str) -> Path:
    return paths.state_dir / "backups" / "volumes" / wt_id


def new_backup_dir(paths: Paths, wt_id: str, base: Path | None = None) -> Path:
    """A fresh directory per backup, named by UTC time so the latest sorts last."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}"
    target = (base or backups_dir(paths, wt_id)) / stamp
    target.mkdir(parents=True, mode=0o700)
    return target


def set_aside(ctx: Any, dk: DockerClient, volume: str, key: str, image: str) -> Path:
    """The files a restore is about to replace, kept as a tarball first (in a folder of
    their own: `devd restore` picks the newest release backup, never these)."""
    kept = ctx.outputs.setdefault("replaced_backups", [])
    if not kept:
        base = ctx.paths.state_dir / "backups" / "replaced-volumes" / ctx.worktree.id
        kept.append(str(new_backup_dir(ctx.paths, ctx.worktree.id, base)))
    return archive(dk, volume, tarball(Path(kept[-1]), key), image, ctx.worktree.id)


def release_folder(ctx: Any) -> Path:
    """The one backup folder of this release (containers and Compose share it, so that
    `devd restore` finds every volume of the worktree in its newest folder)."""
    kept = ctx.outputs.setdefault("volume_backups", [])
    if not kept:
        kept.append(str(new_backup_dir(ctx.paths, ctx.worktree.id)))
    return Path(kept[-1])


def latest_backup(paths: Paths, wt_id: str) -> Path | None:
    found = sorted(p for p in backups_dir(paths, wt_id).glob("*") if p.is_dir()) \
        if backups_dir(paths, wt_id).is_dir() else []
    return found[-1] if found else None


def tarball(folder: Path, key: str) -> Path:
    """Where the backup of the volume known as `key` (a service or volume name) goes."""
    return folder / (re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".tar")


def users(dk: DockerClient, volume: str) -> list[Any]:
    """Containers (any state) that mount `volume`."""
    return list(dk.containers.list(all=True, filters={"volume": volume}))


def refuse_in_use(dk: DockerClient, volume: str, allowed: set[str], what: str) -> None:
    """A volume mounted by a container outside `allowed` (ids) is someone else's business."""
    others = [c.name for c in users(dk, volume) if c.id not in allowed]
    if others:
        raise DevdError(f"volume {volume} ({what}) is in use by {', '.join(others)}; "
                        "nothing was removed",
                        f"stop and remove {', '.join(others)} (not devd's), then try again",
                        code="volume_in_use")


@contextmanager
def _helper(dk: DockerClient, image: str, mounts: dict[str, str], wt_id: str
            ) -> Iterator[Container]:
    container = dk.containers.create(
        image, command=["true"], entrypoint=[], labels=engine.labels(wt_id, "helper"),
        volumes={name: {"bind": path, "mode": "rw"} for name, path in mounts.items()},
        network_disabled=True)
    try:
        yield container
    finally:
        container.remove(force=True, v=True)  # and the anonymous volumes of its image


def archive(dk: DockerClient, volume: str, target: Path, image: str, wt_id: str) -> Path:
    """The volume's files as a tarball at `target` (streamed, never held in memory). It is
    written beside and renamed into place whole: a backup cut short (disk full) leaves no
    truncated tarball for `devd restore` to load, and fails the release before any removal."""
    part = target.with_name(target.name + ".part")
    try:
        with _helper(dk, image, {volume: MOUNT}, wt_id) as helper:
            stream, _ = helper.get_archive(MOUNT + "/.")
            try:
                with open(part, "wb") as out:
                    part.chmod(0o600)
                    for chunk in stream:
                        out.write(chunk)
            except OSError:
                for _ in stream:
                    pass  # read to the end: until then the engine holds the helper locked
                raise
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DevdError(f"backup of volume {volume} into {target.parent} failed: {exc}; "
                        "nothing was removed", "free disk space there, then release again",
                        code="backup_failed") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.rename(target)
    return target


def load(dk: DockerClient, volume: str, source: Path, image: str, wt_id: str) -> None:
    """Unpack a tarball made by `archive` into the (empty) volume."""
    with _helper(dk, image, {volume: MOUNT}, wt_id) as helper, open(source, "rb") as data:
        if not helper.put_archive(MOUNT, data):
            raise DevdError(f"Docker refused to unpack {source} into volume {volume}",
                            "check the engine's logs", code="docker_error")


def copy(dk: DockerClient, source: str, target: str, image: str, wt_id: str) -> None:
    """Copy every file of volume `source` into volume `target`."""
    with _helper(dk, image, {source: SOURCE, target: MOUNT}, wt_id) as helper:
        stream, _ = helper.get_archive(SOURCE + "/.")
        if not helper.put_archive(MOUNT, stream):
            raise DevdError(f"Docker refused to copy volume {source} into {target}",
                            "check the engine's logs", code="docker_error")

