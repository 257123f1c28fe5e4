"""The whole Caddy config as JSON data (pushed with POST /load; no Caddyfile templating)."""

from __future__ import annotations

import html
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devd.proxy.names import DASHBOARD, host
from devd.proxy.routes import Table

SERVER = "devd"
WAKE_HEADER = "X-Devd-Wake"  # Caddy sets it (the daemon's secret) on a wake request
# (worktree id, port name) → the address the worktree's own listener on that port uses
# ("127.0.0.1", "[::1]"), as devd/proxy/verify.py verified it; a route not in it gets a page.
Dials = Mapping[tuple[str, str], str]
# Seconds Caddy gives open connections (an HMR socket stays open for ever) when stopping.
GRACE = "1s"


def caddy_config(table: Table, *, port: int, tls: bool, admin: Path, storage: Path,
                 dashboard: Path, token: str = "", dials: Dials | None = None
                 ) -> dict[str, Any]:
    """Admin on a unix socket only, storage under devd's data dir, one server on loopback.
    A route goes to its port at the address in `dials`, else to the daemon's page (_page)."""
    config: dict[str, Any] = {
        "admin": {"listen": f"unix/{admin}", "config": {"persist": False}},
        "storage": {"module": "file_system", "root": str(storage)},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "apps": {"http": {"grace_period": GRACE, "servers": {
            SERVER: _server(table, port, tls, dashboard, token, dials or {})}}},
    }
    if tls:
        config["apps"]["tls"] = {"automation": {"policies": [
            {"subjects": [*table.hosts(), host(DASHBOARD)], "issuers": [{"module": "internal"}]}]}}
        # Never into the system's trust store unasked: `caddy trust` is the user's step.
        config["apps"]["pki"] = {"certificate_authorities": {"local": {"install_trust": False}}}
    return config


def _server(table: Table, port: int, tls: bool, dashboard: Path, token: str, dials: Dials
            ) -> dict[str, Any]:
    server: dict[str, Any] = {
        "listen": [f"{address}:{port}" for address in loopback_addresses()],
        "protocols": ["h1", "h2"] if tls else ["h1", "h2c"],
        "routes": [*(_route([r.host], f"{dials[r.wt_id, r.name]}:{r.port}")
                     if (r.wt_id, r.name) in dials else _page(r.host, r.wt_id, r.name,
                                                               dashboard, token)
                     for r in table.routes),
                   _route([host(DASHBOARD)], f"unix/{dashboard}"),
                   *not_found(table)],
    }
    # A route whose dev server does not answer: say so, keeping the status (502 and the like).
    server["errors"] = {"routes": [{"handle": [_static(
        "{http.error.status_code}", "devd: nothing answers behind {http.request.host} "
        "({http.error.status_code}); is its dev server running? See `devd ports`.\n",
        "text/plain")]}]}
    server["automatic_https"] = {"disable_redirects": True} if tls else {"disable": True}
    if tls:
        server["tls_connection_policies"] = [{}]
    return server


# Every change of routes is a whole new config (POST /load), and Caddy closes the open
# WebSockets of the config it unloads at once: each Vite page through the proxy would
# reload whenever any worktree's route changed (one appeared, a service went idle). They
# are kept instead; one whose upstream stopped ends when that server closes it.
STREAM_CLOSE_DELAY = "24h"


def _route(hosts: list[str], dial: str) -> dict[str, Any]:
    # flush_interval -1: server-sent events and streamed responses pass unbuffered.
    return {"match": [{"host": hosts}], "terminal": True, "handle": [{
        "handler": "reverse_proxy", "flush_interval": -1, "upstreams": [{"dial": dial}],
        "stream_close_delay": STREAM_CLOSE_DELAY}]}


def _page(hostname: str, wt_id: str, name: str, dashboard: Path, token: str
          ) -> dict[str, Any]:
    """A name whose port nothing of the worktree's listens on (verified: a stranger may
    hold it): the request goes to the daemon's wake handler, which starts an idle_stop
    service and answers "starting…", or says what is not running and how to start it,
    until the route points at the worktree's own listener. The header carries the daemon's
    secret, so only Caddy's routes can wake anything (devd.localhost/_devd/wake/... from a
    browser lacks it)."""
    return {"match": [{"host": [hostname]}], "terminal": True, "handle": [
        {"handler": "rewrite", "uri": f"/_devd/wake/{wt_id}/{name}"},
        {"handler": "reverse_proxy", "upstreams": [{"dial": f"unix/{dashboard}"}],
         "headers": {"request": {"set": {WAKE_HEADER: [token]}}}}]}


def not_found(table: Table) -> list[dict[str, Any]]:
    """Unknown names under .localhost get a page listing what exists; any other Host (a
    DNS-rebinding page on 127.0.0.1) a bare 404, which tells it nothing."""
    # A regexp, not a host matcher: Caddy would get a *.localhost certificate for a host
    # matcher with TLS on, which clients refuse (and would serve it for short names).
    local = {"vars_regexp": {"{http.request.host}": {"pattern": r"(^|\.)localhost$"}}}
    listing = {"match": [local], "terminal": True,
               "handle": [_static(404, not_found_page(table))]}
    return [listing, {"handle": [_static(404, "not found\n", "text/plain")]}]


def _static(status: int | str, body: str, kind: str = "text/html") -> dict[str, Any]:
    return {"handler": "static_response", "status_code": status, "body": body,
            "headers": {"Content-Type": [f"{kind}; charset=utf-8"],
                        "Content-Security-Policy": ["default-src 'none'"],
                        "X-Content-Type-Options": ["nosniff"]}}


def not_found_page(table: Table) -> str:
    # {http.request.host} would be replaced by Caddy: nothing here is a placeholder, so
    # braces are escaped too (hostnames have none; the text is ours).
    items = "".join(f'<li><a href="{_e(url)}">{_e(url)}</a></li>'
                    for urls in table.urls.values() for url in urls.values())
    dashboard = table.dashboard or ""
    return ("<!doctype html><title>devd: no such name</title><h1>No such name</h1>"
            f'<p>devd routes these (dashboard: <a href="{_e(dashboard)}">{_e(dashboard)}</a>)'
            f":</p><ul>{items or '<li>nothing yet: provision a worktree</li>'}</ul>\n")


def _e(text: str) -> str:
    return html.escape(text, quote=True).replace("{", "&#123;").replace("}", "&#125;")


def loopback_addresses() -> list[str]:
    """127.0.0.1, and [::1] where the host has it (browsers try both for .localhost)."""
    found = ["127.0.0.1"]
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        found.append("[::1]")
    except OSError:
        pass
    return found
