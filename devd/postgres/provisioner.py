"""Postgres per worktree: a schema, a database or a container, chosen by [postgres] mode.

The modes live in sqlmodes.py (schema, database) and container.py; this is their face.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from devd.errors import DevdError, OwnershipConflict
from devd.postgres import clones, container, datadirs, dump, names, server, snapshots, sqlmodes
from devd.postgres.records import SQL_MODES, public_view
from devd.postgres.restore import restore_sql
from devd.provisioners.base import Context, Health, Progress, Provisioner

log = logging.getLogger(__name__)


class PostgresProvisioner(Provisioner):
    kind = "postgres"
    holds_data = True

    def applies(self, ctx: Context) -> bool:
        # Mode none and nothing recorded: this worktree has no Postgres at all.
        return ctx.config.postgres.mode != "none" or bool(ctx.recorded(self.kind).get("mode"))

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        mode, recorded = ctx.config.postgres.mode, ctx.recorded(self.kind)
        old = recorded.get("mode", "none")
        if old not in ("none", mode):
            if mode == "none":
                progress("postgres", f"[postgres] removed; the {old} is kept until "
                         "`devd release --yes`")
                return recorded
            raise DevdError(f"[postgres] mode changed from {old} to {mode}",
                            f"run `devd release --yes` first (a dump of the {old} is kept), "
                            "then provision again", code="config")
        if mode == "none":
            return {"mode": "none"}
        if mode == "container":
            return container.ensure(ctx, progress)
        return sqlmodes.ensure_sql(ctx, progress, mode)

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        mode = detail.get("mode", "none")
        if mode == "container":
            return container.check(ctx, detail)
        if mode in SQL_MODES:
            return sqlmodes.check_sql(detail)
        return Health(True)

    def check_teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        _tolerating_intent(detail, _by_mode(detail, container.check_teardown,
                                            sqlmodes.check_teardown), ctx)

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        _tolerating_intent(detail, _by_mode(detail, container.teardown,
                                            sqlmodes.teardown_sql), ctx)

    def back_up(self, ctx: Context, detail: dict[str, Any]) -> dict[str, Any]:
        return _tolerating_intent(detail, _by_mode(detail, container.back_up,
                                                   sqlmodes.back_up_sql), ctx) or {}

    def resume(self, ctx: Context, detail: dict[str, Any], made: dict[str, Any]) -> None:
        (container.resume if detail.get("mode") == "container" else sqlmodes.resume_sql)(
            ctx, detail, made)

    def env(self, ctx: Context, detail: dict[str, Any]) -> dict[str, str]:
        if detail.get("mode", "none") == "none" or "password" not in detail:
            return {}
        return names.env_for(detail)


T = TypeVar("T")
Step = Callable[[Context, dict[str, Any]], T]


def _by_mode(detail: dict[str, Any], in_container: Step[T], in_sql: Step[T]) -> Step[T] | None:
    mode = detail.get("mode", "none")
    return in_container if mode == "container" else in_sql if mode in SQL_MODES else None


def _tolerating_intent(detail: dict[str, Any], step: Step[T] | None, ctx: Context) -> T | None:
    """Run a teardown step; a conflict on a name only an intent was recorded for means the
    name was someone else's from the start (the provision failed on it): nothing of ours."""
    try:
        return step(ctx, detail) if step is not None else None
    except OwnershipConflict:
        if detail.get("complete") or detail.get("initialized"):
            raise  # something replaced what devd made: say so, touch nothing
        return None


def restore(ctx: Context, detail: dict[str, Any], source: str | None) -> dict[str, Any]:
    """Load a dump (the worktree's latest by default) into its provisioned Postgres; the data
    it replaces is dumped first, and a failure leaves that data exactly as it was."""
    mode = detail.get("mode", "none")
    if mode != "container" and mode not in SQL_MODES:  # an error, not a usage one: exit 1
        raise DevdError(f"{ctx.worktree.path} has no Postgres provisioned; nothing was changed",
                        "set [postgres] mode in devd.toml and run `devd provision` first",
                        code="no_postgres")
    found = Path(source) if source else dump.latest(ctx.paths, ctx.worktree.id)
    if found is None:
        raise DevdError(f"no dump of worktree {ctx.worktree.id} found in "
                        f"{dump.dumps_dir(ctx.paths)}; nothing was changed",
                        "pass the dump's path: devd restore --dump FILE", code="dump_not_found")
    path = dump.verify(found, dump.RESTORE_FAILURE)
    restorer = container.restore if mode == "container" else restore_sql
    before = restorer(ctx, detail, path)
    return {"restored": str(path), "mode": mode, "name": detail.get("name"),
            "before": str(before)}


def orphans(ctx_paths: Any, known_ids: set[str]) -> list[dict[str, str]]:
    """Objects with devd's marker, on every server devd has used, that no worktree owns, and
    what a daemon killed mid-snapshot left."""
    found = clones.orphans(ctx_paths, known_ids) + snapshots.leftovers(ctx_paths) + [
        {"kind": "partial clone", "name": str(where), "worktree_id": where.parent.name,
         "where": "data dir"} for where in clones.crashed_resets(ctx_paths)]
    for url in server.servers(ctx_paths):
        if url == server.DOCKER:
            found += container.orphans(known_ids)
            continue
        try:
            with server.connect(url, timeout=2) as conn:
                marked = server.marked_objects(conn)
        except (DevdError, psycopg.Error):
            continue  # a server that is down has no orphans we could do anything about
        where = names.mask_url(url) or "default server"
        found += [{"kind": kind, "name": name, "worktree_id": owner, "where": where}
                  for kind, name, owner in marked if owner not in known_ids]
    return found


def remove_snapshot_leftovers(paths: Any) -> list[str]:
    """What a daemon killed mid-snapshot or mid-reset left; a reset killed between its
    renames is finished or rolled back first (its new clone may be the only data left)."""
    clones.recover_all(paths)
    gone = [str(where) for where in clones.crashed_resets(paths)]
    for where in map(Path, gone):
        datadirs.remove_tree(where)
    if gone:
        log.info("removed the partial clones of resets a killed daemon left: %s",
                 ", ".join(gone))
    return snapshots.remove_leftovers(paths) + gone


def status_entry(paths: Any, details: dict[str, dict[str, Any]], checked: dict[str, Health],
                 disk: bool = True) -> dict[str, Any]:
    """{"postgres": {...}} for `devd status --json` when the worktree has one, else {};
    `disk`: with a clone's disk use (status has it; a provision's reply leaves it out)."""
    detail = details.get("postgres", {})
    if detail.get("mode", "none") == "none":
        return {}
    health = checked.get("postgres")
    state = health.detail.get("state", "ready") if health else "unchecked"
    view = public_view(detail, state)
    if detail.get("snapshot") and detail.get("data_dir"):
        view |= {"snapshot": detail["snapshot"], "strategy": detail.get("strategy")}
        view |= {"disk": clones.disk(paths, detail)} if disk else {}
        if note := clones.recovered(Path(detail["data_dir"])):
            view["recovered_reset"] = note
    elif detail.get("strategy"):
        view["strategy"] = detail["strategy"]
    return {"postgres": view}
