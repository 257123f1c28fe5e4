"""Getting a warning to a person: desktop notification and the repo's on_pressure hook.

Both run in a short-lived thread with a timeout: a hung notifier must not hold a pass.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from devd.settings import Settings

log = logging.getLogger("devd")
TIMEOUT = 30.0


def notify(settings: Settings, title: str, body: str) -> str | None:
    """A desktop notification where one is available (notify-send, osascript); off with
    DEVD_WATCHERS_NOTIFY=0. Returns the tool used, if any."""
    if not settings.watchers_notify:
        return None
    command = _notifier(title, body[:400])
    if command:
        _background(command, None, None)
        return command[0]
    return None


def _notifier(title: str, body: str) -> list[str] | None:
    if sys.platform == "darwin" and shutil.which("osascript"):
        script = f"display notification {_applescript(body)} with title {_applescript(title)}"
        return ["osascript", "-e", script]
    # Without a session bus notify-send only fails; skip it rather than log noise.
    if shutil.which("notify-send") and os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return ["notify-send", "--app-name=devd", title, body]
    return None


def _applescript(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_hook(command: str, cwd: Path, extra: dict[str, str]) -> None:
    """The repo's `[watchers] on_pressure` command, through the shell, in the main worktree."""
    log.info("running on_pressure hook of %s", cwd)
    _background(["/bin/sh", "-c", command], cwd, {**os.environ, **extra})


def _background(command: list[str], cwd: Path | None, env: dict[str, str] | None) -> None:
    def run() -> None:
        try:
            done = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s failed: %s", command[0], exc)
            return
        if done.returncode:
            log.warning("%s exited %d: %s", command[0], done.returncode,
                        done.stderr.decode(errors="replace").strip()[:300])
    threading.Thread(target=run, name="devd-alert", daemon=True).start()
