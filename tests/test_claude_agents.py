"""The daemon's policy for subagent worktrees made by `devd hook claude-create` (Claude Code
keeps them and never fires WorktreeRemove): unchanged and idle ones go, as Claude removes
them natively; one with changes, new commits or a running process stays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Devd, Repo, run_git, wait_for


def create(devd: Devd, repo: Repo, name: str) -> Path:
    payload = json.dumps({"name": name, "session_id": "s", "transcript_path": "/nowhere.jsonl",
                          "cwd": str(repo.main), "hook_event_name": "WorktreeCreate"})
    done = devd.run("hook", "claude-create", input=payload, cwd=repo.main,
                    env={"CLAUDE_PROJECT_DIR": str(repo.main)})
    path = Path(done.stdout.strip())
    wait_for(lambda: devd.worktree(path)["state"] == "ready", timeout=60, what="provisioned")
    return path


def test_only_unchanged_idle_agent_worktrees_are_removed(devd: Devd, repo: Repo) -> None:
    # Swept in path order: once the last one is gone, every other one has been looked at.
    unchanged = create(devd, repo, "agent-afb2c3d4e5f6a7b8c")
    edited = create(devd, repo, "agent-a2b2c3d4e5f6a7b8c")
    committed = create(devd, repo, "agent-a3b2c3d4e5f6a7b8c")
    busy = create(devd, repo, "agent-a4b2c3d4e5f6a7b8c")
    # In use from elsewhere: a file held open by a process whose cwd is not there, and a
    # shell cd'd into a subdirectory; and one with a new untracked file.
    held = create(devd, repo, "agent-a6b2c3d4e5f6a7b8c")
    nested = create(devd, repo, "agent-a7b2c3d4e5f6a7b8c")
    untracked = create(devd, repo, "agent-a8b2c3d4e5f6a7b8c")
    (nested / "sub").mkdir()
    (untracked / "notes.txt").write_text("mine")
    # A session's own worktree is Claude's to remove, even named like an agent's.
    session = create(devd, repo, "agent-a5")
    (edited / "README.md").write_text("changed\n")
    (committed / "new.txt").write_text("x")
    run_git(committed, "add", "new.txt")
    run_git(committed, "commit", "-qm", "agent's work")
    sleep = [sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); time.sleep(120)"]
    sleepers = [subprocess.Popen([*sleep, str(path / "README.md")], cwd=cwd)
                for path, cwd in ((busy, busy), (held, repo.main), (nested, nested / "sub"))]
    try:
        assert (unchanged / ".env").exists()  # devd's own file does not count as a change
        devd.stop()
        devd.env["DEVD_CLAUDE_AGENT_GRACE"] = "0"
        devd.start()
        # Its branch goes before devd releases it: wait for the release, the last step.
        wait_for(lambda: "worktree-agent-afb2" not in run_git(repo.main, "branch") and
                 str(unchanged) not in {w["path"] for w in devd.status()["worktrees"]},
                 what="the daemon to remove and release the unchanged agent worktree")
        assert not unchanged.exists()
        assert all(p.is_dir() for p in (edited, committed, busy, session, held, nested,
                                         untracked))
        branches = run_git(repo.main, "branch")
        assert "worktree-agent-afb2" not in branches and "worktree-agent-a2b2" in branches
        registered = {w["path"] for w in devd.status()["worktrees"]}
        assert str(unchanged) not in registered and str(busy) in registered  # released
        assert "removed unchanged Claude Code agent worktree" in devd.log()
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
