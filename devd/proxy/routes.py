"""The route table: every named port of every live worktree, as hostnames and URLs.

Built from the registry alone (worktrees, their recorded ports, the leases), so the table,
the Caddy config and each worktree's DEVD_URL* agree, and routes are as stable as leases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from devd.proxy.names import DASHBOARD, host, label, port_label, with_path
from devd.registry import Registry, Worktree


@dataclass(frozen=True)
class Site:
    """One worktree's part: its labels' raw material and its ports in devd.toml order."""

    wt_id: str
    path: Path
    repo_key: Path  # the common dir: one repo however many worktrees
    repo_name: str
    main: bool
    name: str  # the branch, else the directory's name
    ports: dict[str, int]


@dataclass(frozen=True)
class Route:
    host: str
    port: int
    wt_id: str
    name: str


@dataclass
class Table:
    routes: list[Route] = field(default_factory=list)
    urls: dict[str, dict[str, str]] = field(default_factory=dict)  # wt id → name → URL
    short: dict[str, str] = field(default_factory=dict)  # wt id → its first port's URL
    dashboard: str = ""

    def hosts(self) -> list[str]:
        return [route.host for route in self.routes]


def site_of(wt: Worktree, ports: dict[str, int]) -> Site:
    main = wt.path == wt.repo_main_path
    return Site(wt.id, wt.path, wt.repo_common_dir, wt.repo_name, main,
                wt.branch or wt.path.name, ports)


def sites(registry: Registry) -> list[Site]:
    """Live worktrees with ports still leased to them, in a fixed order."""
    leased = {(wt_id, name): port for port, name, wt_id in registry.leases()}
    resources, found = registry.all_resources(), []
    for wt in registry.worktrees():
        if wt.state == "gone":
            continue
        recorded = next((r.detail.get("ports") or {} for r in resources.get(wt.id, [])
                         if r.kind == "ports"), {})
        ports = {name: port for name, port in recorded.items()
                 if leased.get((wt.id, name)) == port}
        if ports:
            found.append(site_of(wt, ports))
    return sorted(found, key=lambda s: s.wt_id)


def build(found: list[Site], base_url: str) -> Table:
    """Hostnames for every site; `base_url` is e.g. 'http://{}:1356' (the host goes in)."""
    table = Table(dashboard=base_url.format(host(DASHBOARD)) + "/")
    repos = _repo_labels(found)
    by_repo: dict[Path, list[Site]] = {}
    for site in found:
        by_repo.setdefault(site.repo_key, []).append(site)
    for key, members in by_repo.items():
        labels = _worktree_labels(members)
        for site in members:
            wt_label = labels[site.wt_id]
            _add(table, site, (wt_label, repos[key]) if wt_label else (repos[key],), base_url)
    return table


def _add(table: Table, site: Site, suffix: tuple[str, ...], base_url: str) -> None:
    urls = table.urls.setdefault(site.wt_id, {})
    for index, (name, port) in enumerate(site.ports.items()):
        full = host(port_label(name), *suffix)
        table.routes.append(Route(full, port, site.wt_id, name))
        urls[name] = base_url.format(full)
        if index == 0:
            short = host(*suffix)
            table.routes.append(Route(short, port, site.wt_id, name))
            table.short[site.wt_id] = base_url.format(short)


def _repo_labels(found: list[Site]) -> dict[Path, str]:
    """A label per repo; the second repo of the same name (by path) gets the path's digest."""
    labels: dict[Path, str] = {}
    for key in sorted({s.repo_key for s in found}):
        name = label(next(s.repo_name for s in found if s.repo_key == key))
        taken = name == DASHBOARD or name in labels.values()
        labels[key] = with_path(name, key) if taken else name
    return labels


def _worktree_labels(members: list[Site]) -> dict[str, str | None]:
    """None for the main worktree; a label for each other, clear of the repo's port labels
    (`api.shop.localhost` is main's api port) and of each other."""
    reserved = {port_label(name) for site in members for name in site.ports}
    labels: dict[str, str | None] = {}
    for site in members:
        if site.main:
            labels[site.wt_id] = None
            continue
        name = label(site.name)
        if name in reserved or name in labels.values():
            name = with_path(name, site.path)
        labels[site.wt_id] = name
    return labels


def base_url(port: int, tls: bool) -> str:
    scheme = "https" if tls else "http"
    default = 443 if tls else 80
    return f"{scheme}://{{}}" + ("" if port == default else f":{port}")
