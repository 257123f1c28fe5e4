"""Release, all or nothing: every precondition checked first, then every backup, then the
teardowns in order.

A backup is the step most likely to fail (a full disk, a dump refused), so each data-bearing
resource keeps its copy first (back_up_all) and only when all of them have one does anything
go: a failed Compose volume tarball never finds Postgres already dropped. The teardown order
puts data-bearing resources (Postgres) first: they are the ones that can still fail
(sessions, objects depending on a role), and the first failure stops the release, so the
worktree's .env block, dirs and ports stay as they were while its data is in doubt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from devd.containers import volumes
from devd.errors import DevdError
from devd.provisioners import Context, Progress, Provisioner
from devd.registry import RELEASE_INTERRUPTED, Resource

log = logging.getLogger("devd")


def check_all(by_kind: dict[str, Provisioner], ctx: Context, order: list[Resource]) -> None:
    """Each provisioner's check_teardown; the first refusal refuses the whole release."""
    for resource in order:
        provisioner = by_kind.get(resource.kind)
        try:
            if provisioner:
                provisioner.check_teardown(ctx, resource.detail)
        except DevdError as exc:
            raise DevdError(
                f"release of {ctx.worktree.path} refused, nothing was released (.env block, "
                f"dirs, ports and data are as they were): {exc.message}",
                exc.hint, code=exc.code) from exc


def back_up_all(by_kind: dict[str, Provisioner], ctx: Context, order: list[Resource],
                progress: Progress) -> None:
    """Phase 1: each data-bearing resource's backup (ctx.made), nothing removed. On a
    failure, what the backups stopped or closed is resumed and the copies already made are
    deleted (the data they hold is still in place), and the release is refused."""
    if not ctx.backup:
        return
    # A release the last daemon died in may have removed some volumes (their tarballs in its
    # folder) and not others: this one's folder, the newest, must hold them all for restore.
    interrupted = ctx.worktree.error == RELEASE_INTERRUPTED
    previous = volumes.latest_backup(ctx.paths, ctx.worktree.id) if interrupted else None
    for resource in order:
        provisioner = by_kind.get(resource.kind)
        if provisioner is None or not provisioner.holds_data:
            continue
        progress(resource.kind, "backing up")
        try:
            ctx.made[resource.kind] = provisioner.back_up(ctx, resource.detail)
        except Exception as exc:  # any failure refuses the release; reported, not swallowed
            log.exception("backup of %s for %s failed", resource.kind, ctx.worktree.id)
            unresumed = _resume_all(by_kind, ctx, order)
            _discard_backups(ctx)
            raise _not_backed_up(ctx, resource, exc, unresumed) from exc
    if previous is not None and ctx.outputs.get("volume_backups"):
        _carry_over(previous, Path(ctx.outputs["volume_backups"][-1]))


def _carry_over(previous: Path, folder: Path) -> None:
    """The tarballs of `previous` that `folder` lacks, linked in (the older folder keeps
    them too)."""
    for source in previous.glob("*.tar"):
        target = folder / source.name
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


def _resume_all(by_kind: dict[str, Provisioner], ctx: Context, order: list[Resource]
                ) -> list[str]:
    """Undo each backup made so far, the latest first; the kinds that could not be."""
    failed = []
    for resource in reversed(order):
        if resource.kind in ctx.made:
            try:
                by_kind[resource.kind].resume(ctx, resource.detail, ctx.made.pop(resource.kind))
            except Exception:  # the others are still resumed; the error names this one
                log.exception("resuming %s for %s failed", resource.kind, ctx.worktree.id)
                failed.append(resource.kind)
    return failed


def _discard_backups(ctx: Context) -> None:
    """A refused release leaves no backup behind: `devd restore` would take a partial one
    for the newest (the data is where it was, nothing needs one)."""
    for dumped in ctx.outputs.pop("dumps", []):
        Path(dumped).unlink(missing_ok=True)
    for folder in ctx.outputs.pop("volume_backups", []):
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)


def _not_backed_up(ctx: Context, failed: Resource, exc: Exception, unresumed: list[str]
                   ) -> DevdError:
    message = getattr(exc, "message", str(exc))
    text = (f"release of {ctx.worktree.path} refused: the backup of {failed.kind} failed "
            f"({message}); nothing was released (data, .env block, dirs and ports are as "
            "they were)") + _unresumed(unresumed)
    return DevdError(text, getattr(exc, "hint", "") or "fix the cause and run `devd release` "
                     "again", code="release_failed")


def run_all(by_kind: dict[str, Provisioner], ctx: Context, order: list[Resource],
            progress: Progress) -> None:
    """Tear down in `order`, forgetting each resource once it is gone; stop at a failure."""
    done: list[str] = []
    for resource in order:
        provisioner = by_kind.get(resource.kind)
        progress(resource.kind, "releasing")
        try:
            if provisioner:
                provisioner.teardown(ctx, resource.detail)
        except Exception as exc:  # any failure stops the release; reported, not swallowed
            log.exception("teardown of %s for %s failed", resource.kind, ctx.worktree.id)
            ctx.made.pop(resource.kind, None)  # its own teardown undoes what it can
            unresumed = _resume_all(by_kind, ctx, [r for r in order if r.kind not in done])
            raise _stopped(ctx, order, done, resource, exc, unresumed) from exc
        ctx.registry.drop_resource(ctx.worktree.id, resource.kind)
        done.append(resource.kind)


def _stopped(ctx: Context, order: list[Resource], done: list[str], failed: Resource,
             exc: Exception, unresumed: list[str]) -> DevdError:
    """Say where the release stopped and what is left. A teardown that destroys in steps
    marks its resource failed before its first drop (see postgres/sqlmodes.py), so status
    tells the truth even for a gone worktree, whose resources status does not check."""
    message = getattr(exc, "message", str(exc))
    kept = [r.kind for r in order if r.kind not in done and r is not failed]
    text = f"release of {ctx.worktree.path} stopped at {failed.kind}: {message}; "
    text += f"released: {', '.join(done)}; " if done else ""
    text += f"kept as they were: {', '.join(kept) or 'nothing else'}"
    return DevdError(text + _unresumed(unresumed), getattr(exc, "hint", "") or
                     "fix the cause and run `devd release` again", code="release_failed")


def _unresumed(kinds: list[str]) -> str:
    return f"; could not start again what the backup of {', '.join(kinds)} stopped (see " \
        "the daemon log): run `devd provision`" if kinds else ""
