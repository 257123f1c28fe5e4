"""`devd watchers --restart` (CLI side): start failed watchers again, in the background.

The daemon picks the runs (those whose worktree now has room) and stops any that still
run; this process starts each again through `devd run`, in its recorded directory, with
the environment of the shell that asked, detached, its output in a log file in devd's
state dir. `devd run` then records the new run and clears the old one's break record.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from devd.client import Client
from devd.paths import ensure_private_dir
from devd.watchers.linux import read_limits, read_link


def restart(client: Client, path: str | None, force: bool) -> dict[str, Any]:
    """Ask the daemon for the plan, then start each run; returns the plan with pids, logs."""
    params = {"path": path, "force": force, "userns": read_link("/proc/self/ns/user"),
              "max_watches": read_limits()[0] if sys.platform.startswith("linux") else None}
    plan: dict[str, Any] = client.call("watchers_restart", params)
    if plan["runs"]:
        logs = client.paths.state_dir / "watchers"
        ensure_private_dir(logs)
        for n, run in enumerate(plan["runs"]):
            run["log"] = str(logs / f"{run['worktree_id']}-{time.strftime('%Y%m%dT%H%M%S')}"
                                    f"-{n}.log")
            run["new_pid"] = _start(run)
    return plan


def _start(run: dict[str, Any]) -> int:
    cwd = run["cwd"] if os.path.isdir(run["cwd"]) else run["worktree"]
    argv = [sys.executable, "-m", "devd", "run", "--path", run["worktree"], "--", *run["argv"]]
    with open(run["log"], "ab") as out:
        # A new session: the restarted watcher outlives this command and its terminal.
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid
