"""Requests about declared services: up, down, logs, and their part of `status`."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devd import processes
from devd.errors import ConfigError, DevdError, NotRegistered, UsageError
from devd.handlers.core import ServiceCore
from devd.owners import inside
from devd.provisioners import Progress
from devd.registry import Worktree
from devd.services import config as service_config
from devd.services import logs, portflags
from devd.services.supervisor import Spec, Unit

if TYPE_CHECKING:
    from devd.services.config import ServiceConfig

DOWN = ("failed", "crashed", "stopped", "idle")


class ServiceRequests(ServiceCore):
    """`devd up/down/restart/logs`: the worktree's declared dev servers, under the daemon."""

    def do_up(self, progress: Progress, path: str, services: list[str] | None = None,
              restart: bool = False, caller_path: str | None = None) -> dict[str, Any]:
        wt = self.find(path)
        # The whole worktree's `up` brings its Compose project first: what the dev
        # servers talk to (a database, Redis) must be there when they start.
        project = None if services else self.compose_action(wt, "up", progress)
        if project and not self._has_services(wt):
            return {"worktree": str(wt.path), "services": [], "compose": project}
        declared = self._declared(wt, services)
        env = self._env_of(wt, caller_path)
        specs = [self._spec(wt, name, cfg, env) for name, cfg in declared.items()]
        if restart:
            self.services.stop(wt.id, list(declared))
        for spec in specs:  # all checked before any starts: a refusal starts nothing
            self._check_port_free(wt, spec)
        units = [self._start(wt, spec, progress) for spec in specs]
        self._wait_all(units, progress)
        failed = [u for u in units if u.state != "running"]
        if failed:
            raise DevdError("; ".join(failure(u) for u in failed),
                            "see `devd logs " + failed[0].spec.name + "`; fix it and run "
                            "`devd up` again", code="service_failed")
        return {"worktree": str(wt.path), "services": entries_of(self, wt, list(declared))} \
            | ({"compose": project} if project else {})

    def do_down(self, progress: Progress, path: str, services: list[str] | None = None
                ) -> dict[str, Any]:
        wt = self.find(path)
        names = list(self._declared(wt, services)) if services else None
        if names is None and not self._has_services(wt):
            if project := self.compose_action(wt, "down", progress):
                return {"worktree": str(wt.path), "services": [], "compose": project}
            self._declared(wt, None)  # says that nothing is declared
        stopped = self.services.stop(wt.id, names)
        for unit, outcome in stopped:
            progress("down", f"{unit.spec.name}: {outcome}")
        # Then the Compose project (the whole worktree's `down` only; its volumes stay).
        project = None if services else self.compose_action(wt, "down", progress)
        return {"worktree": str(wt.path), "services": [
            {"name": u.spec.name, "outcome": outcome, "state": u.state} for u, outcome in stopped]
        } | ({"compose": project} if project else {})

    def do_logs(self, progress: Progress, path: str, service: str) -> dict[str, Any]:
        wt = self.find(path)
        self._declared(wt, [service], strict=False)
        log = logs.log_path(self.paths.state_dir, wt.id, service)
        rotated = sorted(str(p) for p in log.parent.glob(f"{service}.log.*"))
        return {"service": service, "log": str(log), "rotated": rotated}

    def start(self, wt: Worktree, name: str, progress: Progress = lambda *_, **__: None
              ) -> Unit:
        """Start one declared service unless it runs, without waiting: the hook a proxy
        calls to wake a stopped (idle) service on a request; `services.wait` then waits."""
        cfg = self._declared(wt, [name])[name]
        spec = self._spec(wt, name, cfg, self._env_of(wt))
        self._check_port_free(wt, spec)
        return self._start(wt, spec, progress)

    def wake(self, wt_id: str, port_name: str) -> dict[str, Any] | None:
        """A request reached a name whose port nothing of the worktree's listens on (the
        proxy's page route): start the service if idle_stop stopped it (never one `devd
        down` stopped), and say how it is doing, or what is not running and how to start
        it. None: no such worktree (the route is stale)."""
        wt = self.registry.worktree(wt_id)
        if wt is None:
            return None
        self.services.mark_used(wt_id)
        label = f"{wt.repo_name}/{wt.branch or wt.path.name}"
        what = f"{port_name} of {label}"
        unit = next((u for u in self.services.units(wt_id) if u.spec.port_name == port_name),
                    None)
        if unit is None:
            return self._not_served(wt, port_name, label)
        if unit.state == "idle":
            try:
                unit = self.start(wt, unit.spec.name)
            except DevdError as exc:
                return {"name": unit.spec.name, "what": what, "state": "failed",
                        "error": exc.message, "hint": f"devd up {unit.spec.name}"}
        down = unit.state in DOWN  # e.g. `devd down` stopped it meanwhile: not woken
        return {"name": unit.spec.name, "what": what, "state": unit.state,
                "error": (unit.error or f"it is {unit.state}") if down else None,
                "hint": f"devd up {unit.spec.name}"}

    def _not_served(self, wt: Worktree, port_name: str, label: str) -> dict[str, Any]:
        """No unit serves the port: the declared service that would, else `devd run`."""
        declared = self._config(wt, strict=False).services
        name = next((n for n, cfg in declared.items() if cfg.port == port_name), None)
        port = {n: p for p, n, _ in self.registry.leases(wt.id)}.get(port_name)
        error = f"nothing of {label} listens on its port {port}"
        if port in processes.all_listening_ports():
            error += " (another process holds it: devd never sends the worktree's " \
                "requests there)"
        hint = f"devd up {name}" if name else \
            f"devd run -- <your dev server on $PORT_{port_name.upper()}>"
        return {"name": name or port_name, "what": f"{port_name} of {label}", "state": "stopped",
                "error": error, "hint": hint}

    def _start(self, wt: Worktree, spec: Spec, progress: Progress) -> Unit:
        unit = self.services.unit(wt.id, spec.name)
        if unit is not None and unit.state not in DOWN and \
                (unit.spec.command, unit.spec.cwd) != (spec.command, spec.cwd):
            progress("up", f"{spec.name}: devd.toml changed since it started; "
                     f"`devd restart {spec.name}` applies it", level="warning")
        unit = self.services.start(spec)
        progress("up", f"{spec.name}: {unit.state} `{unit.spec.command}`"
                 + (f" ({spec.tool}: port flags added)" if spec.tool else ""))
        return unit

    # -- resolving a service --------------------------------------------------------

    def _has_services(self, wt: Worktree) -> bool:
        return bool(self.context(wt).config.services)

    def _declared(self, wt: Worktree, names: list[str] | None, strict: bool = True
                  ) -> dict[str, ServiceConfig]:
        if wt.state == "gone":
            raise NotRegistered(f"worktree {wt.path} is gone", "its services were stopped")
        declared = self.context(wt, strict=strict).config.services
        if not declared:
            raise UsageError(f"{wt.path}/devd.toml declares no services",
                             "add a [services.NAME] table (see the README)")
        unknown = [n for n in names or [] if n not in declared]
        if unknown:
            raise UsageError(f"no service {', '.join(map(repr, unknown))} in devd.toml",
                             f"declared: {', '.join(declared)}")
        return {n: declared[n] for n in (names or declared)}

    def _env_of(self, wt: Worktree, caller_path: str | None = None) -> dict[str, str]:
        """The daemon's environment under the worktree's (ports must be ready: without
        them a dev server falls back to its default port), with the caller's PATH (its
        node and python, not the daemon's); a later wake keeps the PATH of the last up."""
        env, _ = self.ready_environment(wt)
        last = self.services.units(wt.id)
        path = caller_path or (last[0].spec.env.get("PATH") if last else None)
        return dict(os.environ) | env | {"BROWSER": "none"} | ({"PATH": path} if path else {})

    def _spec(self, wt: Worktree, name: str, cfg: ServiceConfig, env: dict[str, str]
              ) -> Spec:
        ports = {n: p for p, n, _ in self.registry.leases(wt.id)}
        port = ports.get(cfg.port) if cfg.port else None
        if cfg.port and port is None:
            raise DevdError(f"{name}: port {cfg.port!r} has no lease yet (devd.toml changed "
                            "since the last provision)", f"run `devd provision {wt.path}`",
                            code="not_ready")
        cwd = service_dir(wt, name, cfg.dir)
        own = {k: service_config.expand(v, ports, env) for k, v in cfg.env.items()}
        injected = portflags.inject(cfg.command, port, cwd, cfg.port_arg) if port \
            else portflags.Injection(cfg.command, None, "")
        return Spec(
            wt.id, name, injected.command, cwd,
            env | ({"PORT": str(port)} if port else {}) | own | {"DEVD_SERVICE": name},
            logs.log_path(self.paths.state_dir, wt.id, name), port, cfg.port,
            service_config.url_of(cfg.port, ports, env), cfg.ready, cfg.timeout_seconds,
            cfg.idle_seconds, injected.tool if injected.added else None)

    def _check_port_free(self, wt: Worktree, spec: Spec) -> None:
        """A port something else holds: say whose (as kill-port does), start nothing. (A
        service of devd's own that is up holds it rightly.)"""
        unit = self.services.unit(wt.id, spec.name)
        if unit is not None and unit.state not in DOWN:
            return
        if spec.port is None or spec.port not in processes.all_listening_ports():
            return  # the common case, from /proc/net/tcp alone: no fd of anyone read
        pid = processes.listener_pids().get(spec.port)
        holder = processes.describe(pid)
        owner = processes.owner_of(holder, self.registry.worktrees(), self.registry)
        where = f"worktree {owner.path}" if owner else "no worktree devd knows"
        raise DevdError(f"{spec.name}: port {spec.port} ({spec.port_name}) is taken by pid "
                        f"{pid} `{holder.command}` of {where}",
                        processes.refusal_hint(spec.port, holder, owner), code="port_taken")

    def _wait_all(self, units: list[Unit], progress: Progress) -> None:
        def tick(unit: Unit) -> None:
            waited = time.monotonic() - unit.started
            what = f"port {unit.spec.port}" if unit.spec.ready == "port" else \
                f"http://127.0.0.1:{unit.spec.port}{unit.spec.ready}"
            progress("up", f"{unit.spec.name}: waiting for {what} "
                     f"({waited:.0f} s of {unit.spec.timeout:g})", elapsed=round(waited, 1))
        for unit in units:
            self.services.wait(unit, time.monotonic() + unit.spec.timeout + 15, tick)
            if unit.state == "running":
                progress("up", f"{unit.spec.name}: ready" + (f" at {unit.spec.url}"
                                                                 if unit.spec.url else ""))
        if self.proxy is not None and any(u.state == "running" for u in units):
            self.proxy.settle()  # its URL reaches it (not devd's page) once `up` returns

    def _stop_services_of(self, wt: Worktree) -> None:
        """A worktree went: its services go too (in the background: reconcile goes on)."""
        if self.services.units(wt.id):
            threading.Thread(target=self.services.stop, args=(wt.id,), daemon=True,
                             name="devd-services-gone").start()


def entries_of(core: ServiceCore, wt: Worktree, names: list[str] | None = None,
               listening: set[int] | None = None) -> list[dict[str, Any]]:
    """One entry per declared service (and any unit still known), in config order."""
    declared = core._config(wt, strict=False).services
    known = {u.spec.name: u for u in core.services.units(wt.id)}
    chosen = names or list(dict.fromkeys([*declared, *known]))
    listening = processes.all_listening_ports() if listening is None else listening
    ports = {n: p for p, n, _ in core.registry.leases(wt.id)}
    env = core.environment(wt)[0] if wt.state != "gone" else {}
    return [entry(name, known.get(name), declared.get(name), ports, listening, env)
            for name in chosen]


def service_dir(wt: Worktree, name: str, rel: str) -> Path:
    """The service's `dir`, which must lie inside the worktree once symlinks are resolved."""
    root = wt.path.resolve()
    real = (root / rel).resolve()
    if not (real == root or root in real.parents):
        raise ConfigError(f"services.{name}.dir {rel!r} leads outside the worktree "
                          f"(to {real})", "a service runs inside its worktree; point dir at "
                          "a directory in it, not a symlink out")
    if not real.is_dir():
        raise ConfigError(f"services.{name}.dir {rel!r}: no such directory in {wt.path}",
                          "create it, or fix dir in devd.toml")
    if not inside(real, root):
        raise ConfigError(f"services.{name}.dir {rel!r} is inside a checkout nested in the "
                          "worktree", "point dir at the worktree's own files")
    return real


def entry(name: str, unit: Unit | None, cfg: ServiceConfig | None, ports: dict[str, int],
          listening: set[int], env: dict[str, str]) -> dict[str, Any]:
    """A service as `status` and `up` show it."""
    port_name = unit.spec.port_name if unit else cfg.port if cfg else None
    port = ports.get(port_name) if port_name else None
    shown: dict[str, Any] = {
        "name": name, "state": unit.state if unit else "stopped",
        "pid": unit.pid if unit else None, "port": port, "port_name": port_name,
        "url": service_config.url_of(port_name, ports, env),
        "listening": port in listening if port else False,
        "restarts": unit.restarts if unit else 0,
        "error": unit.error if unit else None,
    }
    if unit is not None:
        shown["command"], shown["log"] = unit.spec.command, str(unit.spec.log)
        if unit.state in ("crashed", "failed"):
            shown["log_tail"] = logs.last_run(unit.spec.log)
    return shown


def failure(unit: Unit) -> str:
    """Why a service is down, with the end of its log."""
    tail = "\n".join(f"  | {line}" for line in logs.last_run(unit.spec.log, 10))
    return f"{unit.spec.name}: {unit.error or unit.state}" + (f"\n{tail}" if tail else "")


def add_to_status(service: ServiceCore, entries: list[dict[str, Any]],
                  chosen: list[Worktree]) -> list[dict[str, Any]]:
    """Each worktree gets "services": its declared (or still known) ones, or []."""
    listening: set[int] | None = None
    for wt, shown in zip(chosen, entries, strict=True):
        shown["services"] = []
        if service._config(wt, strict=False).services or service.services.units(wt.id):
            listening = processes.all_listening_ports() if listening is None else listening
            shown["services"] = entries_of(service, wt, listening=listening)
    return entries
