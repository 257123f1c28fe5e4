"""A worktree's container on its own copy-on-write clone of a snapshot ([postgres] mode =
"container" with snapshot = "NAME"): making the clone, resetting it, and its disk use.

A reset keeps what it replaces as a directory beside the new clone (before-reset-STAMP):
on a reflink filesystem that is a rename, costs only the blocks the worktree changed, and
keeps everything (roles, extensions, large objects) where a pg_dump of gigabytes would take
minutes. A server started on it gets the data back; it goes after 7 days, or with the
worktree's release (which keeps a pg_dump of the data it has then).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devd import instance
from devd.errors import DevdError, OwnershipConflict
from devd.paths import Paths, write_atomic
from devd.postgres import datadirs, snapshots
from devd.provisioners.base import Context, Progress

log = logging.getLogger(__name__)

CLONES = "clones"
FIELDS = ("snapshot", "data_dir", "strategy", "snapshot_password")  # what a clone records
# Recorded while a clone's data still has its snapshot's password: the first connection
# tries that one first (the worktree's own would fail). Ready drops it from the record.
FRESH = "fresh_clone"
INCOMING = ".incoming-"  # a reset's new clone, until the old data is moved aside
# Written once a reset's new clone is complete, before its two renames; removed after. A
# daemon killed meanwhile leaves it: the next one finishes the reset from it (recover()).
JOURNAL = "devd-reset.json"
RECOVERED = "recovered_reset"  # the clone marker's note of what recover() did, for status


def clone_root(paths: Paths, wt_id: str) -> Path:
    return datadirs.postgres_dir(paths, CLONES) / wt_id


def ensure(ctx: Context, image_major: str | None, progress: Progress) -> dict[str, Any]:
    """The worktree's clone, made from the configured snapshot if it has none yet; returns
    the fields to record (snapshot, data_dir, strategy)."""
    name, wt_id = ctx.config.postgres.snapshot, ctx.worktree.id
    root = clone_root(ctx.paths, wt_id)
    pgdata = root / datadirs.PGDATA
    marker = datadirs.read_marker(root, datadirs.CLONE_MARKER)
    done = recover(root, RUN_ANY) if marker is not None else None
    if done:
        marker = datadirs.read_marker(root, datadirs.CLONE_MARKER) or {}
        progress("postgres", str(marker.get(RECOVERED)), level="warning")
    if marker is not None and pgdata.is_dir():
        if marker.get("snapshot") != name:
            raise DevdError(f"this worktree's data is a clone of snapshot "
                            f"{marker.get('snapshot')!r}, and devd.toml now says {name!r}",
                            "run `devd db reset` to switch (the current data is kept aside)",
                            code="config")
        # A finished reset's data still has its snapshot's password.
        return _fields(marker, pgdata) | ({FRESH: True} if done == FINISHED else {})
    if marker is not None and ctx.recorded("postgres").get("initialized"):
        kept = sorted(str(p) for p in root.glob(datadirs.BEFORE_RESET + "*"))
        progress("postgres", f"{pgdata} was deleted: cloning snapshot {name} again"
                 + (f" (what resets replaced is kept in {', '.join(kept)})" if kept else ""),
                 level="warning")
    snap = usable(ctx.paths, name, image_major)
    if marker is None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    strategy, took = _copy(snap, pgdata, progress)
    return _fields(_mark(root, snap, wt_id, strategy, took), pgdata) | {FRESH: True}


def usable(paths: Paths, name: str, image_major: str | None) -> dict[str, Any]:
    """The snapshot, if the image can run its data (the same PostgreSQL major version)."""
    snap = snapshots.find(paths, name)
    if image_major and str(snap.get("pg_major")) != image_major:
        raise DevdError(f"snapshot {name!r} was made by PostgreSQL {snap.get('pg_major')}, and "
                        f"the worktree's image runs PostgreSQL {image_major}",
                        f"set [postgres] image to a PostgreSQL {snap.get('pg_major')} image, or "
                        "take a snapshot with this one", code="snapshot_version")
    return snap


def _copy(snap: dict[str, Any], target: Path, progress: Progress) -> tuple[str, float]:
    """The snapshot's data copied to `target`: the strategy, and the seconds it took."""
    started = time.monotonic()
    progress("postgres", f"cloning snapshot {snap['name']} into {target.parent}")
    strategy = datadirs.clone_tree(Path(snap["pgdata"]), target)
    took = time.monotonic() - started
    _still_there(snap, target)
    if strategy == "copy":
        progress("postgres", f"{target.parent}'s filesystem cannot share blocks with the "
                 f"snapshot (no reflink): copied it in full in {took:.1f} s; for clones that "
                 "cost nothing, keep devd's data dir on XFS (reflink=1), btrfs or APFS",
                 level="warning")
    return strategy, took


def _mark(root: Path, snap: dict[str, Any], wt_id: str, strategy: str, took: float
          ) -> dict[str, Any]:
    datadirs.write_marker(root, datadirs.CLONE_MARKER, **_marker_fields(snap, wt_id, strategy,
                                                                        took))
    return datadirs.read_marker(root, datadirs.CLONE_MARKER) or {}


def _marker_fields(snap: dict[str, Any], wt_id: str, strategy: str, took: float
                   ) -> dict[str, Any]:
    return {"worktree": wt_id, "snapshot": snap["name"], "strategy": strategy,
            "cloned": time.time(), "clone_seconds": round(took, 3),
            "snapshot_password": snap.get("password")}


def _still_there(snap: dict[str, Any], pgdata: Path) -> None:
    """A drop-snapshot runs under the snapshot's lock, not the worktree's, and sees a clone
    only once its marker is written: one dropped (or dropped and taken again) during the
    copy may have left it with part of the files. Such a clone goes, and the error says so."""
    now = datadirs.read_marker(Path(snap["path"]), datadirs.SNAPSHOT_MARKER)
    if now is None or now.get("created") != snap.get("created"):
        datadirs.remove_tree(pgdata)
        raise DevdError(f"snapshot {snap['name']!r} was dropped or taken again while it was "
                        "being cloned; the copy was discarded", "provision again",
                        code="snapshot_not_found")


def _fields(marker: dict[str, Any], pgdata: Path) -> dict[str, Any]:
    return dict(zip(FIELDS, (marker.get("snapshot"), str(pgdata), marker.get("strategy"),
                             marker.get("snapshot_password")), strict=True))


def replace(ctx: Context, image_major: str | None, progress: Progress,
            stopped: Callable[[], None]) -> dict[str, Any]:
    """Put the configured snapshot in place of the worktree's data dir, the old one kept
    aside. The clone is made beside it while the server shuts down (`stopped` waits for
    that, and is called whatever happens): a reset costs the longer of the two, not both.
    Returns the new clone's fields and `before`, the kept path."""
    name, wt_id = ctx.config.postgres.snapshot, ctx.worktree.id
    try:
        snap = usable(ctx.paths, name, image_major)
        root = clone_root(ctx.paths, wt_id)
        if datadirs.read_marker(root, datadirs.CLONE_MARKER) is None:
            root.mkdir(mode=0o700, parents=True)
        recover(root, RUN_ANY)  # an interrupted reset's complete clone is not stale
        for stale in root.glob(INCOMING + "*"):  # a crashed reset's
            datadirs.remove_tree(stale)
        incoming = root / f"{INCOMING}{snapshots.RUN}"
        strategy, took = _copy(snap, incoming, progress)
    finally:
        stopped()
    pgdata = root / datadirs.PGDATA
    # A second reset within the same second takes the next free second: never the first's.
    now = time.time()
    while (before := root / datadirs.before_reset_name(now)).exists() or before.is_symlink():
        now += 1
    _write_journal(root, incoming, before, _marker_fields(snap, wt_id, strategy, took))
    _swap(root, incoming, before)
    (root / JOURNAL).unlink()
    fields = _fields(datadirs.read_marker(root, datadirs.CLONE_MARKER) or {}, pgdata)
    datadirs.prune_before_reset(root)
    return fields | {"before": str(before) if before.is_dir() else None}


def _write_journal(root: Path, incoming: Path, before: Path, marker: dict[str, Any]) -> None:
    write_atomic(root / JOURNAL, (json.dumps({
        "instance": instance.current(), "run": snapshots.RUN, "incoming": incoming.name,
        "before": before.name, "marker": marker}, indent=1) + "\n").encode())


def _swap(root: Path, incoming: Path, before: Path) -> None:
    """The reset's two renames and its marker; each step is skipped once done, so a daemon
    killed at any point between them is finished by the next one (recover())."""
    pgdata = root / datadirs.PGDATA
    if incoming.is_dir():
        if pgdata.is_dir():
            os.rename(pgdata, before)
        os.rename(incoming, pgdata)
    datadirs.write_marker(root, datadirs.CLONE_MARKER, **_journal(root / JOURNAL)["marker"])


RUN_ANY = ""  # recover(): whichever run left the journal (the caller holds the worktree)
FINISHED, ROLLED_BACK = "finished", "rolled back"


def recover(root: Path, skip_run: str | None = snapshots.RUN) -> str | None:
    """Finish or roll back a reset a killed daemon left in `root` (ours: the caller read its
    marker): FINISHED or ROLLED_BACK, with a note in the clone's marker (status shows it) and
    the log; None if there was none. With a journal, the new clone was complete: the reset is
    finished. Without one (an older devd) but with a new clone beside kept-aside data and no
    data dir, the new clone may be partial: the newest kept-aside data is put back. What was
    kept aside is never removed. A journal of run `skip_run` is a reset under way in this
    daemon: left alone."""
    pgdata, journal = root / datadirs.PGDATA, root / JOURNAL
    fields = _journal(journal) if journal.is_file() else None
    if fields is not None:
        if fields.get("run") == skip_run or fields.get("instance") != instance.current():
            return None
        before, incoming = root / fields["before"], root / fields["incoming"]
        if incoming.is_dir() or pgdata.is_dir():
            _swap(root, incoming, before)
            done, note = FINISHED, (
                f"finished a reset a killed daemon left: {pgdata} is a new clone of snapshot "
                f"{fields['marker']['snapshot']}; the data it replaced is in {before}")
        elif before.is_dir():  # its new clone is gone (removed by hand): the data goes back
            os.rename(before, pgdata)
            done, note = ROLLED_BACK, (f"rolled back a reset a killed daemon left (its new "
                                       f"clone is gone): {pgdata} is the data from before it")
        else:
            return None
        journal.unlink()
    else:
        kept = sorted(p for p in root.glob(datadirs.BEFORE_RESET + "*")
                      if p.is_dir() and not p.is_symlink())
        if pgdata.exists() or not kept or not any(root.glob(INCOMING + "*")):
            return None
        os.rename(kept[-1], pgdata)
        done, note = ROLLED_BACK, (
            f"rolled back a reset a killed daemon left (its new clone may be partial, and is "
            f"removed): {pgdata} is the data from before it again (was {kept[-1]})")
    marker = datadirs.read_marker(root, datadirs.CLONE_MARKER) or {}
    datadirs.write_marker(root, datadirs.CLONE_MARKER, **{
        k: v for k, v in marker.items() if k != "instance"} | {RECOVERED: note})
    log.warning("%s", note)
    return done


def _journal(journal: Path) -> dict[str, Any]:
    try:
        fields = json.loads(journal.read_text())
        if not all(isinstance(fields.get(k), str) for k in ("incoming", "before")) or \
                "snapshot" not in fields.get("marker", {}):
            raise ValueError("fields missing")
    except (OSError, ValueError, AttributeError) as exc:
        raise DevdError(f"{journal} (an interrupted reset's) is unreadable: {exc}; nothing "
                        "was changed", f"look at {journal.parent} yourself: the data is in "
                        "pgdata or before-reset-*, the new clone in .incoming-*; remove the "
                        "journal then", code="reset_interrupted") from exc
    if any("/" in fields[k] or fields[k] in ("", ".", "..") for k in ("incoming", "before")):
        raise DevdError(f"{journal} names a path outside its clone dir; nothing was changed",
                        f"remove {journal} yourself", code="reset_interrupted")
    return dict(fields)


def recovered(data_dir: Path) -> str | None:
    """What recover() did to this clone, until its next reset; None if nothing."""
    try:
        return (datadirs.read_marker(data_dir.parent, datadirs.CLONE_MARKER) or {}).get(RECOVERED)
    except OwnershipConflict:
        return None


def recover_all(paths: Paths) -> list[str]:
    """recover() in every clone dir of this instance (at start, and by gc): a reset killed
    between its renames left no data dir; this puts one back before anything sweeps."""
    done = []
    for clone in _ours(paths):
        try:
            if recover(clone):
                done.append(str(clone / datadirs.PGDATA))
        except (DevdError, OSError) as exc:
            log.warning("the interrupted reset in %s was not recovered: %s", clone, exc)
    return done


def _ours(paths: Paths) -> list[Path]:
    """This instance's clone dirs (with its marker; never a link)."""
    root = paths.data_dir / "postgres" / CLONES
    if not root.is_dir() or root.is_symlink():
        return []
    found = []
    for clone in sorted(root.iterdir()):
        try:
            if clone.is_dir() and datadirs.read_marker(clone, datadirs.CLONE_MARKER):
                found.append(clone)
        except OwnershipConflict:
            continue
    return found


def remove(paths: Paths, wt_id: str) -> None:
    """Teardown: the clone goes, and what resets kept aside with it (release keeps a dump)."""
    root = clone_root(paths, wt_id)
    if datadirs.read_marker(root, datadirs.CLONE_MARKER) is not None:
        datadirs.remove_tree(root)


def disk(paths: Paths, detail: dict[str, Any]) -> dict[str, Any]:
    """Where the data lives and what it costs: the snapshot's size, and the bytes only this
    clone holds (its own changes; all of it for a copy). `own_bytes` is None where the
    filesystem cannot say which blocks are shared."""
    pgdata = Path(detail["data_dir"])
    try:
        snap_bytes = snapshots.find(paths, detail["snapshot"]).get("bytes")
    except DevdError:
        snap_bytes = None
    measure = datadirs.unshared if detail.get("strategy") == "reflink" else datadirs.allocated
    own = measure(pgdata)
    kept = [measure(p) for p in pgdata.parent.glob(datadirs.BEFORE_RESET + "*")]
    return {"data_dir": str(pgdata), "snapshot_bytes": snap_bytes, "own_bytes": own,
            "kept_aside_bytes": None if None in kept else sum(k or 0 for k in kept)}


def users(paths: Paths, registry: Any, name: str) -> list[str]:
    """The worktrees (paths; ids if unregistered) whose data is a clone of snapshot `name`,
    by their clones' markers: the data's own word, whatever devd.toml says now."""
    root = paths.data_dir / "postgres" / CLONES
    found = []
    for clone in sorted(root.iterdir()) if root.is_dir() else []:
        marker = clone / datadirs.CLONE_MARKER
        if (clone / datadirs.PGDATA).is_dir() and marker.is_file() and \
                (datadirs.read_marker(clone, datadirs.CLONE_MARKER) or {}).get("snapshot") == name:
            wt = registry.worktree(clone.name)
            found.append(str(wt.path) if wt else clone.name)
    return found


def orphans(paths: Paths, known_ids: set[str]) -> list[dict[str, str]]:
    """Clones (with their data) whose worktree the registry no longer has."""
    root = paths.data_dir / "postgres" / CLONES
    if not root.is_dir():
        return []
    return [{"kind": "clone", "name": str(found), "worktree_id": found.name, "where": "data dir"}
            for found in sorted(root.iterdir())
            if found.name not in known_ids and (found / datadirs.PGDATA).is_dir()
            and (found / datadirs.CLONE_MARKER).is_file()]


def crashed_resets(paths: Paths) -> list[Path]:
    """New clones a reset was making when its daemon died (another run's name), in this
    instance's clone dirs: with no data copy they hold nothing but space (all of the
    snapshot's, where the filesystem cannot share blocks). Removed at start and by gc."""
    found = []
    for clone in _ours(paths):
        # An interrupted reset's clone waits for recover(): it may be the only data left.
        if (clone / JOURNAL).exists() or not (clone / datadirs.PGDATA).is_dir():
            continue
        found += [stale for stale in sorted(clone.glob(INCOMING + "*"))
                  if stale.name != INCOMING + snapshots.RUN and not stale.is_symlink()]
    return found
