"""The dashboard's HTML: every repo and worktree, its URLs, ports, Postgres, deps, services.

Every value is escaped (branch names are anyone's text), and the page carries a policy that
runs no script at all, so a name that gets past escaping still cannot act."""

from __future__ import annotations

import html
import os
from typing import Any
from urllib.parse import quote

from devd.render_status import deps_word, postgres_word, state_word, summary

POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; form-action 'none'"
REFRESH = 5  # seconds: the page follows provisioning without a script
STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:2em}td,th{padding:.3em .8em;text-align:left;
border-bottom:1px solid #ddd;vertical-align:top}.on{color:#080}.off{color:#999}
.bad{color:#b00}h2{font-size:1.1em;margin-top:2em}code{font-size:.95em}"""
HEADER = ("worktree", "branch", "state", "URLs", "ports", "postgres", "deps", "services")


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(status: dict[str, Any]) -> str:
    repos: dict[str, list[dict[str, Any]]] = {}
    for wt in sorted(status["worktrees"], key=lambda w: w["path"]):
        repos.setdefault(wt.get("repo") or "?", []).append(wt)
    body = [f"<h1>devd</h1><p id=summary>{e(summary(status))}</p>", _proxy(status)]
    body += [_repo(repo, rows, status) for repo, rows in sorted(repos.items())]
    if not repos:
        body.append("<p>No worktrees yet: run <code>devd provision</code> in one.</p>")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>devd</title>"
            f'<meta http-equiv="refresh" content="{REFRESH}"><style>{STYLE}</style></head>'
            f"<body>{''.join(body)}</body></html>\n")


def _proxy(status: dict[str, Any]) -> str:
    proxy = status.get("proxy") or {}
    state = proxy.get("state", "disabled")
    text = f"proxy {state} on port {proxy.get('port')}" if proxy.get("enabled") else \
        "proxy disabled"
    problem = f" — {proxy.get('error')} ({proxy.get('hint')})" if proxy.get("error") else ""
    budget = status.get("watchers") or {}
    watchers = f"<p id=watchers>watcher budget: {e(budget.get('level'))}, " \
        f"{e(budget.get('watches'))} of {e(budget.get('max_watches'))} watches</p>" \
        if budget.get("max_watches") else ""
    css = "on" if state == "running" else "bad"
    return f'<p id=proxy class={css}>{e(text + problem)}</p>{watchers}'


def _repo(repo: str, rows: list[dict[str, Any]], status: dict[str, Any]) -> str:
    grace = (status.get("daemon") or {}).get("gc_grace_seconds")
    import time

    now = time.time()
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    cells = "".join(f"<tr>{''.join(_row(wt, grace, now))}</tr>" for wt in rows)
    return f"<h2>{e(repo)}</h2><table><tr>{head}</tr>{cells}</table>"


def _row(wt: dict[str, Any], grace: float | None, now: float) -> list[str]:
    return [f"<td title=\"{e(wt['path'])}\">{e(os.path.basename(wt['path']))}</td>",
            f"<td>{e(wt.get('branch') or '(detached HEAD)')}</td>",
            f"<td>{e(state_word(wt, grace, now))}</td>", f"<td>{_urls(wt)}</td>",
            f"<td>{_ports(wt)}</td>", f"<td>{e(postgres_word(wt))}</td>",
            f"<td>{e(deps_word(wt))}</td>", f"<td>{_services(wt)}</td>"]


def _link(url: Any, text: str | None = None) -> str:
    """A link for an http(s) URL only (never javascript:); anything else as plain text."""
    shown = e(text if text is not None else url)
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return f'<a href="{e(url)}/">{shown}</a>'
    return shown


def _urls(wt: dict[str, Any]) -> str:
    return "<br>".join(_link(url) for url in (wt.get("urls") or {}).values()) or "-"


def _ports(wt: dict[str, Any]) -> str:
    listening = wt.get("listening") or {}
    return "<br>".join(
        f'<span class={"on" if listening.get(name) else "off"}>{e(name)} {e(port)} '
        f'{"listening" if listening.get(name) else "not listening"}</span>'
        for name, port in (wt.get("ports") or {}).items()) or "-"


def _services(wt: dict[str, Any]) -> str:
    services = wt.get("services")
    if not services:
        return "no services"
    return "<br>".join(_service(wt["id"], s) for s in services)


def _service(wt_id: str, service: dict[str, Any]) -> str:
    name, url = str(service.get("name", "?")), service.get("url")
    link = f" {_link(url, 'open')}" if url else ""
    logs = f"logs/{quote(wt_id, safe='')}/{quote(name, safe='')}"  # under /<key>/
    return (f"{e(name)}: {e(service.get('state'))} (pid {e(service.get('pid') or '-')}, "
            f"restarts {e(service.get('restarts', 0))}){link} <a href=\"{e(logs)}\">log</a>")


def starting_page(name: str, state: str, error: str | None, hint: str | None = None,
                  what: str | None = None) -> str:
    """What a request to a name gets while nothing of its worktree listens on the port
    (devd never sends it to whoever else does): a page that reloads itself each second
    (no script: the policy runs none) while devd starts the service, until the route
    points at it; one that says what is not running, why and how to start it (reloading
    slower, so it comes back by itself once the server listens) otherwise."""
    if error:
        text = f"<h1>{e(what or name)} is not running</h1><p class=bad>{e(error)}</p>" \
            f"<p>Start it: <code>{e(hint or 'devd up ' + name)}</code>; see <code>devd " \
            f"logs {e(name)}</code> for a service's output. This page reloads.</p>"
    else:
        text = f"<h1>starting {e(name)}…</h1><p>devd is starting {e(what or name)} " \
            f"({e(state)}; a service with idle_stop is started by a request); this page " \
            "reloads until it answers.</p>"
    return (f'<!doctype html><html><head><meta charset=utf-8><title>{e(what or name)}'
            f'</title><meta http-equiv="refresh" content="{5 if error else 1}">'
            f"<style>{STYLE}</style></head><body>{text}</body></html>\n")
