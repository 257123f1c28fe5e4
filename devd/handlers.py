"""One function per request; the only place that orchestrates provisioners."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devd import __version__, git, instance, leftovers, naming, owners, processes, teardown
from devd.errors import DevdError, NotRegistered, ProtocolError, ProvisionFailed, UsageError
from devd.paths import Paths
from devd.postgres import provisioner as postgres
from devd.protocol import peer_holds
from devd.provisioners import Context, Progress, Provisioner, deps, envguard
from devd.provisioners.deps import DepsProvisioner
from devd.provisioners.dirs import DirsProvisioner
from devd.provisioners.envfile import EnvFileProvisioner
from devd.provisioners.ports import PortsProvisioner
from devd.registry import Registry, Resource, Worktree
from devd.settings import (
    REPO_CONFIG,
    RepoConfig,
    Settings,
    load_repo_config,
    parse_duration,
)
from devd.watchers import api as watchers_api

log = logging.getLogger("devd")
ORPHAN_SCAN_MAX_AGE = 30.0  # seconds


def _quiet(phase: str, message: str, **extra: Any) -> None:
    log.debug("%s: %s", phase, message)


def default_provisioners() -> list[Provisioner]:
    """In provisioning order. The env file follows everything that exports variables; deps
    export none and can take minutes, so they come after it and the .env is ready at once.
    A first provision also writes it before Postgres (with placeholders that fail), so the
    copies are never without devd's block while a database is being made."""
    return [PortsProvisioner(), DirsProvisioner(), EnvFileProvisioner(early=True),
            postgres.PostgresProvisioner(), EnvFileProvisioner(), DepsProvisioner()]


class Service:
    """The daemon's state and its request handlers."""

    def __init__(self, settings: Settings, paths: Paths, registry: Registry,
                 provisioners: list[Provisioner] | None = None) -> None:
        self.settings = settings
        self.paths = paths
        self.registry = registry
        instance.bind(paths.state_dir)  # markers and labels name this devd instance
        self.provisioners = provisioners or default_provisioners()
        self._by_kind = {p.kind: p for p in self.provisioners}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._background: list[threading.Thread] = []
        self._queued: dict[str, dict[str, Any]] = {}  # background provisions not yet started
        self._configs: dict[tuple[Any, ...], RepoConfig] = {}
        self._orphans: tuple[float, list[dict[str, str]]] | None = None
        # The kernel's word on who sent the request being handled (one per thread).
        self.peer = threading.local()
        self.run_tokens = processes.RunTokens()  # see do_run_started
        # Set by the daemon: wakes the reconcile loop so a new repo gets its watch at once.
        self.on_register: Callable[[], None] = lambda: None
        # Set by the daemon: the watcher-budget monitor (devd/watchers/monitor.py).
        self.watchers: Any = None

    def handler(self, method: str) -> Callable[..., Any] | None:
        return getattr(self, f"do_{method}", None)

    def peer_pid(self) -> int | None:
        """The pid of the process that sent this thread's request (SO_PEERCRED), if known."""
        return getattr(self.peer, "pid", None)

    def peer_confirmed(self) -> bool:
        """Asked after reading what the peer pid names: is it still the process that
        connected (not one that got its pid after it exited, the connection handed on)?"""
        sock, pid = getattr(self.peer, "sock", None), self.peer_pid()
        return sock is None or pid is None or peer_holds(sock, pid)

    # -- requests ------------------------------------------------------------

    def do_ping(self, progress: Progress) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": __version__}

    def do_status(self, progress: Progress, path: str | None = None) -> dict[str, Any]:
        worktrees = self.notice_missing()
        chosen = [self.find(path)] if path else worktrees
        resources = self.registry.all_resources()
        return watchers_api.add_to_status(self, {
            "daemon": {"pid": os.getpid(), "version": __version__,
                       "socket": str(self.paths.socket)},
            "worktrees": leftovers.add_to_status(
                self, [self.describe(wt, resources.get(wt.id, [])) for wt in chosen], chosen),
            "orphans": self.orphans(max_age=ORPHAN_SCAN_MAX_AGE),
        })

    def do_provision(self, progress: Progress, path: str, background: bool = False,
                     fix_deps: bool = False, postgres_url: str | None = None
                     ) -> dict[str, Any]:
        info = git.resolve(Path(_absolute(path)))
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
        wt = self.find(path)
        with self._lock(wt.id):
            ctx = self.context(wt, strict=False)
            progress("postgres", "restoring")
            return postgres.restore(ctx, ctx.recorded("postgres"), dump)

    def orphans(self, max_age: float = 0.0) -> list[dict[str, str]]:
        """Objects carrying devd's marker that no registered worktree owns. Status accepts a
        scan up to `max_age` seconds old: it connects to servers, and one that is down costs
        its timeout, which a prompt calling `devd status` must not pay every time."""
        known = {wt.id for wt in self.registry.worktrees()}
        now = time.monotonic()
        if self._orphans is None or now - self._orphans[0] > max_age:
            self._orphans = (now, postgres.orphans(self.paths, known))
        return [found for found in self._orphans[1] if found["worktree_id"] not in known]

    def do_gc(self, progress: Progress, grace: str | None = None, dry_run: bool = False,
              no_backup: bool = False) -> dict[str, Any]:
        try:
            seconds = parse_duration(grace or self.settings.gc_grace)
        except ValueError as exc:
            raise UsageError(str(exc), "e.g. --grace 24h, --grace 30m, --grace 0") from exc
        self.reconcile()
        self.notice_missing()
        cutoff = time.time() - seconds
        due = [wt for wt in self.registry.worktrees()
               if wt.state == "gone" and (wt.gone_at or 0) <= cutoff]
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
        return {"dry_run": dry_run, "grace_seconds": seconds, "worktrees": results,
                "orphans": self.orphans()}

    def do_env(self, progress: Progress, path: str) -> dict[str, Any]:
        wt = self.find(path)
        if wt.state == "gone":
            raise NotRegistered(f"worktree {wt.path} is gone",
                                "recreate it and run `devd provision`")
        ports = next((r for r in self.registry.resources(wt.id) if r.kind == "ports"), None)
        if ports is None or ports.state != "ready":
            # Without PORT a dev server falls back to 3000: the collision devd exists to stop.
            why = f"ports are {ports.state}: {ports.detail.get('error', '')}" if ports \
                else "it has no ports yet"
            raise DevdError(f"worktree {wt.path} is not ready ({why.rstrip(': ')})",
                            "wait for it (`devd wait`), or fix the cause and run "
                            f"`devd provision {wt.path}`", code="not_ready")
        env, warnings = self.environment(wt)
        return {"worktree": str(wt.path), "env": env, "warnings": warnings}

    def do_ports(self, progress: Progress) -> list[dict[str, Any]]:
        by_id = {wt.id: wt for wt in self.registry.worktrees()}
        held = processes.listeners()
        rows = []
        for port, name, wt_id in self.registry.leases():
            holder = held.get(port)
            owner = processes.owner_of(holder, list(by_id.values()), self.registry) \
                if holder else None
            rows.append({
                "port": port, "name": name, "worktree": str(by_id[wt_id].path),
                "worktree_id": wt_id, "listening": holder is not None,
                "pid": holder.pid if holder else None,
                "command": holder.command if holder else None,
                "cwd": holder.cwd if holder else None,
                "owner_worktree": str(owner.path) if owner else None,
                "owner_state": owner.state if owner else None,
            })
        return rows

    def do_kill_port(self, progress: Progress, port: int, path: str) -> dict[str, Any]:
        asked = self.find(path)
        holder = processes.listeners().get(int(port))
        if holder is None:
            raise DevdError(f"nothing listens on port {port}", "", code="not_listening")
        owner = processes.owner_of(holder, self.registry.worktrees(), self.registry)
        processes.check_killable(int(port), holder, owner, asked)
        progress("kill", f"stopping pid {holder.pid} `{holder.command}`")
        outcome = processes.stop_holder(int(port), holder, asked, self.registry,
                                        self.settings.kill_timeout)
        return {"port": port, "pid": holder.pid, "command": holder.command, "outcome": outcome}

    def do_run_started(self, progress: Progress, path: str, pid: int | None = None,
                       argv: list[str] | None = None, cwd: str | None = None
                       ) -> dict[str, Any]:
        """Record the requesting process itself (the kernel's peer pid) as a `devd run`;
        a `pid` the client sends is ignored: its word makes no process devd-started."""
        wt = self.find(path)
        peer = self.peer_pid()
        if not peer or peer < 0:  # no SO_PEERCRED here, or a pid outside our namespace
            return {"worktree": str(wt.path), "pid": None}
        processes.prune_runs(self.registry)  # else every `devd run` ever stays till gc
        recorded, started = processes.record_run(self.registry, peer, wt.id,
                                                 self.peer_confirmed)
        watchers_api.run_started(self, wt, recorded, argv, cwd)
        return {"worktree": str(wt.path), "pid": recorded,
                "token": self.run_tokens.issue(recorded, started, wt.id)}

    def do_run_event(self, progress: Progress, path: str, signature: str, budget: str,
                     line: str, pid: int | None = None, argv: list[str] | None = None,
                     cwd: str | None = None, token: str | None = None) -> dict[str, Any]:
        """A break line, accepted only from a recorded run of that worktree or one of its
        descendants (the kernel's peer pid and ancestry, or the run's token once the run
        itself has exited); `pid` is ignored."""
        return watchers_api.run_event(self, self.find(path), signature, budget, line,
                                      argv or [], cwd, token)

    def do_watchers(self, progress: Progress) -> dict[str, Any]:
        return watchers_api.report(self)

    def do_watchers_preflight(self, progress: Progress, path: str,
                              max_watches: int | None = None, userns: str | None = None
                              ) -> dict[str, Any]:
        return watchers_api.preflight(self, path, max_watches, userns)

    def do_doctor(self, progress: Progress) -> dict[str, Any]:
        return watchers_api.doctor(self)

    def do_watchers_restart(self, progress: Progress, path: str | None = None,
                            max_watches: int | None = None, userns: str | None = None,
                            force: bool = False) -> dict[str, Any]:
        return watchers_api.restart(self, path, max_watches, userns, force)

    # -- orchestration ---------------------------------------------------------

    def provision(self, wt_id: str, progress: Progress,
                  options: dict[str, Any] | None = None) -> None:
        """Ensure every resource of a worktree, one provision per worktree at a time."""
        with self._lock(wt_id):
            wt = self.registry.worktree(wt_id)
            if wt is None:
                raise NotRegistered(f"worktree {wt_id} was released while this provision "
                                    "waited", "provision it again if you still want it")
            self.registry.set_state(wt_id, "provisioning")
            try:
                ctx = self.context(wt)
            except DevdError as exc:
                self.registry.set_state(wt_id, "failed", exc.message)
                raise
            ctx.options.update(options or {})
            failures = [f for p in self.provisioners
                        if p.applies(ctx) and (f := self._ensure(p, ctx, progress))]
            self.registry.set_state(wt_id, "failed" if failures else "ready",
                                    "; ".join(f.message for f in failures) or None)
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
            ctx = self.context(wt, strict=False)
            ctx.backup, ctx.force = backup, force
            order = sorted(reversed(recorded), key=lambda r: not self._holds_data(r.kind))
            teardown.check_all(self._by_kind, ctx, order)
            teardown.run_all(self._by_kind, ctx, order, progress)
            self.registry.forget(wt.id)
        return ctx.outputs

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

    def _holds_data(self, kind: str) -> bool:
        provisioner = self._by_kind.get(kind)
        return bool(provisioner and provisioner.holds_data)

    def context(self, wt: Worktree, strict: bool = True) -> Context:
        ctx = Context(wt, self._config(wt, strict), self.settings, self.paths, self.registry)
        ctx.env.update({"DEVD_WORKTREE": str(wt.path), "DEVD_WORKTREE_ID": wt.id})
        return ctx

    def _config(self, wt: Worktree, strict: bool) -> RepoConfig:
        """The worktree's own devd.toml (it may differ per branch), else the main one's."""
        root = wt.path if wt.path.is_dir() else wt.repo_main_path
        try:
            return self._cached_config(root)
        except DevdError:
            if strict:
                raise
            return RepoConfig()

    def _cached_config(self, root: Path) -> RepoConfig:
        """Parsed once per file version: status reads every worktree's config."""
        try:
            stat = (root / REPO_CONFIG).stat()
            key: tuple[Any, ...] = (root, stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            key = (root, None)
        config = self._configs.get(key)
        if config is None:
            config = load_repo_config(root)
            self._configs = {k: v for k, v in self._configs.items() if k[0] != root}
            self._configs[key] = config
        return config

    def environment(self, wt: Worktree) -> tuple[dict[str, str], list[str]]:
        """The worktree's variables, and warnings for a person (on stderr in the CLI)."""
        ctx = self.context(wt, strict=False)
        for resource in self.registry.resources(wt.id):
            provisioner = self._by_kind.get(resource.kind)
            if provisioner and resource.state == "ready":
                ctx.env.update(provisioner.env(ctx, resource.detail))
        # No ready database: placeholders that fail, never the caller's or main's PG*.
        placeholders, warning = envguard.postgres_guard(ctx, ctx.env)
        return ctx.env | placeholders, [warning] if warning else []

    # -- discovery -------------------------------------------------------------

    def notice_missing(self) -> list[Worktree]:
        """A stat per worktree: a deleted directory means gone, whoever deleted it.
        Returns the worktrees as they are now."""
        worktrees = self.registry.worktrees()
        missing = [wt for wt in worktrees if wt.state != "gone" and not os.path.isdir(wt.path)]
        for wt in missing:
            log.info("worktree %s is gone (directory missing)", wt.path)
            self.registry.set_state(wt.id, "gone")
        return self.registry.worktrees() if missing else worktrees

    def reconcile(self) -> None:
        """Compare each known repo with `git worktree list`; what git no longer lists is gone."""
        by_repo: dict[Path, list[Worktree]] = {}
        for wt in self.registry.worktrees():
            if wt.state != "gone":
                by_repo.setdefault(wt.repo_common_dir, []).append(wt)
        for common_dir, worktrees in by_repo.items():
            listed = self._listed(common_dir)
            for wt in worktrees:
                if listed is not None and wt.path not in listed and not self._busy(wt.id):
                    log.info("worktree %s is gone (git no longer lists it)", wt.path)
                    self.registry.set_state(wt.id, "gone")

    def _listed(self, common_dir: Path) -> set[Path] | None:
        if not common_dir.is_dir():
            return set()
        try:
            return {w.path.resolve() for w in git.list_worktrees(common_dir) if not w.prunable}
        except (DevdError, OSError) as exc:
            log.warning("cannot list worktrees of %s: %s", common_dir, exc)
            return None

    # -- helpers -----------------------------------------------------------------

    def find(self, path: str | None) -> Worktree:
        """The registered worktree containing `path` (deepest wins: worktrees can nest)."""
        target = Path(_absolute(path))
        candidates = self.registry.worktrees()
        for probe in (target, target.resolve()):
            match = owners.deepest_containing(str(probe), candidates)
            if match and not owners.nested_checkout_between(match.path, probe):
                if self.watchers is not None:
                    self.watchers.touch(match.id)  # in use: see devd/watchers/idle.py
                return match
        info = git.resolve(target)
        raise NotRegistered(f"worktree {info.path} is not registered with devd",
                            f"run `devd provision {info.path}` first")

    def describe(self, wt: Worktree, resources: list[Resource]) -> dict[str, Any]:
        ctx: Context | None = None
        details = {r.kind: r.detail for r in resources}
        shown, checked = [], {}
        for resource in resources:
            state, note = resource.state, resource.detail.get("error", "")
            provisioner = self._by_kind.get(resource.kind)
            if provisioner and state == "ready" and wt.state != "gone":
                ctx = ctx or self.context(wt, strict=False)
                health = checked[resource.kind] = provisioner.check(ctx, resource.detail)
                note = health.message
                state = state if health.ok else "failed"
            shown.append({"kind": resource.kind, "state": state, "detail": note})
        dirs, envfile = details.get("dirs", {}), details.get("envfile", {})
        return {
            "id": wt.id, "path": str(wt.path), "repo": str(wt.repo_main_path),
            "branch": wt.branch, "state": wt.state, "error": wt.error, "gone_at": wt.gone_at,
            "ports": details.get("ports", {}).get("ports", {}),
            "cache_dir": dirs.get("cache_dir"), "browser_profile": dirs.get("browser_profile"),
            "env_file": envfile.get("file"), "resources": shown,
            "deps": deps.status(self.paths.state_dir, wt.id, wt.path),
        } | postgres.status_entry(details, checked)

    def _describe_id(self, wt_id: str) -> dict[str, Any]:
        wt = self.registry.worktree(wt_id)
        assert wt is not None
        return self.describe(wt, self.registry.resources(wt_id))

    @contextmanager
    def _lock(self, wt_id: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(wt_id, threading.Lock())
        with lock:
            yield

    def _busy(self, wt_id: str) -> bool:
        lock = self._locks.get(wt_id)
        return bool(lock and lock.locked())

    def _in_background(self, wt_id: str, options: dict[str, Any] | None = None) -> None:
        """At most one background provision waits per worktree (a flood of requests would
        queue a thread each); a later request only updates the options it will run with."""
        with self._locks_guard:
            waiting = wt_id in self._queued
            self._queued[wt_id] = options or {}
        if waiting:
            return

        def run() -> None:
            with self._lock(wt_id), self._locks_guard:  # from here on, a request queues anew
                latest = self._queued.pop(wt_id)
            try:
                self.provision(wt_id, _quiet, latest)
            except DevdError as exc:
                log.warning("background provision of %s failed: %s", wt_id, exc.message)
        thread = threading.Thread(target=run, name=f"provision-{wt_id}", daemon=True)
        thread.start()
        self._background = [t for t in self._background if t.is_alive()] + [thread]

    def join_background(self, timeout: float) -> None:
        for thread in self._background:
            thread.join(timeout)


def _text(value: Any, name: str) -> str:
    """A string parameter from the wire; anything else is the client's mistake, not a bug."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ProtocolError(f"parameter {name!r} must be a non-empty string",
                            "see docs/protocol.md")
    return value


def _absolute(value: Any) -> str:
    """A path parameter: absolute (the daemon's directory is nobody's business), no '..'."""
    path = _text(value, "path")
    # '..' too: worktree matching is by components, so A/../B would count as inside A.
    if not os.path.isabs(path) or ".." in Path(path).parts:
        raise UsageError(f"parameter 'path' must be an absolute path without '..', not "
                         f"{path[:200]!r}", "the CLI sends such paths; see docs/protocol.md")
    return path
