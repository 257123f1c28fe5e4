"""What the request handlers call: thin glue between Service and the watcher monitor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devd import processes
from devd.errors import DevdError, NotOwner
from devd.watchers import advice
from devd.watchers.breaks import SERVICE
from devd.watchers.monitor import WatcherMonitor

if TYPE_CHECKING:
    from devd.handlers.core import ServiceCore as Service
    from devd.registry import Worktree


def _monitor(service: Service) -> WatcherMonitor:
    monitor = getattr(service, "watchers", None)
    if monitor is None:
        raise DevdError("the watcher monitor is not running in this daemon",
                        "restart the daemon (`devd daemon`)", code="watchers_unavailable")
    return monitor


def add_to_status(service: Service, result: dict[str, Any], wait: bool = True
                  ) -> dict[str, Any]:
    """Top-level `watchers` and each worktree's `watchers` block (only keys are added);
    `wait=False` adds none while the monitor's first pass is still under way."""
    monitor = getattr(service, "watchers", None)
    if monitor is None:
        return result
    view = monitor.latest() if wait else monitor.peek()  # its own cadence keeps it current
    if view is None:
        return result
    result["watchers"] = monitor.report(view)
    for entry in result.get("worktrees", []):
        wt = service.registry.worktree(entry["id"])
        if wt is not None:
            entry["watchers"] = monitor.worktree_state(wt, view)
    return result


def report(service: Service) -> dict[str, Any]:
    """`devd watchers`: limits, totals, level, top consumers and every worktree's state."""
    monitor = _monitor(service)
    view = monitor.refresh(max_age=0.0)
    trees = [w for w in service.registry.worktrees() if w.state != "gone"]
    return monitor.report(view) | {"worktrees": [
        {"id": w.id, "path": str(w.path)} | monitor.worktree_state(w, view) for w in trees]}


def doctor(service: Service) -> dict[str, Any]:
    return advice.doctor(_monitor(service))


def preflight(service: Service, path: str, max_watches: int | None,
              userns: str | None, limit_name: str | None = None) -> dict[str, Any]:
    return advice.preflight(_monitor(service), service.find(path), max_watches, userns,
                            limit_name)


def run_started(service: Service, wt: Worktree, pid: int, argv: list[str] | None = None,
                cwd: str | None = None) -> None:
    """Record what a `devd run` runs and where (for a restart); clear exited runs' breaks.
    `pid` is the recorded run's (the kernel's peer pid, see Service.do_run_started)."""
    monitor = getattr(service, "watchers", None)
    if monitor is not None:
        monitor.run_started(wt, pid, _strings(argv), str(cwd or wt.path))


def run_event(service: Service, wt: Worktree, signature: str, budget: str, line: str,
              argv: list[str], cwd: str | None = None, token: str | None = None
              ) -> dict[str, Any]:
    """A break line, from a recorded run of `wt` or a descendant (its tee is a child): the
    kernel's peer pid and ancestry decide which run broke, never a pid the client sent;
    a scanner that outlived its run shows the token its run was given instead."""
    by_ancestry = processes.run_of(service.peer_pid(), service.registry, wt.id)
    run = (by_ancestry if service.peer_confirmed() else None) \
        or service.run_tokens.run(token, wt.id)
    if run is None:
        raise NotOwner(f"run_event for {wt.path} did not come from a `devd run` of it",
                       "only `devd run` (or what it started) reports watcher breaks")
    _monitor(service).record_break(wt, run[0], str(signature), str(budget), str(line)[:500],
                                   _strings(argv), str(cwd) if cwd else None)
    return {"worktree": str(wt.path), "state": "broken"}


def _strings(argv: list[str] | None) -> list[str]:
    if not isinstance(argv, list):
        return []
    return [str(a) for a in argv]


def restart(service: Service, path: str | None, max_watches: int | None, userns: str | None,
            force: bool) -> dict[str, Any]:
    """`devd watchers --restart`: which failed runs to start again (stopping live ones);
    broken declared services are restarted here, under the daemon's supervisor."""
    from devd.watchers.lifecycle import restart_plan

    only = service.find(path) if path else None
    limit = int(max_watches) if isinstance(max_watches, int) else None
    plan = restart_plan(_monitor(service), only, limit, str(userns) if userns else None,
                        bool(force))
    plan["left_down"] = []  # broken services the user took down since: left down
    for entry in plan["services"]:
        wt = service.registry.worktree(entry["worktree_id"])
        if wt is None:
            continue
        unit = service.services.unit(wt.id, entry["service"])
        if unit is not None and unit.state == "stopped":  # taken down: left down
            plan["left_down"].append(entry)  # (no refusal: nothing to fix)
            continue
        service.services.stop(wt.id, [entry["service"]])
        try:
            unit = service.start(wt, entry["service"])  # type: ignore[attr-defined]
        except DevdError as exc:
            entry |= {"new_pid": None, "state": "failed", "why": exc.message}
            plan["skipped"].append(entry)
            continue
        entry |= {"new_pid": unit.pid, "state": unit.state, "log": str(unit.spec.log)}
    plan["services"] = [e for e in plan["services"]
                        if e not in plan["skipped"] and e not in plan["left_down"]]
    return plan


def watch_services(service: Service) -> None:
    """Declared services as devd-started watchers: each spawn recorded as a run (so its
    watches are judged and it can be restarted), each break line in its log a break."""
    supervisor = service.services

    def spawned(unit: Any) -> None:
        wt = service.registry.worktree(unit.spec.wt_id)
        if wt is None or unit.pid is None:
            return
        argv = [SERVICE, unit.spec.name]
        if unit.restarts:  # the supervisor's restart after a crash: its break stays
            _monitor(service).records.add_run(wt.id, unit.pid, argv, str(unit.spec.cwd))
        else:
            run_started(service, wt, unit.pid, argv, str(unit.spec.cwd))

    def broke(unit: Any, signature: Any, line: str) -> None:
        wt = service.registry.worktree(unit.spec.wt_id)
        if wt is not None and unit.group is not None:
            _monitor(service).record_break(wt, unit.group.pgid, signature.name,
                                           signature.budget, line,
                                           [SERVICE, unit.spec.name], str(unit.spec.cwd))

    supervisor.on_spawn, supervisor.on_break = spawned, broke
