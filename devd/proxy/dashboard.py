"""The dashboard's server: stdlib HTTP on a unix socket, which Caddy reverse-proxies
http://devd.localhost:<port>/ to. Read-only (GET only), so no request can change anything.

Everything lives under a secret first path segment, /<key>/: the proxy port is loopback
TCP, which every user of the machine (and any page a browser opens, by its own name) can
reach, while paths, branches, errors and service logs are the owner's. The key is in
`devd status` (over the daemon's 0600 socket) and in a 0600 file; without it, a bare 404."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from devd.paths import write_atomic
from devd.proxy.config import WAKE_HEADER
from devd.proxy.page import POLICY, page, starting_page

log = logging.getLogger("devd")
# (worktree id, service, lines) → the log's tail, or None when there is no such service.
LogTail = Callable[[str, str, int], "str | None"]
TAIL_LINES, TAIL_MAX = 200, 5000
_KEY = re.compile(r"[A-Za-z0-9_-]{32,}")
# A worktree id or service name as devd makes them: never `..`, `a/b` (from %2F) or a NUL,
# so no log_tail behind this seam can be walked out of its dir.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
LOCKED = "not found: the dashboard's address is in `devd status` (proxy.dashboard)\n"


def dashboard_key(path: Path) -> str:
    """The secret path segment: made once, kept across restarts so a bookmark keeps working.
    Delete the file and restart the daemon to change it."""
    with contextlib.suppress(FileNotFoundError):
        key = path.read_text().strip()
        if _KEY.fullmatch(key):
            return key
    key = secrets.token_urlsafe(32)
    write_atomic(path, key.encode())
    return key
# (worktree id, port name) → what serves it ("name", "what", "state", "error", "hint"), or
# None (no such worktree).
Wake = Callable[[str, str], "dict[str, Any] | None"]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    dashboard: Dashboard


class Dashboard:
    """A thread serving the page, /status.json and /logs/<worktree id>/<service>."""

    def __init__(self, socket_path: Path, status: Callable[[], dict[str, Any]],
                 log_tail: LogTail | None = None, key: str = "", wake: Wake | None = None,
                 token: str = "") -> None:
        self.socket_path = socket_path
        self.key = key or secrets.token_urlsafe(32)
        self.status = status
        self.log_tail = log_tail
        self.wake, self.token = wake, token
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old = os.umask(0o177)  # only the owner (and Caddy, the owner's) may connect
        try:
            self._server = _Server(str(self.socket_path), _Handler)
        finally:
            os.umask(old)
        self._server.dashboard = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.5}, name="devd-dashboard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "devd"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser left
        except Exception as exc:  # a bug must show as a 500, not end the dashboard
            log.exception("dashboard: %s failed", self.path[:200])
            self._send(500, f"devd dashboard error: {type(exc).__name__}\n", "text/plain")

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        if len(parts) == 4 and parts[:2] == ["_devd", "wake"] and self._from_caddy():
            self._wake(parts[2], parts[3])  # Caddy's wake routes carry their own secret
            return
        if not parts or not hmac.compare_digest(parts[0].encode("utf-8", "surrogateescape"),
                                                self.server.dashboard.key.encode()):
            self._send(404, LOCKED, "text/plain")
            return
        if len(parts) == 1 and not url.path.endswith("/"):  # relative links need the slash
            self._send(308, "", "text/plain", location=f"/{parts[0]}/")
            return
        parts = parts[1:]
        if not parts:
            self._send(200, page(self.server.dashboard.status()), "text/html")
        elif parts == ["status.json"]:
            self._send(200, json.dumps(self.server.dashboard.status(), indent=2),
                       "application/json")
        elif len(parts) == 3 and parts[0] == "logs":
            self._logs(parts[1], parts[2], parse_qs(url.query).get("lines", [""])[0])
        else:
            self._send(404, "not found\n", "text/plain")

    def _logs(self, wt_id: str, name: str, lines: str) -> None:
        tail = self.server.dashboard.log_tail
        count = min(TAIL_MAX, int(lines)) if lines.isdigit() else TAIL_LINES
        plain = all(_NAME.fullmatch(part) and ".." not in part for part in (wt_id, name))
        text = tail(wt_id, name, count) if tail and plain else None
        if text is None:
            self._send(404, "no services: no such service log\n", "text/plain")
        else:
            self._send(200, text, "text/plain")

    def _from_caddy(self) -> bool:
        """A wake request comes through one of Caddy's wake routes, which carry the secret."""
        token = self.server.dashboard.token
        given = self.headers.get(WAKE_HEADER) or ""
        return bool(token) and hmac.compare_digest(given.encode(), token.encode())

    def _wake(self, wt_id: str, port_name: str) -> None:
        wake = self.server.dashboard.wake
        woken = wake(wt_id, port_name) if wake else None
        if woken is None:  # the route is stale: the next push fixes it
            self._send(503, starting_page(port_name, "unknown", None), "text/html",
                       {"Retry-After": "1"})
            return
        error = woken.get("error")
        # 502 as for any server that does not answer; 503 while it starts (back soon).
        self._send(502 if error else 503, starting_page(
            woken["name"], woken["state"], error, woken.get("hint"), woken.get("what")),
            "text/html", {"Retry-After": "5" if error else "1"})

    def _send(self, code: int, body: str, kind: str, extra: dict[str, str] | None = None,
              location: str = "") -> None:
        data = body.encode("utf-8", "replace")
        self.send_response(code)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")  # the key is in the URL
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "caddy"  # a unix socket's peer has no address

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        log.debug("dashboard: " + format, *args)
