"""`devd run` with the watcher budget: preflight warning, then the scanned exec."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from devd.client import Client
from devd.errors import DevdError
from devd.watchers import tee
from devd.watchers.analysis import one_line
from devd.watchers.linux import binding_limits, read_link
from devd.watchers.signatures import Signature


def run(client: Client, path: str, argv: list[str], env: dict[str, str], cwd: str) -> int:
    """Warn if the watch budget looks short, record the run, exec in `cwd` with output
    scanning."""
    os.chdir(cwd)  # first: a relative command (./dev.sh) is the worktree's
    env = env | {"PWD": cwd}
    if shutil.which(argv[0], path=env.get("PATH", os.defpath)) is None:
        print(f"devd: error: cannot run {one_line(argv[0])}: command not found or not "
              "executable", file=sys.stderr)
        return 127
    warn_if_short(client, path)
    # exec keeps our pid, so the process the daemon records (this one, by the kernel's
    # word on who connected) is the command itself. argv and cwd let
    # `devd watchers --restart` start it again after a break.
    started = client.call("run_started", {"path": path, "argv": argv, "cwd": cwd})
    # Kept in memory only (the scanner inherits it): it vouches for this run's breaks
    # after the command has exited and the scanner's ancestry is gone.
    token = started.get("token") if isinstance(started, dict) else None

    def report(signature: Signature, line: str) -> None:
        # Sent by the scanner, a child of this process: the daemon checks that ancestry.
        params = {"path": path, "signature": signature.name,
                  "budget": signature.budget, "line": line, "argv": argv, "cwd": cwd,
                  "token": token}
        try:
            Client(client.paths, autostart=False).call("run_event", params)
        except (DevdError, OSError):
            return  # no daemon to tell: the output itself already showed the line

    return tee.exec_scanned(argv, env, report) or 127


def warn_if_short(client: Client, path: str) -> dict[str, Any] | None:
    """Ask the daemon for a fresh pass and this worktree's estimated need; print its warning.
    Our own limit and user namespace go along: in a container they are not the daemon's."""
    watches = binding_limits()[0] if sys.platform.startswith("linux") else None
    params = {"path": path, "max_watches": watches.value if watches else None,
              "limit_name": watches.sysctl if watches else None,
              "userns": read_link("/proc/self/ns/user")}
    try:
        result: dict[str, Any] = client.call("watchers_preflight", params)
    except DevdError as exc:
        if exc.code in ("protocol", "watchers_unavailable", "usage"):
            return None  # an older daemon, or one without the monitor: run anyway
        raise
    if result.get("warning"):
        for line in str(result["warning"]).splitlines():
            print(f"devd: warning: {one_line(line, 300)}", file=sys.stderr)
    return result
