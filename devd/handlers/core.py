"""The state every request family shares: settings, registry, provisioners, locks, and how a
path becomes a registered worktree, its context and its description."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devd import git, instance, owners, processes
from devd.containers import compose
from devd.containers.compose import ComposeProvisioner
from devd.containers.declared import ContainersProvisioner
from devd.errors import DevdError, NotRegistered, ProtocolError, UsageError
from devd.handlers.snapshot import StatusSnapshot
from devd.paths import Paths
from devd.postgres import provisioner as postgres
from devd.protocol import peer_holds
from devd.provisioners import Context, Health, Progress, Provisioner, deps, envguard
from devd.provisioners.deps import DepsProvisioner
from devd.provisioners.dirs import DirsProvisioner
from devd.provisioners.envfile import EnvFileProvisioner
from devd.provisioners.ports import PortsProvisioner
from devd.proxy.provisioner import UrlsProvisioner
from devd.registry import Registry, Resource, Worktree
from devd.services.supervisor import Supervisor
from devd.settings import (
    REPO_CONFIG,
    RepoConfig,
    Settings,
    load_repo_config,
)

log = logging.getLogger("devd")


def default_provisioners() -> list[Provisioner]:
    """In provisioning order. The env file follows everything that exports variables; deps
    export none and can take minutes, so they come after it and the .env is ready at once.
    A first provision also writes it before Postgres (with placeholders that fail), so the
    copies are never without devd's block while a database is being made."""
    return [PortsProvisioner(), UrlsProvisioner(), DirsProvisioner(),
            EnvFileProvisioner(early=True), postgres.PostgresProvisioner(),
            ContainersProvisioner(), ComposeProvisioner(), EnvFileProvisioner(),
            DepsProvisioner()]


class ServiceCore:
    """The daemon's state; the request families in this package add the handlers."""

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
        # background provisions not yet started: their options, and when they were asked
        self._queued: dict[str, tuple[dict[str, Any], int]] = {}
        # per worktree: provisions finished so far, and the inputs of the last that succeeded
        self._passes: dict[str, int] = {}
        self._succeeded: dict[str, str] = {}
        self._configs: dict[tuple[Any, ...], RepoConfig] = {}
        self._orphans: tuple[float, list[dict[str, str]]] | None = None
        self._seen: dict[Path, set[Path]] = {}  # per repo, the worktrees git listed last
        self._started = time.time()
        self.manager: str | None = None  # "systemd" or "launchd" when one runs the daemon
        # The kernel's word on who sent the request being handled (one per thread).
        self.peer = threading.local()
        self.run_tokens = processes.RunTokens()  # see do_run_started
        # Set by the daemon: wakes the reconcile loop so a new repo gets its watch at once.
        self.on_register: Callable[[], None] = lambda: None
        # Set by the daemon: the watcher-budget monitor (devd/watchers/monitor.py).
        self.watchers: Any = None
        # What `status` answers from; the daemon starts its cadence (snapshot.py).
        self.snapshot = StatusSnapshot(self, settings.status_interval)  # type: ignore[arg-type]
        # Declared dev servers; the daemon starts its watch thread (devd/services/).
        self.services = Supervisor(paths.state_dir, settings.kill_timeout)
        # Called with each worktree that goes `gone` (its services stop, its routes go).
        self.gone_listeners: list[Callable[[Worktree], None]] = [
            self._stop_services_of, lambda wt: self.on_change()]
        # Set by the daemon: the Caddy child (devd/proxy/child.py); on_change nudges it.
        self.proxy: Any = None
        self.on_change: Callable[[], None] = lambda: None

    def _stop_services_of(self, wt: Worktree) -> None:
        """Overridden by the services family (devd/handlers/services.py)."""

    def compose_action(self, wt: Worktree, action: str, progress: Progress) -> str | None:
        """`up` or `down` of the worktree's Compose project; its name, or None without one
        provisioned (`devd compose`, and `devd up`/`down` of a whole worktree)."""
        with self._lock(wt.id):
            ctx = self.context(wt)
            if not ctx.recorded("compose").get("file"):
                return None
            (compose.up if action == "up" else compose.down)(ctx, progress)
            return str(ctx.recorded("compose")["project"])

    def mark_gone(self, wt: Worktree, why: str) -> None:
        log.info("worktree %s is gone (%s)", wt.path, why)
        self.registry.set_state(wt.id, "gone")
        for listener in self.gone_listeners:
            listener(wt)

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

    def ready_environment(self, wt: Worktree) -> tuple[dict[str, str], list[str]]:
        """`environment`, refused while the worktree is gone or its ports are not ready."""
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
        return self.environment(wt)

    def notice_missing(self) -> None:
        """A stat per worktree: a deleted directory means gone, whoever deleted it."""
        for wt_id, path in self.registry.live_paths():
            if not os.path.isdir(path) and (wt := self.registry.worktree(wt_id)) is not None:
                self.mark_gone(wt, "directory missing")

    def reconcile(self) -> None:
        """Compare each known repo with `git worktree list`: what git no longer lists is
        gone; what it lists for the first time is new (see _discover)."""
        by_repo: dict[Path, list[Worktree]] = {}
        for wt in self.registry.worktrees():
            if wt.state != "gone":
                by_repo.setdefault(wt.repo_common_dir, []).append(wt)
        for common_dir, worktrees in by_repo.items():
            entries = self._listed(common_dir)
            listed = None if entries is None else {w.path.resolve() for w in entries
                                                   if not w.prunable}
            for wt in worktrees:
                if listed is not None and wt.path not in listed and not self._busy(wt.id):
                    self.mark_gone(wt, "git no longer lists it")
            if entries is not None:
                self._discover(common_dir, worktrees[0].repo_main_path, entries)

    def _listed(self, common_dir: Path) -> list[git.ListedWorktree] | None:
        if not common_dir.is_dir():
            return []
        try:
            return git.list_worktrees(common_dir)
        except (DevdError, OSError) as exc:
            log.warning("cannot list worktrees of %s: %s", common_dir, exc)
            return None

    def _discover(self, common_dir: Path, main: Path, entries: list[git.ListedWorktree]) -> None:
        """Provision worktrees git lists that were not there at the last look, when the
        repo opts in ([hooks] provision_on_discover): no post-checkout fires for
        `git worktree add --no-checkout`. When a repo is first looked at, only those git
        made since this daemon started are new (not one released before a restart); one git
        still holds locked (mid-checkout) is looked at again next time."""
        fresh = {w.path.resolve() for w in entries
                 if not (w.bare or w.prunable or w.locked) and w.path.is_dir()}
        seen, self._seen[common_dir] = self._seen.get(common_dir), fresh
        new = [path for path in fresh - (seen or set())
               if (seen is not None or _made_after(path, self._started))
               and not self.registry.worktree_at(path)]
        provision = self.handler("provision")
        if not new or provision is None or not self._opted_in(main):
            return
        for path in sorted(new):
            log.info("worktree %s is new (found by reconcile); provisioning it", path)
            try:
                provision(lambda *_, **__: None, str(path), background=True)
            except DevdError as exc:
                log.warning("cannot provision discovered worktree %s: %s", path, exc.message)

    def _opted_in(self, main: Path) -> bool:
        try:
            return self._cached_config(main).hooks.provision_on_discover
        except DevdError as exc:
            log.warning("cannot read %s's devd.toml: %s", main, exc.message)
            return False

    def find(self, path: str | None) -> Worktree:
        """The registered worktree containing `path` (deepest wins: worktrees can nest)."""
        target = Path(absolute(path))
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

    def describe(self, wt: Worktree, resources: list[Resource], check: bool = True,
                 disk: bool = True) -> dict[str, Any]:
        """A worktree as status shows it; `check=False` runs no resource check (the
        recorded states, as the registry knows them: `"checked": false`); `disk=False` leaves
        out a clone's disk use (it reads every file's extents: ~0.3 s at 5 GB, which a
        provision's reply need not pay)."""
        ctx: Context | None = None
        details = {r.kind: r.detail for r in resources}
        shown, checked = [], {}
        for resource in resources:
            state, note = resource.state, resource.detail.get("error", "")
            provisioner = self._by_kind.get(resource.kind)
            if check and provisioner and state == "ready" and wt.state != "gone":
                ctx = ctx or self.context(wt, strict=False)
                health = checked[resource.kind] = _checked(provisioner, ctx, resource.detail)
                note = health.message
                state = state if health.ok else "failed"
            shown.append({"kind": resource.kind, "state": state, "detail": note})
        dirs, envfile = details.get("dirs", {}), details.get("envfile", {})
        return {
            "id": wt.id, "path": str(wt.path), "repo": str(wt.repo_main_path),
            "branch": wt.branch if wt.state == "gone" else git.branch_now(wt.path, wt.branch),
            "state": wt.state, "error": wt.error, "gone_at": wt.gone_at,
            "ports": details.get("ports", {}).get("ports", {}),
            "cache_dir": dirs.get("cache_dir"), "browser_profile": dirs.get("browser_profile"),
            "env_file": envfile.get("file"), "resources": shown,
            "deps": deps.status(self.paths.state_dir, wt.id, wt.path),
            "containers": container_rows(checked), "checked": check,
        } | postgres.status_entry(self.paths, details, checked, disk)

    def _describe_id(self, wt_id: str) -> dict[str, Any]:
        wt = self.registry.worktree(wt_id)
        assert wt is not None
        return self.describe(wt, self.registry.resources(wt_id), disk=False)

    @contextmanager
    def _lock(self, wt_id: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(wt_id, threading.Lock())
        with lock:
            yield

    def _busy(self, wt_id: str) -> bool:
        lock = self._locks.get(wt_id)
        return bool(lock and lock.locked())

def _checked(provisioner: Provisioner, ctx: Context, detail: dict[str, Any]) -> Health:
    """The resource's check; one that throws (a bug) fails that resource, saying so, rather
    than every `devd status`."""
    try:
        return provisioner.check(ctx, detail)
    except Exception as exc:  # the log has the traceback
        log.exception("the %s check of %s failed", provisioner.kind, ctx.worktree.path)
        return Health(False, f"its check failed: {type(exc).__name__}: {exc}")


def _made_after(path: Path, since: float) -> bool:
    """Whether git made the linked worktree at `path` after `since`: its admin dir's
    `commondir` is written once, by `git worktree add`."""
    admin = git.admin_dir(path)
    try:
        return admin is not None and (admin / "commondir").stat().st_mtime > since
    except OSError:
        return False


def _text(value: Any, name: str) -> str:
    """A string parameter from the wire; anything else is the client's mistake, not a bug."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ProtocolError(f"parameter {name!r} must be a non-empty string",
                            "see docs/protocol.md")
    return value


def absolute(value: Any) -> str:
    """A path parameter: absolute (the daemon's directory is nobody's business), no '..'."""
    path = _text(value, "path")
    # '..' too: worktree matching is by components, so A/../B would count as inside A.
    if not os.path.isabs(path) or ".." in Path(path).parts:
        raise UsageError(f"parameter 'path' must be an absolute path without '..', not "
                         f"{path[:200]!r}", "the CLI sends such paths; see docs/protocol.md")
    return path


def container_rows(checked: dict[str, Any]) -> list[dict[str, Any]]:
    """Each declared container and Compose service with its health, for `devd status`."""
    return [row | {"kind": kind} for kind in ("containers", "compose") if kind in checked
            for row in checked[kind].detail.get("services", [])]
