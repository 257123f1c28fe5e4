"""DEVD_URL and DEVD_URL_<PORT> in the worktree's env contract, from the route table."""

from __future__ import annotations

from typing import Any

from devd.provisioners.base import Context, Health, Progress, Provisioner
from devd.proxy.routes import base_url, build, sites


def urls_of(ctx: Context) -> tuple[str | None, dict[str, str]]:
    """The worktree's short URL and its URL per port name (none while ports are missing)."""
    table = build(sites(ctx.registry), base_url(ctx.settings.proxy_port, ctx.settings.proxy_tls))
    return table.short.get(ctx.worktree.id), table.urls.get(ctx.worktree.id, {})


class UrlsProvisioner(Provisioner):
    """Nothing to make (Caddy's routes follow the registry): it records the URLs and exports
    them. They are for browsers and agents; a server reaches another by its port, since
    *.localhost names do not resolve everywhere (see the README)."""

    kind = "urls"

    def applies(self, ctx: Context) -> bool:
        return ctx.settings.proxy

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        short, urls = urls_of(ctx)
        return {"url": short, "urls": urls}

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        return Health(True)

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        return None  # the route goes with the lease

    def env(self, ctx: Context, detail: dict[str, Any]) -> dict[str, str]:
        if not ctx.settings.proxy:
            return {}
        short, urls = urls_of(ctx)  # live: what Caddy routes now, not what was recorded
        first = {"DEVD_URL": short} if short else {}
        return first | {f"DEVD_URL_{name.upper()}": url for name, url in urls.items()}
