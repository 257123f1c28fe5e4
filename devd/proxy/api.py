"""What the proxy adds to `status`: a top-level "proxy" object, and each worktree's URLs."""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

from devd.paths import ensure_private_dir
from devd.proxy.routes import base_url, build, sites


def add_to_status(service: Any, result: dict[str, Any]) -> dict[str, Any]:
    settings = service.settings
    proxy = getattr(service, "proxy", None)
    table = build(sites(service.registry), base_url(settings.proxy_port, settings.proxy_tls)) \
        if settings.proxy else None
    for entry in result["worktrees"]:
        entry["url"] = table.short.get(entry["id"]) if table else None
        entry["urls"] = table.urls.get(entry["id"], {}) if table else {}
    result["proxy"] = proxy.status() if proxy is not None else {
        "enabled": bool(settings.proxy), "state": "disabled" if not settings.proxy
        else "not_started", "port": settings.proxy_port, "error": None, "hint": None}
    return result


def start(service: Any, running: contextlib.ExitStack) -> None:
    """The dashboard, then Caddy in front of it, each stopped in reverse order on the way
    out. With `proxy = false`, neither."""
    if not service.settings.proxy:
        return
    from devd.proxy.child import CaddyProxy
    from devd.proxy.dashboard import Dashboard, dashboard_key
    from devd.proxy.verify import Verifier

    paths = service.paths
    ensure_private_dir(paths.runtime_dir)
    ensure_private_dir(paths.data_dir)
    token = secrets.token_urlsafe(24)  # Caddy's wake routes carry it; nobody else knows it
    dashboard = Dashboard(paths.runtime_dir / "dashboard.sock",
                          lambda: service.snapshot.status(),  # the dict, not the wire form
                          log_tail=lambda wt_id, name, lines: service_log_tail(
                              service, wt_id, name, lines),
                          key=dashboard_key(paths.data_dir / "dashboard.key"),
                          wake=service.wake, token=token)
    dashboard.start()
    running.callback(dashboard.stop)
    proxy = CaddyProxy(service.settings, paths, service.registry, dashboard.socket_path,
                       dashboard.key, token=token,
                       dials=Verifier(service.registry, service.services.serving).dials)
    service.proxy, service.on_change = proxy, proxy.nudge
    service.services.on_change = proxy.nudge  # readiness, exits and stops switch routes
    proxy.start()
    running.callback(proxy.stop)


def service_log_tail(service: Any, wt_id: str, name: str, lines: int) -> str | None:
    """A supervised service's log tail, or None. Only a (worktree, service) pair the
    supervisor knows is read: the two names come from a URL, so they never make a path."""
    from devd.services import logs

    if service.services.unit(wt_id, name) is None:
        return None
    return "\n".join(logs.tail(logs.log_path(service.paths.state_dir, wt_id, name), lines))

