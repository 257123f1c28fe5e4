"""`devd skill install`: a Claude Code skill (Agent Skills format) teaching an agent to use
devd instead of fighting other worktrees for ports, databases and caches."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from devd.errors import OwnershipConflict
from devd.hooks import Say, toplevel
from devd.paths import write_atomic

TARGET = Path(".claude") / "skills" / "devd" / "SKILL.md"


def install_skill(path: Path, say: Say) -> Path:
    """Write <repo>/.claude/skills/devd/SKILL.md; one devd wrote before is updated, one
    written by someone else is left alone."""
    target = toplevel(path) / TARGET
    text = files("devd.templates").joinpath("SKILL.md").read_text(encoding="utf-8")
    if target.is_symlink():
        raise OwnershipConflict(f"{target} is a symlink; devd will not write through it",
                                "remove it, then run this again")
    if target.exists():
        old = target.read_text(encoding="utf-8", errors="replace")
        if old == text:
            say(f"{target} is up to date")
            return target
        if not old.startswith("---\nname: devd\n"):
            raise OwnershipConflict(f"{target} exists and is not devd's skill",
                                    "move it away, or keep it and skip this")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text.encode("utf-8"), 0o644)  # a fresh temp file: never a symlink
    say(f"wrote {target} (commit it so every worktree and agent gets it)")
    return target
