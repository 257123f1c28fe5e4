"""Hostile input to devd's Claude Code hooks: paths Claude never sends, names it never makes,
agent worktrees someone started using. Each must be refused or kept, never deleted."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from devd import dotenv
from devd.claude import env_script, own_checkout_only
from devd.errors import ConfigError, DevdError
from devd.settings import load_repo_config
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

    # A session started in a subdirectory (`cd web && claude`) still gets its worktree's env.
    envfile = tmp_path / "claude-env.sh"
    done = devd.run("hook", "claude-env", input=json.dumps({"cwd": str(repo.main / "sub")}),
                    cwd=repo.main / "sub", check=False,
                    env={"CLAUDE_PROJECT_DIR": str(repo.main / "sub"),
                         "CLAUDE_ENV_FILE": str(envfile)})
    assert done.returncode == 0 and "PORT=" in done.stdout, done.stderr
    assert "export PORT=" in envfile.read_text()



def test_env_script_takes_paths_and_values_literally(tmp_path: Path) -> None:
    """Claude sources the script in the user's shell before every Bash command: a path with
    quotes, `$(...)`, a newline or glob characters is data, /x/wt never matches /x/wt2, and a
    checkout nested in a worktree never gets that worktree's PORT."""
    pwned = tmp_path / "pwned"
    hostile = tmp_path / f"it's $(touch {pwned}) `touch {pwned}`\n[a]*"
    wt, wt2 = tmp_path / "wt", tmp_path / "wt2"
    nested = wt / "sub" / "checkout"  # a worktree or submodule kept inside wt
    nested.mkdir(parents=True)
    (nested / ".git").write_text("gitdir: /elsewhere\n")
    script = env_script([
        (hostile, own_checkout_only(hostile, f"export A={shlex.quote(f'$(touch {pwned})')}",
                                    "A=no")),
        (wt, own_checkout_only(wt, "export A=wt", "export A=nested")),
        (wt2, "export A=wt2")])
    for shell in ("sh", "bash"):
        for cwd, expected in ((hostile / "sub", f"$(touch {pwned})"), (wt, "wt"),
                              (wt / "sub", "wt"), (nested / "src", "nested"),
                              (wt2 / "deep", "wt2"), (tmp_path / "wt3", "")):
            cwd.mkdir(parents=True, exist_ok=True)
            done = subprocess.run([shell, "-c", f'{script}\nprintf %s "$A"'], cwd=cwd,
                                  env={"PATH": os.environ["PATH"], "PWD": str(cwd)},
                                  capture_output=True, text=True, check=True)
            assert done.stdout == expected, (shell, cwd)
    assert not pwned.exists()


def test_a_trailing_newline_is_no_name_and_no_bare_value(tmp_path: Path) -> None:
    """`$` matches before a final newline: a devd.toml name "web\\n" would become an
    `export PORT_WEB\\n=...` in every Bash command, a value "/x/wt\\n" a .env line naming
    the worktree /x/wt."""
    for toml in ('[ports]\nnames = ["web\\n"]\n', '[cache]\nenv = ["FOO\\n"]\n',
                 '[containers."redis\\n"]\npreset = "redis"\n'):
        (tmp_path / "devd.toml").write_text(toml)
        with pytest.raises(ConfigError):
            load_repo_config(tmp_path)
    with pytest.raises(DevdError, match="U\\+000A"):
        dotenv.render({"DEVD_WORKTREE": "/x/wt\n"})


def test_a_name_deleted_by_hand_is_reused(devd_home: Devd, repo: Repo) -> None:
    """`rm -rf` of a worktree leaves git's record, which would refuse the name for good."""
    payload = json.dumps({"name": "again"})
    first = devd_home.run("hook", "claude-create", input=payload, cwd=repo.main,
                          env={"CLAUDE_PROJECT_DIR": str(repo.main)})
    path = Path(first.stdout.strip())
    shutil.rmtree(path)
    again = devd_home.run("hook", "claude-create", input=payload, cwd=repo.main, check=False,
                          env={"CLAUDE_PROJECT_DIR": str(repo.main)})
    assert again.returncode == 0 and again.stdout == f"{path}\n", again.stderr
    assert (path / "README.md").is_file()
