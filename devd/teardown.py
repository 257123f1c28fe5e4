"""Release, all or nothing: every precondition checked first, then the teardowns in order.

The order puts data-bearing resources (Postgres) first: they are the ones that can fail
(sessions, a dump, objects depending on a role), and the first failure stops the release,
so the worktree's .env block, dirs and ports stay as they were while its data is in doubt.
"""

from __future__ import annotations

import logging

from devd.errors import DevdError
from devd.provisioners import Context, Progress, Provisioner
from devd.registry import Resource

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
            raise _stopped(ctx, order, done, resource, exc) from exc
        ctx.registry.drop_resource(ctx.worktree.id, resource.kind)
        done.append(resource.kind)


def _stopped(ctx: Context, order: list[Resource], done: list[str], failed: Resource,
             exc: Exception) -> DevdError:
    """Say where the release stopped and what is left. A teardown that destroys in steps
    marks its resource failed before its first drop (see postgres/sqlmodes.py), so status
    tells the truth even for a gone worktree, whose resources status does not check."""
    message = getattr(exc, "message", str(exc))
    kept = [r.kind for r in order if r.kind not in done and r is not failed]
    text = f"release of {ctx.worktree.path} stopped at {failed.kind}: {message}; "
    text += f"released: {', '.join(done)}; " if done else ""
    text += f"kept as they were: {', '.join(kept) or 'nothing else'}"
    return DevdError(text, getattr(exc, "hint", "") or "fix the cause and run `devd release` "
                     "again", code="release_failed")
