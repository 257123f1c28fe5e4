"""`devd doctor` on the CLI side: the fix for the limit that binds where the caller runs,
and `--fix`, the root-only part of the recovery ladder, applied only when asked and only
when already root (never through sudo on the user's behalf).

Inside a user namespace (a container, `unshare -U`) the binding limit is often the
namespace's own `user.max_inotify_watches`, which its root can raise; the machine's
`fs.inotify.*` is never written from inside one, even where the kernel would allow it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from devd.watchers import analysis
from devd.watchers.linux import binding_limits, in_child_userns, limit_names, sysctl_path


def localise(result: dict[str, Any]) -> dict[str, Any]:
    """The daemon's doctor result with `limits` and `fix` for the caller's own namespace
    (the daemon may run in another, with other limits)."""
    if not sys.platform.startswith("linux"):
        return result
    watches, instances = binding_limits()
    found = [limit for limit in (watches, instances) if limit is not None]
    names = limit_names(watches, instances)
    result["limits"] = [{"sysctl": limit.sysctl, "value": limit.value,
                         "namespace": limit.namespace} for limit in found]
    result["fix"] = analysis.fix(watches.value if watches else None,
                                 instances.value if instances else None, names)
    return result


def apply_fix(result: dict[str, Any]) -> dict[str, Any]:
    """Raise the binding limits, if a fix is needed and we are root: a namespace's own by
    writing its /proc/sys/user files, the machine's by a sysctl drop-in. Never raises."""
    if not result.get("fix_needed"):
        return {"done": False, "why": "no fix needed"}
    if os.geteuid() != 0:
        return {"done": False, "why": "not root: run the printed commands with sudo"}
    fix = result["fix"]
    if fix.get("namespace"):
        return _raise_in_namespace(fix["persist_lines"])
    if in_child_userns():
        return {"done": False, "why": "inside a user namespace, and the machine's limit "
                "binds: raise it as root outside (the printed commands)"}
    return _persist(fix)


def _raise_in_namespace(lines: list[str]) -> dict[str, Any]:
    done, skipped = [], []
    for line in lines:
        name, value = line.split("=", 1)
        if not name.startswith("user."):
            skipped.append(name)  # the machine's: not from in here
            continue
        path = sysctl_path(name)
        try:
            Path(path).write_text(value)
        except OSError as exc:
            return {"done": False, "why": f"cannot write {path}: {exc.strerror}"}
        done.append(line)
    why = f"raised {', '.join(done)} in this user namespace (until it ends); restart the " \
        "broken watchers"
    if skipped:
        why += f"; {', '.join(skipped)} is the machine's: raise it as root outside"
    return {"done": bool(done), "why": why}


def _persist(fix: dict[str, Any]) -> dict[str, Any]:
    target = Path(fix["persist_file"])
    text = "# written by `devd doctor --fix`: room for file watchers of many worktrees\n"
    text += "".join(f"{line}\n" for line in fix["persist_lines"])
    try:
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
        loaded = subprocess.run(["sysctl", "-p", str(target)], capture_output=True, text=True,
                                check=False)
    except OSError as exc:
        return {"done": False, "why": f"cannot apply {target}: {exc.strerror or exc}"}
    if loaded.returncode:
        return {"done": False, "why": f"sysctl -p {target} failed: {loaded.stderr.strip()}"}
    return {"done": True, "why": f"wrote {target} and loaded it; restart the broken watchers"}
