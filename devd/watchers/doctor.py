"""`devd doctor --fix`: the root-only part of the recovery ladder, applied only when asked
and only when already root (never through sudo on the user's behalf)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


def apply_fix(result: dict[str, Any]) -> dict[str, Any]:
    """Write the sysctl drop-in and load it, if a fix is needed and we are root."""
    if not result.get("fix_needed"):
        return {"done": False, "why": "no fix needed"}
    if os.geteuid() != 0:
        return {"done": False, "why": "not root: run the printed commands with sudo"}
    fix = result["fix"]
    target = Path(fix["persist_file"])
    text = "# written by `devd doctor --fix`: room for file watchers of many worktrees\n"
    text += "".join(f"{line}\n" for line in fix["persist_lines"])
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    loaded = subprocess.run(["sysctl", "-p", str(target)], capture_output=True, text=True,
                            check=False)
    if loaded.returncode:
        return {"done": False, "why": f"sysctl -p {target} failed: {loaded.stderr.strip()}"}
    return {"done": True, "why": f"wrote {target} and loaded it; restart the broken watchers"}
