"""What the request handlers call: thin glue between Service and the watcher monitor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devd.errors import DevdError
from devd.watchers import advice
from devd.watchers.monitor import WatcherMonitor

if TYPE_CHECKING:
    from devd.handlers import Service


def _monitor(service: Service) -> WatcherMonitor:
    monitor = getattr(service, "watchers", None)
    if monitor is None:
        raise DevdError("the watcher monitor is not running in this daemon",
                        "restart the daemon (`devd daemon`)", code="watchers_unavailable")
    return monitor


def add_to_status(service: Service, result: dict[str, Any]) -> dict[str, Any]:
    """Top-level `watchers` and each worktree's `watchers` block (only keys are added)."""
    monitor = getattr(service, "watchers", None)
    if monitor is None:
        return result
    view = monitor.refresh()
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
              userns: str | None) -> dict[str, Any]:
    return advice.preflight(_monitor(service), service.find(path), max_watches, userns)


def run_started(service: Service, path: str) -> None:
    monitor = getattr(service, "watchers", None)
    if monitor is not None:
        monitor.run_started(service.find(path))


def run_event(service: Service, path: str, pid: int, signature: str, budget: str, line: str,
              argv: list[str]) -> dict[str, Any]:
    wt = service.find(path)
    _monitor(service).record_break(wt, int(pid), str(signature), str(budget), str(line)[:500],
                                   [str(a) for a in argv])
    return {"worktree": str(wt.path), "state": "broken"}
