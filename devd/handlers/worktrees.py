"""Requests about worktrees as a whole: status, provision, release, restore, gc, env."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from devd import __version__, git, leftovers, naming, processes, teardown
from devd.containers import compose, declared, shared, volumes
from devd.errors import DevdError, NotRegistered, ProvisionFailed, UsageError
from devd.handlers.core import ServiceCore, absolute
from devd.postgres import provisioner as postgres
from devd.protocol import Encoded
from devd.provisioners import Context, Progress, Provisioner
from devd.registry import RELEASING, Worktree
from devd.settings import parse_duration

log = logging.getLogger("devd")


def _quiet(phase: str, message: str, **extra: Any) -> None:
    log.debug("%s: %s", phase, message)


def not_due(wt: Worktree, now: float, grace: float) -> dict[str, Any]:
    """A gone worktree gc keeps for now: since when, and in how many seconds it is due."""
    gone_for = max(0.0, now - (wt.gone_at or now))
    return {"id": wt.id, "path": str(wt.path), "gone_seconds": round(gone_for),
            "due_in_seconds": round(max(0.0, grace - gone_for))}


class WorktreeRequests(ServiceCore):
    """Registering, provisioning and releasing worktrees, one at a time per worktree."""

    def do_ping(self, progress: Progress) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": __version__, "manager": self.manager}

    def do_status(self, progress: Progress, path: str | None = None, fresh: bool = False
                  ) -> dict[str, Any] | Encoded:
        """From the snapshot the daemon keeps current (devd/handlers/snapshot.py)."""
        if path is None and not fresh:
            return self.snapshot.encoded()
        return self.snapshot.status(path, fresh=fresh)

    def do_status_view(self, progress: Progress, view: str, cwd: str | None = None,
                       width: int = 100, colour: bool = False, home: str | None = None
                       ) -> dict[str, str]:
        """`status` rendered here for the CLI's fast path (devd/quick.py), which then
        needs neither a JSON parser for a big reply nor the renderer: "json" is
        `devd status --json`'s text, "rows" `devd status`'s for that caller."""
        if view == "json":
            return {"text": self.snapshot.json_text()}
        if view != "rows":
            raise UsageError(f"status_view: unknown view {view!r}", "\"json\" or \"rows\"")
        from devd import render_status

        text = render_status.render_status(self.snapshot.status(), cwd,
                                           render_status.Painter(colour), width, home=home)
        return {"text": text}

    def daemon_info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": __version__, "socket": str(self.paths.socket),
                "gc_grace_seconds": self._grace()}

    def _grace(self) -> float | None:
        try:
            return parse_duration(self.settings.gc_grace)
        except ValueError:  # a bad config value is gc's to report, not status'
            return None

    def do_provision(self, progress: Progress, path: str, background: bool = False,
                     fix_deps: bool = False, postgres_url: str | None = None
                     ) -> dict[str, Any]:
        info = git.resolve(Path(absolute(path)))
        wt_id = naming.worktree_id(info.main_path, info.path)
        self._check_path_free(info.path, wt_id)
        wt = self.registry.register(
            wt_id, info.path, info.branch,
            info.common_dir, info.main_path, naming.repo_name(info.main_path),
        )
        self.on_register()
        # The caller's DEVD_POSTGRES_URL (sent by the CLI) wins over the daemon's own.
        options = {"fix_deps": bool(fix_deps), "postgres_url": postgres_url or ""}
        if background:
            self._in_background(wt.id, options)
            return self.describe(wt, self.registry.resources(wt.id))
        self.provision(wt.id, progress, options)
        return self._describe_id(wt.id)

    def do_release(self, progress: Progress, path: str, yes: bool = False,
                   no_backup: bool = False, force: bool = False) -> dict[str, Any]:
        wt = self.find(path)
        outputs = self.release(wt, progress, yes=yes, backup=not no_backup, force=force)
        return {"released": wt.id, "path": str(wt.path)} | outputs

    def do_restore(self, progress: Progress, path: str, dump: str | None = None
                   ) -> dict[str, Any]:
        """Postgres from its dump, and the volumes of containers and Compose projects from
        the worktree's newest volume backup; an error only if there is nothing to restore."""
        wt = self.find(path)
        with self._lock(wt.id):
            ctx = self.context(wt, strict=False)
            folder = volumes.latest_backup(self.paths, wt.id)
            result: dict[str, Any] = {}
            if ctx.recorded("postgres").get("mode", "none") != "none" or folder is None:
                progress("postgres", "restoring")
                result = postgres.restore(ctx, ctx.recorded("postgres"), dump)
            if folder is not None and dump is None:
                result["volumes"] = declared.restore(ctx, ctx.recorded("containers"), folder,
                                                     progress)
                if ctx.recorded("compose"):
                    result["volumes"] += compose.restore(ctx, folder, progress)
                result["volume_backup"] = str(folder)
            if ctx.outputs.get("replaced_backups"):  # what the volumes held before
                result["replaced_backup"] = ctx.outputs["replaced_backups"][-1]
            return result

    def do_compose(self, progress: Progress, path: str, action: str) -> dict[str, Any]:
        """`devd compose up|down`: the worktree's Compose project (provisioned first)."""
        if action not in ("up", "down"):
            raise UsageError(f"compose action {action!r} is not up or down",
                             "devd compose up | devd compose down")
        wt = self.find(path)
        project = self.compose_action(wt, action, progress)
        if project is None:
            raise DevdError(f"{wt.path} has no Compose project provisioned",
                            "set [compose] files in devd.toml and run `devd provision`",
                            code="no_compose")
        return {"action": action, "project": project, "path": str(wt.path)}

    def orphans(self, max_age: float = 0.0, scan: bool = True) -> list[dict[str, str]]:
        """Objects carrying devd's marker that no registered worktree owns. Status accepts a
        scan up to `max_age` seconds old: it connects to servers, and one that is down costs
        its timeout, which a prompt calling `devd status` must not pay every time.
        `scan=False`: none before the first scan (a status answered before its first pass)."""
        known = {wt.id for wt in self.registry.worktrees()}
        now = time.monotonic()
        if self._orphans is None and not scan:
            return []
        if self._orphans is None or now - self._orphans[0] > max_age:
            self._orphans = (now, postgres.orphans(self.paths, known)
                             + compose.orphans(self.paths.state_dir, known))
        return [found for found in self._orphans[1] if found["worktree_id"] not in known]

    def do_gc(self, progress: Progress, grace: str | None = None, dry_run: bool = False,
              no_backup: bool = False) -> dict[str, Any]:
        try:
            seconds = parse_duration(grace or self.settings.gc_grace)
        except ValueError as exc:
            raise UsageError(str(exc), "e.g. --grace 24h, --grace 30m, --grace 0") from exc
        self.reconcile()
        self.notice_missing()
        now = time.time()
        gone = [wt for wt in self.registry.worktrees() if wt.state == "gone"]
        due = [wt for wt in gone if (wt.gone_at or 0) <= now - seconds]
        stopped = {} if dry_run else leftovers.stop_gone(self, due, progress)
        results = []
        for wt in due:
            entry: dict[str, Any] = {"id": wt.id, "path": str(wt.path), "released": False,
                                     "stopped": stopped.get(wt.id, [])}
            if not dry_run:
                try:
                    entry |= self.release(wt, progress, yes=True, backup=not no_backup,
                                          only_if_gone=True)
                    entry["released"] = True
                except DevdError as exc:
                    entry["skipped" if exc.code == "not_gone" else "error"] = exc.to_dict()
            results.append(entry)
        processes.prune_runs(self.registry)
        retired = {} if dry_run else shared.retire(self.paths, self.registry, not no_backup)
        swept = [] if dry_run else self.sweep_snapshot_leftovers()
        return {"dry_run": dry_run, "grace_seconds": seconds, "worktrees": results,
                **({"shared_redis": retired} if retired else {}),
                "not_due": [not_due(wt, now, seconds) for wt in gone if wt not in due],
                "snapshot_leftovers_removed": swept, "orphans": self.orphans()}

    def sweep_snapshot_leftovers(self) -> list[str]:
        """Remove what a daemon killed mid-snapshot left (at start, and by gc); status lists
        it as orphans until then."""
        swept = postgres.remove_snapshot_leftovers(self.paths)
        if swept:
            self._orphans = None  # the next status scans again
        return swept

    def do_env(self, progress: Progress, path: str) -> dict[str, Any]:
        wt = self.find(path)
        env, warnings = self.ready_environment(wt)
        return {"worktree": str(wt.path), "env": env, "warnings": warnings}

    def provision(self, wt_id: str, progress: Progress,
                  options: dict[str, Any] | None = None, asked: int | None = None) -> None:
        """Ensure every resource of a worktree, one provision per worktree at a time.
        `asked` (a background provision, the git hook's): how many had finished when it was
        asked for; if one succeeded meanwhile with the same inputs, it did this one's work.
        One the user asks for always runs (they may have changed files while another ran)."""
        with self._lock(wt_id):
            wt = self.registry.worktree(wt_id)
            if wt is None:
                raise NotRegistered(f"worktree {wt_id} was released while this provision "
                                    "waited", "provision it again if you still want it")
            try:
                ctx = self.context(wt)
            except DevdError as exc:
                self.registry.set_state(wt_id, "failed", exc.message)
                raise
            ctx.options.update(options or {})
            inputs = ctx.config.model_dump_json() + json.dumps(ctx.options, sort_keys=True,
                                                                default=str)
            if asked is not None and self._finished(wt_id) != asked \
                    and self._succeeded.get(wt_id) == inputs:
                # The git hook's provision and the user's `devd provision` of a new worktree
                # arrive together: a second pass would add nothing, and while it ran each
                # resource would be pending again, its variables missing from `devd env`.
                progress("provision", "done by the provision that ran meanwhile")
                return
            self.registry.set_state(wt_id, "provisioning")
            try:
                failures = [f for p in self.provisioners
                            if p.applies(ctx) and (f := self._ensure(p, ctx, progress))]
            finally:
                with self._locks_guard:
                    self._passes[wt_id] = self._passes.get(wt_id, 0) + 1
                    self._succeeded.pop(wt_id, None)
            if not failures:
                self._succeeded[wt_id] = inputs
            self.registry.set_state(wt_id, "failed" if failures else "ready",
                                    "; ".join(f.message for f in failures) or None)
        self.snapshot.forget(wt_id)  # it may have fixed what no record says (.env, a server)
        self.on_change()
        if failures:
            raise ProvisionFailed(
                f"{wt.path}: " + "; ".join(f"{f.code}: {f.message}" for f in failures),
                " ".join(f.hint for f in failures if f.hint) or "see `devd status`",
            )

    def _ensure(self, provisioner: Provisioner, ctx: Context, progress: Progress
                ) -> DevdError | None:
        kind, wt_id = provisioner.kind, ctx.worktree.id
        self.registry.set_resource(wt_id, kind, "pending")
        progress(kind, "ensuring")
        try:
            detail = provisioner.ensure(ctx, progress)
        except DevdError as exc:
            failure = exc
        except OSError as exc:
            log.exception("%s of %s failed", kind, wt_id)
            failure = DevdError(f"{kind}: {exc}", "check free disk space and permissions",
                                code="os_error")
        else:
            self.registry.set_resource(wt_id, kind, "ready", detail)
            ctx.env.update(provisioner.env(ctx, detail))
            progress(kind, "ready")
            return None
        # Keep what was recorded before: teardown still needs it to find what exists.
        self.registry.set_resource(wt_id, kind, "failed", ctx.recorded(kind) | {
            "error": failure.message, "hint": failure.hint})
        progress(kind, f"failed: {failure.message}")
        return failure

    def release(self, wt: Worktree, progress: Progress, *, yes: bool, backup: bool = True,
                force: bool = False, only_if_gone: bool = False) -> dict[str, Any]:
        """Tear down every resource, all or nothing (devd/teardown.py); returns what the
        teardowns report (e.g. dump paths). `only_if_gone`: gc's re-check under the lock."""
        with self._lock(wt.id):
            if only_if_gone:
                self._check_still_gone(wt)
            # Read under the lock: a provision in flight may still be adding resources.
            recorded = self.registry.resources(wt.id)
            data = [r.kind for r in recorded if self._holds_data(r.kind)]
            if data and not yes:
                raise UsageError(f"{wt.path} has data-bearing resources: {', '.join(data)}",
                                 "pass --yes to release them (devd keeps a dump where it can)")
            self.services.stop(wt.id)  # its servers hold its ports
            ctx = self.context(wt, strict=False)
            ctx.backup, ctx.force = backup, force
            order = sorted(reversed(recorded), key=lambda r: not self._holds_data(r.kind))
            try:
                teardown.check_all(self._by_kind, ctx, order)
                # Until the release ends either way: a daemon killed meanwhile leaves the
                # next one this to say (Registry.mark_interrupted).
                self.registry.set_state(wt.id, self._state_of(wt), RELEASING)
                teardown.back_up_all(self._by_kind, ctx, order, progress)
                teardown.run_all(self._by_kind, ctx, order, progress)
            except DevdError as exc:  # status says why the worktree is still here
                self.registry.set_state(wt.id, self._state_of(wt), exc.message)
                raise
            self.registry.forget(wt.id)
            self._succeeded.pop(wt.id, None)  # what a provision made is gone
            self.services.forget(wt.id)  # stopped above; now their logs go too
        self.on_change()
        return ctx.outputs

    def _state_of(self, wt: Worktree) -> str:
        found = self.registry.worktree(wt.id)
        return found.state if found else wt.state

    def _check_still_gone(self, wt: Worktree) -> None:
        """gc listed `wt` as gone before it got the lock: if it came back meanwhile, it is
        not gc's to take."""
        why = self._why_not_gone(wt)
        if why:
            raise DevdError(f"{wt.path} {why}; gc left it alone", "", code="not_gone")

    def _why_not_gone(self, wt: Worktree) -> str | None:
        now, listed = self.registry.worktree(wt.id), self._listed(wt.repo_common_dir)
        if now is None:
            return "was released meanwhile"
        if listed is None:
            return "cannot be listed by git now"
        if now.state != "gone" or os.path.isdir(wt.path) or wt.path in listed:
            return "is back (re-created or provisioned while gc ran)"
        return None

    def _check_path_free(self, path: Path, wt_id: str) -> None:
        """A path registered under another id: the old worktree (another repo, or a moved
        main repo) must be released first, or its leftovers would never be found again."""
        old = self.registry.worktree_at(path)
        if old is not None and old.id != wt_id:
            raise DevdError(
                f"{path} is still registered for a worktree of {old.repo_main_path} "
                f"({old.id}, {old.state})",
                f"run `devd release {path}` (or `devd gc --grace 0` once it is gone) first",
                code="path_conflict",
            )

    def _in_background(self, wt_id: str, options: dict[str, Any] | None = None) -> None:
        """At most one background provision waits per worktree (a flood of requests would
        queue a thread each); a later request only updates the options it will run with."""
        with self._locks_guard:
            waiting = wt_id in self._queued
            self._queued[wt_id] = (options or {}, self._passes.get(wt_id, 0))
        if waiting:
            return

        def run() -> None:
            with self._lock(wt_id), self._locks_guard:  # from here on, a request queues anew
                latest, asked = self._queued.pop(wt_id)
            try:
                self.provision(wt_id, _quiet, latest, asked)
            except DevdError as exc:
                log.warning("background provision of %s failed: %s", wt_id, exc.message)
        thread = threading.Thread(target=run, name=f"provision-{wt_id}", daemon=True)
        thread.start()
        self._background = [t for t in self._background if t.is_alive()] + [thread]

    def _finished(self, wt_id: str) -> int:
        with self._locks_guard:
            return self._passes.get(wt_id, 0)

    def join_background(self, timeout: float) -> None:
        for thread in self._background:
            thread.join(timeout)
