"""Hostile input to devd's Claude Code hooks: paths Claude never sends, names it never makes,
agent worktrees someone started using. Each must be refused or kept, never deleted."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Devd, Repo, wait_for


def remove(devd: Devd, path: Path, project: Path):
    payload = json.dumps({"worktree_path": str(path), "session_id": "s",
                          "hook_event_name": "WorktreeRemove"})
    return devd.run("hook", "claude-remove", input=payload, cwd=project, check=False,
                    env={"CLAUDE_PROJECT_DIR": str(project)})


def test_remove_refuses_what_is_not_this_sessions_worktree(devd: Devd, repo: Repo, make_repo,
                                                           tmp_path: Path) -> None:
    devd.run("provision", str(repo.main))
    wait_for(lambda: devd.worktree(repo.main)["state"] == "ready", timeout=60, what="ready")
    other = make_repo("other").worktree("other-wt", "feat")
    plain = tmp_path / "plain"
    plain.mkdir()
    for path, why in ((repo.main, "is the main worktree"), (other, "another repository"),
                      (plain, "not the root of a git worktree"),
                      (repo.main / "sub", "not the root")):
        path.mkdir(exist_ok=True)
        done = remove(devd, path, repo.main)
        assert done.returncode == 1 and why in done.stderr and "Traceback" not in done.stderr
        assert path.is_dir() and "released" not in done.stderr
    # Nothing was released before the refusal: the main worktree keeps its ports.
    assert devd.worktree(repo.main)["state"] == "ready"
