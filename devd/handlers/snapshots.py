"""Requests about Postgres snapshots: take, list, drop, and reset a worktree to its own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from devd import git, naming
from devd.errors import DevdError, UsageError
from devd.handlers.core import absolute
from devd.handlers.worktrees import WorktreeRequests
from devd.postgres import clones, container, dump, names, snapshots
from devd.provisioners import Progress
from devd.registry import Worktree
from devd.settings import PostgresConfig


def _is_url(source: str) -> bool:
    """A libpq URL or key=value conninfo, not a path."""
    return "://" in source or "=" in source.split("/")[0]


class SnapshotRequests(WorktreeRequests):
    """`devd db ...`: snapshots are shared by worktrees; one request per snapshot at a time.
    A reset re-ensures the worktree's Postgres, so this family builds on the worktrees'."""

    def do_db_snapshot(self, progress: Progress, path: str, source: str | None = None,
                       name: str | None = None, max_rate: str | None = None,
                       password: str | None = None) -> dict[str, Any]:
        """Snapshot a devd container (the caller's main worktree's by default) or a URL."""
        if source and _is_url(source):
            if not name:
                raise UsageError("a snapshot of a URL needs a NAME",
                                 "devd db snapshot --from URL NAME")
            dump.libpq_args(source, "postgres")  # a malformed URL, refused before anything
            image = self._image_at(path)
            origin = snapshots.Source(names.mask_url(source), url=source, image=image,
                                      max_rate=max_rate or "", password=password or "")
        else:
            wt = self.find(source) if source else self._main_of(self.find(path))
            origin = self._container_source(wt, max_rate or "")
            name = name or naming.repo_name(wt.repo_main_path)
        snapshots.check_name(name)
        with self._lock(f"snapshot:{name}"):
            dk = container.client()
            container.ensure_image(dk, origin.image, progress)
            return snapshots.take(dk, self.paths, name, origin, origin.image, progress)

    def _image_at(self, path: str) -> str:
        """[postgres] image of the checkout at `path` (the copy is validated with it, so it
        must run the source's major version); the default outside any checkout."""
        try:
            return self._cached_config(git.resolve(Path(absolute(path))).path).postgres.image
        except DevdError:
            return PostgresConfig().image

    def _main_of(self, wt: Worktree) -> Worktree:
        main = self.registry.worktree_at(wt.repo_main_path)
        if main is None:
            raise DevdError(f"the main worktree {wt.repo_main_path} is not registered",
                            f"`devd provision {wt.repo_main_path}`, or pass --from PATH|URL",
                            code="not_registered")
        return main

    def _container_source(self, wt: Worktree, max_rate: str) -> snapshots.Source:
        detail = next((r.detail for r in self.registry.resources(wt.id)
                       if r.kind == "postgres"), {})
        if detail.get("mode") != "container":
            raise DevdError(f"{wt.path} has no devd Postgres container to snapshot",
                            "pass --from URL for any reachable server (pg_basebackup needs a "
                            "role with REPLICATION)", code="no_postgres")
        state = container.container_state(detail["container"])
        if state != "running":
            raise DevdError(f"{wt.path}'s container {detail['container']} is {state}; "
                            "nothing was kept", f"`devd provision {wt.path}` starts it",
                            code="snapshot_failed")
        return snapshots.Source(f"{wt.path} ({detail['container']})",
                                container=detail["container"], image=detail["image"],
                                max_rate=max_rate, password=detail.get("password", ""))

    def do_db_snapshots(self, progress: Progress) -> dict[str, Any]:
        found = snapshots.listing(self.paths)
        return {"snapshots": [s | {"used_by": clones.users(self.paths, self.registry, s["name"])}
                              for s in found]}

    def do_db_drop_snapshot(self, progress: Progress, name: str) -> dict[str, Any]:
        snapshots.check_name(name)
        with self._lock(f"snapshot:{name}"):
            return snapshots.drop(self.paths, name, clones.users(self.paths, self.registry, name))

    def do_db_reset(self, progress: Progress, path: str) -> dict[str, Any]:
        """The worktree's data back to its snapshot: a fresh clone, the old data kept aside."""
        wt = self.find(path)
        started = time.monotonic()
        with self._lock(wt.id):
            ctx = self.context(wt)
            detail = ctx.recorded("postgres")
            try:
                fields = container.reset(ctx, detail, progress)
            finally:
                # Started again whatever happened: on a failed clone, on the data it had.
                failure = self._ensure(self._by_kind["postgres"], ctx, progress) \
                    if detail.get("snapshot") else None
        if failure is not None:
            raise failure
        return {"reset": str(wt.path), "snapshot": fields["snapshot"],
                "strategy": fields["strategy"], "before": fields["before"],
                "data_dir": fields["data_dir"], "seconds": round(time.monotonic() - started, 3)}
