"""Terminal rendering of daemon replies: readable, and safe for any branch or path name."""

from __future__ import annotations

import time
from typing import Any


def render_worktree(wt: dict[str, Any]) -> str:
    listening = wt.get("listening") or {}
    ports = " ".join(f"{name}={port}" + " (listening)" * bool(listening.get(name))
                     for name, port in wt.get("ports", {}).items())
    lines = [f"{wt['id']}  {wt['state']}  {wt.get('branch') or '(detached HEAD)'}",
             f"  path     {wt['path']}"]
    for label, value in (("ports", ports), ("cache", wt.get("cache_dir")),
                         ("profile", wt.get("browser_profile")), ("env", wt.get("env_file"))):
        if value:
            lines.append(f"  {label:<8} {value}")
    if wt.get("gone_at"):
        from devd.render_status import epoch

        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch(wt["gone_at"])))
        lines.append(f"  gone     since {since}; its resources are held until `devd gc`")
    for proc in wt.get("processes", []):
        on = f" on port {proc['port']}" if proc.get("port") else ""
        how = "`devd gc` stops it" if proc.get("devd_run") else "not started by `devd run`: " \
            "stop it yourself; `devd gc` keeps its ports until then"
        lines.append(f"  running  pid {proc['pid']} {proc['command']}{on} ({how})")
    if wt.get("postgres"):
        pg = wt["postgres"]
        how = f", template cloned by {pg['strategy']}" \
            if pg.get("strategy") and not pg.get("snapshot") else ""
        lines.append(f"  postgres {pg.get('mode')} {pg.get('name')} on "
                     f"{pg.get('host') or 'local socket'}:{pg.get('port')} "
                     f"({pg.get('state')}){how}")
        if pg.get("disk"):
            lines.append(f"  data     {data_line(pg)}")
    for row in wt.get("containers", []):
        on = f" on 127.0.0.1:{row['port']}" if row.get("port") else ""
        db = f" db {row['db']}" if "db" in row else ""
        label = "compose" if row.get("kind") == "compose" else "container"
        lines.append(f"  {label:<8} {row['name']}{on}{db} ({row['state']})")
    if wt.get("deps"):
        lines.append(f"  deps     {render_deps(wt['deps'])}")
    for svc in wt.get("services") or []:
        lines.append(f"  service  {render_service(svc)}")
    watchers = wt.get("watchers") or {}
    if watchers.get("watches") or watchers.get("state") not in (None, "ok", "idle"):
        lines.append(f"  watchers {watchers.get('watches') or 0} inotify watches "
                     f"({watchers.get('state')})")
    if wt.get("error"):
        lines.append(f"  error    {wt['error']}")
    for res in wt.get("resources", []):
        if res["state"] != "ready" or res.get("detail"):
            lines.append(f"  ! {res['kind']}: {res['state']} {res.get('detail') or ''}".rstrip())
    return safe("\n".join(lines))


def render_service(svc: dict[str, Any]) -> str:
    """'web running pid 123 http://... (listening, 2 restarts)' from a status service entry."""
    notes = ["listening" if svc.get("listening") else "not listening"] if svc.get("port") \
        else []
    notes += [f"{svc['restarts']} restarts"] if svc.get("restarts") else []
    parts = [svc["name"], svc["state"], f"pid {svc['pid']}" if svc.get("pid") else "",
             svc.get("url") or "", f"({', '.join(notes)})" if notes else "",
             svc.get("error") or ""]
    text = " ".join(p for p in parts if p)
    return text + "".join(f"\n           | {line}" for line in svc.get("log_tail") or [])


def render_deps(deps: dict[str, Any]) -> str:
    """'node: npm ready (reflink, 1.2 s) · python: uv stale' from status' deps object."""
    shown = []
    for key, d in deps.items():
        how = ", ".join(p for p in (d.get("strategy"), d.get("seconds") is not None
                                    and f"{d['seconds']:.1f} s") if p)
        shown.append(f"{key}: {d.get('tool')} {d.get('state')}" + (f" ({how})" if how else ""))
    return " · ".join(shown)


def safe(text: str) -> str:
    """Terminal-safe: control characters (escape codes in a hostile branch name) shown escaped."""
    if text.isprintable():  # the usual case, checked in C
        return text
    return "".join(ch if ch == "\n" or ch.isprintable() else repr(ch)[1:-1] for ch in text)


def data_line(pg: dict[str, Any]) -> str:
    """Where a snapshot clone's data lives and what it costs on disk."""
    from devd.render_status import size_text

    disk = pg["disk"]
    own = "unknown here (no FIEMAP)" if disk.get("own_bytes") is None \
        else size_text(disk["own_bytes"])
    kept = f", kept by resets {size_text(disk['kept_aside_bytes'])}" \
        if disk.get("kept_aside_bytes") else ""
    recovered = f"\n           {pg['recovered_reset']}" if pg.get("recovered_reset") else ""
    return (f"{disk['data_dir']}: {pg.get('strategy')} of snapshot {pg.get('snapshot')} "
            f"({size_text(disk.get('snapshot_bytes'))}), its own changes {own}{kept}"
            f"{safe(recovered)}")
