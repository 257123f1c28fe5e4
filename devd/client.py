"""Talk to the daemon: connect, send one request, pass progress events on, return the result.

Starts a daemon in the background when none answers, unless DEVD_NO_AUTOSTART=1.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from devd import protocol
from devd.errors import DaemonUnreachable, DevdError, ProtocolError
from devd.paths import Paths, ensure_private_dir, flock_held

ProgressHandler = Callable[[dict[str, Any]], None]
AUTOSTART_TIMEOUT = 15.0
_UNREACHABLE = (FileNotFoundError, ConnectionRefusedError, NotADirectoryError)


class Client:
    def __init__(self, paths: Paths, autostart: bool = True,
                 on_autostart: Callable[[Paths], None] | None = None) -> None:
        self.paths = paths
        self.autostart = autostart
        self.on_autostart = on_autostart  # starting takes a second: say so

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_progress: ProgressHandler | None = None) -> Any:
        """Send one request; raise the daemon's error as the matching DevdError."""
        sock = self._connect()
        with sock:
            sock.sendall(protocol.encode(protocol.request(method, params)))
            reader = protocol.LineReader(sock, protocol.MAX_REPLY_BYTES)
            while True:
                message = protocol.decode(reader.readline())
                if message.get("event") == "progress":
                    if on_progress:
                        on_progress(message)
                    continue
                if message.get("ok") is True:
                    return message.get("result")
                if message.get("ok") is False and isinstance(message.get("error"), dict):
                    raise DevdError.from_dict(message["error"])
                raise ProtocolError(f"unexpected reply from the daemon: {message!r:.200}")

    def _connect(self) -> socket.socket:
        try:
            return connect(self.paths)
        except _UNREACHABLE as exc:
            if not self.autostart:
                raise self._unreachable(exc) from exc
        if self.on_autostart:
            self.on_autostart(self.paths)
        start_daemon(self.paths)
        return connect(self.paths)

    def _unreachable(self, exc: OSError) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"no devd daemon answers on {self.paths.socket} ({exc.strerror or exc})",
            "start one with `devd daemon` (or `devd service install`), "
            "or unset DEVD_NO_AUTOSTART to let the CLI start it",
        )


def caller_overrides() -> dict[str, str]:
    """Settings a user sets in the shell that calls devd, which must win over whatever the
    daemon was started with (by a hook, an older shell, or the user service)."""
    url = os.environ.get("DEVD_POSTGRES_URL")
    return {"postgres_url": url} if url else {}


def connect(paths: Paths) -> socket.socket:
    """Connect, and make sure the daemon answering is ours: in a shared /tmp anyone could
    have made the directory and put a socket of their own there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(paths.socket))
        server = protocol.peer_uid(sock)
    except OSError:
        sock.close()
        raise
    if server is not None and server != os.getuid():
        sock.close()
        raise DaemonUnreachable(
            f"{paths.socket} is served by uid {server}, not by you (uid {os.getuid()})",
            f"remove {paths.runtime_dir} if you trust nothing in it, or set XDG_RUNTIME_DIR",
        )
    return sock


def start_daemon(paths: Paths) -> None:
    """Start `devd daemon` detached (own session, log in the state dir); wait until it answers."""
    import subprocess  # only needed here; keeps every other CLI call lighter

    ensure_private_dir(paths.state_dir)
    with open(paths.daemon_log, "ab") as log:
        # GIT_* from a hook's environment must not follow the daemon into every repo it serves.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        # -P and cwd="/": `-m` would otherwise put the caller's directory (say, a worktree
        # holding a file named sqlite3.py) first on the daemon's import path, for life.
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "devd", "daemon"], stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True, close_fds=True, env=env, cwd="/",
        )
    deadline = time.monotonic() + AUTOSTART_TIMEOUT
    while time.monotonic() < deadline:
        try:
            connect(paths).close()
            return
        except _UNREACHABLE:
            pass
        if proc.poll() is not None and not _lock_held_by_other(paths):
            raise DaemonUnreachable(
                f"the devd daemon exited at start (code {proc.returncode}): {_tail(paths)}",
                f"see {paths.daemon_log}",
            )
        time.sleep(0.02)
    raise DaemonUnreachable(f"the devd daemon did not answer within {AUTOSTART_TIMEOUT:.0f} s",
                            f"see {paths.daemon_log}")


def _lock_held_by_other(paths: Paths) -> bool:
    """Our daemon may have lost a start race to another one that is still binding."""
    return flock_held(paths.lock_file)


def _tail(paths: Paths, lines: int = 5) -> str:
    try:
        text = paths.daemon_log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])
