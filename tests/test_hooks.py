"""Hooks with real git, a real daemon and the Claude Code contract run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Devd, Repo, devd_shim, run_git, wait_for

ZEROS = "0" * 40


@pytest.fixture
def shim(tmp_path: Path, devd_home: Devd) -> dict[str, str]:
    """devd_home.env with a `devd` on PATH that runs this checkout: what the hooks call."""
    bin_dir = devd_shim(tmp_path / "bin")
    return {**devd_home.env, "PATH": f"{bin_dir}:{devd_home.env['PATH']}"}


def git(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(cwd), *args], env=env, capture_output=True,
                          text=True, timeout=60, check=True)


def hook_of(repo: Repo) -> Path:
    return repo.main / ".git" / "hooks" / "post-checkout"


# -- git ---------------------------------------------------------------------------


def test_git_worktree_add_is_provisioned_and_removal_noticed(devd: Devd, repo: Repo,
                                                              shim: dict[str, str]) -> None:
    assert "wrote" in devd.run("hook", "install", "--git", str(repo.main)).stdout
    path = repo.main.parent / "feat"
    git(repo.main, "worktree", "add", "-q", "-b", "feat", str(path), env=shim)
    waited = json.loads(devd.run("wait", str(path), "--json", "--timeout", "120").stdout)
    assert waited["state"] == "ready" and waited["path"] == str(path.resolve())
    assert set(waited["ports"]) == {"web", "api"}
    assert "PORT_WEB=" in (path / ".env").read_text()
    git(repo.main, "worktree", "remove", str(path), env=shim)
    wait_for(lambda: devd.worktree(path.resolve())["state"] == "gone",
             what="the daemon to notice the removal")


def test_hook_is_fast_and_never_fails_git(devd_home: Devd, repo: Repo, shim: dict[str, str],
                                          tmp_path: Path) -> None:
    fresh = repo.worktree("fresh")  # before the hook: its first checkout is the one timed
    devd_home.run("hook", "install", "--git", str(repo.main))
    hook = hook_of(repo)
    no_devd = {**shim, "PATH": "/usr/bin:/bin"}
    assert subprocess.run(["sh", "-c", "command -v devd"], env=no_devd).returncode != 0
    timings = {}
    for label, env in (("daemon down", shim), ("devd not on PATH", no_devd)):
        start = time.perf_counter()
        result = subprocess.run([str(hook), ZEROS, "abc", "1"], cwd=fresh, env=env,
                                capture_output=True, timeout=30)
        timings[label] = time.perf_counter() - start
        assert result.returncode == 0 and result.stdout == b""
        # Quiet when devd is there; one line saying so when it is gone from PATH.
        expected = b"not on PATH" if env is no_devd else b""
        assert (expected in result.stderr) if expected else result.stderr == b""
    print("\npost-checkout hook wall time: "
          + ", ".join(f"{k}: {v * 1000:.1f} ms" for k, v in timings.items()))
    # Neither a daemon that is down nor a missing devd fails or blocks git.
    for env in (shim, no_devd):
        name = f"wt-{len(list(tmp_path.iterdir()))}"
        git(repo.main, "worktree", "add", "-q", "--detach", str(tmp_path / name), env=env)
    assert not devd_home.paths.socket.exists(), "DEVD_NO_AUTOSTART=1 must keep it down"


def test_hook_runs_only_for_a_new_worktree(devd: Devd, repo: Repo,
                                           shim: dict[str, str]) -> None:
    devd.run("hook", "install", "--git", str(repo.main))
    git(repo.main, "checkout", "-q", "-b", "other", env=shim)  # previous HEAD is not zeros
    time.sleep(1.0)  # give a (wrongly) started provision time to register
    assert devd.status()["worktrees"] == []


def test_existing_hook_is_chained_never_overwritten(devd: Devd, repo: Repo,
                                                    shim: dict[str, str]) -> None:
    hook = hook_of(repo)
    mine = "#!/bin/bash\necho \"$1\" >> \"$(git rev-parse --git-common-dir)/mine.log\"\nexit 0\n"
    hook.write_text(mine)
    hook.chmod(0o750)
    assert "added devd" in devd.run("hook", "install", "--git", str(repo.main)).stdout
    text = hook.read_text()
    assert text.startswith("#!/bin/bash\n# >>> devd:") and text.endswith(mine.split("\n", 1)[1])
    assert hook.stat().st_mode & 0o777 == 0o750
    assert "already runs devd" in devd.run("hook", "install", "--git", str(repo.main)).stdout
    assert hook.read_text() == text
    path = repo.main.parent / "chained"
    git(repo.main, "worktree", "add", "-q", "-b", "chained", str(path), env=shim)
    assert (repo.main / ".git" / "mine.log").read_text() == f"{ZEROS}\n"
    assert json.loads(devd.run("wait", str(path), "--json").stdout)["state"] == "ready"


def test_non_shell_hook_is_refused_untouched(devd_home: Devd, repo: Repo) -> None:
    hook = hook_of(repo)
    hook.write_text("#!/usr/bin/env python3\nprint('mine')\n")
    hook.chmod(0o755)
    result = devd_home.run("hook", "install", "--git", str(repo.main), check=False)
    assert result.returncode == 1 and "python3 script" in result.stderr
    assert hook.read_text() == "#!/usr/bin/env python3\nprint('mine')\n"


def test_core_hooks_path_is_honoured(devd_home: Devd, repo: Repo) -> None:
    run_git(repo.main, "config", "core.hooksPath", ".githooks")
    devd_home.run("hook", "install", "--git", str(repo.main))
    assert os.access(repo.main / ".githooks" / "post-checkout", os.X_OK)
    assert not hook_of(repo).exists()


# -- Claude Code ---------------------------------------------------------------------------


def claude(devd_home: Devd, hook: str, payload: str, project: Path, cwd: Path,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return devd_home.run("hook", hook, check=False, input=payload, cwd=cwd,
                         env={"CLAUDE_PROJECT_DIR": str(project), **(env or {})})


def test_claude_create_and_remove(devd: Devd, make_repo, tmp_path: Path) -> None:
    repo = make_repo(devd_toml='[ports]\nnames = ["web"]\n')
    repo.commit({".worktreeinclude": "secrets.json\n", ".gitignore": ".env\nsecrets.json\n"})
    (repo.main / "secrets.json").write_text('{"token": "t"}')
    payload = json.dumps({"session_id": "s1", "transcript_path": "/x", "cwd": str(repo.main),
                          "hook_event_name": "WorktreeCreate", "name": "feat-x",
                          "something_new": {"ignored": True}})
    result = claude(devd, "claude-create", payload, repo.main, cwd=tmp_path)
    path = repo.main / ".claude" / "worktrees" / "feat-x"
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}\n"
    # Files the agent may read at once are there when the hook returns.
    assert (path / "secrets.json").read_text() == '{"token": "t"}'
    assert run_git(path, "branch", "--show-current").strip() == "worktree-feat-x"
    assert json.loads(devd.run("wait", str(path), "--json").stdout)["state"] == "ready"
    removal = json.dumps({"hook_event_name": "WorktreeRemove", "worktree_path": str(path)})
    result = claude(devd, "claude-remove", removal, repo.main, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == ""
    assert "released" in result.stderr and not path.exists()
    assert all(w["path"] != str(path) for w in devd.status()["worktrees"])


def test_claude_create_honours_worktree_dir(devd: Devd, make_repo, tmp_path: Path) -> None:
    repo = make_repo(devd_toml='[claude]\nworktree_dir = "../agents"\n')
    result = claude(devd, "claude-create", '{"name": "a1"}', repo.main, cwd=tmp_path)
    path = repo.main.parent / "agents" / "a1"
    assert result.returncode == 0 and result.stdout == f"{path}\n", result.stderr
    assert json.loads(devd.run("wait", str(path), "--json").stdout)["state"] == "ready"


# Claude's own rules (64 characters, '/'-separated segments of [A-Za-z0-9._-], no '.', '..'
# or '.git' segment) plus what git refuses in a branch name.
BAD_INPUT = ["", "not json", "[1]", "{}", '{"name": ""}', '{"name": 3}', '{"name": "a//b"}',
             '{"name": ".."}', '{"name": "a/../b"}', '{"name": "a/.git"}', '{"name": "a..b"}',
             '{"name": "has space"}', json.dumps({"name": "x" * 65}), '{"name": "x.lock"}',
             '{"name": "/abs"}', '{"name": "a/"}', '{"name": "caf\u00e9"}']


@pytest.mark.parametrize("payload", BAD_INPUT)
def test_claude_create_rejects_bad_input_without_side_effects(devd_home: Devd, repo: Repo,
                                                              payload: str) -> None:
    before = run_git(repo.main, "worktree", "list"), run_git(repo.main, "branch")
    result = claude(devd_home, "claude-create", payload, repo.main, cwd=repo.main)
    assert result.returncode == 2 and result.stdout == "" and "devd: error:" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (repo.main / ".claude").exists()
    assert (run_git(repo.main, "worktree", "list"), run_git(repo.main, "branch")) == before


def test_claude_create_refusals(devd_home: Devd, repo: Repo, tmp_path: Path) -> None:
    not_git = tmp_path / "plain"
    not_git.mkdir()
    result = claude(devd_home, "claude-create", '{"name": "a"}', not_git, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == "" and "git" in result.stderr
    taken = repo.main / ".claude" / "worktrees" / "taken"
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("mine")
    result = claude(devd_home, "claude-create", '{"name": "taken"}', repo.main, cwd=tmp_path)
    assert result.returncode == 2 and "is not a worktree" in result.stderr
    assert (taken / "keep.txt").read_text() == "mine"


def test_claude_create_without_daemon_still_creates(devd_home: Devd, repo: Repo,
                                                     tmp_path: Path) -> None:
    """DEVD_NO_AUTOSTART and no daemon: the agent still gets its worktree, with a warning."""
    result = claude(devd_home, "claude-create", '{"worktree_name": "old-style"}', repo.main,
                    cwd=tmp_path)
    path = repo.main / ".claude" / "worktrees" / "old-style"
    assert result.returncode == 0 and result.stdout == f"{path}\n"
    assert "not provisioned yet" in result.stderr and path.is_dir()


@pytest.mark.parametrize(("payload", "code"), [
    ("", 2), ("garbage", 2), ('{"worktree_path": "relative/path"}', 2), ("{}", 2),
    ('{"worktree_path": "/nonexistent/devd-test"}', 0)])  # already gone: removed
def test_claude_remove_exit_codes_say_whether_it_is_gone(devd_home: Devd, repo: Repo,
                                                         payload: str, code: int) -> None:
    result = claude(devd_home, "claude-remove", payload, repo.main, cwd=repo.main)
    assert result.returncode == code and result.stdout == ""
    assert result.stderr and "Traceback" not in result.stderr  # says what it did, or why not


def test_claude_remove_fails_while_git_keeps_the_worktree(devd: Devd, repo: Repo,
                                                          tmp_path: Path) -> None:
    """Claude keeps a worktree whose WorktreeRemove hook fails, and shows its stderr."""
    created = claude(devd, "claude-create", '{"name": "locked"}', repo.main, cwd=tmp_path)
    path = Path(created.stdout.strip())
    run_git(repo.main, "worktree", "lock", str(path))  # --force then refuses to remove it
    payload = json.dumps({"worktree_path": str(path)})
    result = claude(devd, "claude-remove", payload, repo.main, cwd=tmp_path)
    assert result.returncode == 1 and "git could not remove" in result.stderr
    assert path.is_dir() and "Traceback" not in result.stderr
    # git goes first: the worktree it keeps keeps its ports (still registered).
    assert str(path) in {w["path"] for w in devd.status()["worktrees"]}
    run_git(repo.main, "worktree", "unlock", str(path))
    result = claude(devd, "claude-remove", payload, repo.main, cwd=tmp_path)
    assert result.returncode == 0 and not path.exists()
    assert "worktree-locked" not in run_git(repo.main, "branch")  # deleted, as Claude does


def test_claude_create_resumes_and_reuses_names(devd: Devd, repo: Repo, tmp_path: Path) -> None:
    first = claude(devd, "claude-create", '{"name": "team/feat"}', repo.main, cwd=tmp_path)
    path = repo.main / ".claude" / "worktrees" / "team+feat"
    assert first.returncode == 0 and first.stdout == f"{path}\n", first.stderr
    (path / "work.txt").write_text("mine")
    again = claude(devd, "claude-create", '{"name": "team/feat"}', repo.main, cwd=tmp_path)
    assert again.stdout == f"{path}\n" and "resuming" in again.stderr
    assert (path / "work.txt").read_text() == "mine"
    run_git(repo.main, "worktree", "remove", "--force", str(path))  # the branch stays
    reused = claude(devd, "claude-create", '{"name": "team/feat"}', repo.main, cwd=tmp_path)
    assert reused.returncode == 0 and not (path / "work.txt").exists(), reused.stderr
    assert run_git(path, "branch", "--show-current").strip() == "worktree-team+feat"


def test_claude_create_refuses_a_missing_pr(devd_home: Devd, repo: Repo) -> None:
    result = claude(devd_home, "claude-create", '{"name": "pr-12"}', repo.main, cwd=repo.main)
    assert result.returncode == 1 and "Failed to fetch PR #12" in result.stderr
    assert "worktree-pr-12" not in run_git(repo.main, "branch")


def test_claude_remove_with_daemon_down_still_removes(devd_home: Devd, repo: Repo) -> None:
    path = repo.worktree("doomed", "doomed")
    payload = json.dumps({"worktree_path": str(path)})
    result = claude(devd_home, "claude-remove", payload, repo.main, cwd=repo.main)
    assert result.returncode == 0 and not path.exists()  # gc frees what devd held
    assert "could not release" in result.stderr


def test_install_claude_merges_settings(devd_home: Devd, repo: Repo) -> None:
    target = repo.main / ".claude" / "settings.json"
    target.parent.mkdir()
    mine = {"permissions": {"allow": ["Bash(ls)"]}, "model": "x",
            "hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": [
                {"type": "command", "command": "echo hi"}]}],
                "WorktreeRemove": [{"hooks": [{"type": "command", "command": "my-cleanup"}]}]}}
    target.write_text(json.dumps(mine))
    devd_home.run("hook", "install", "--claude", str(repo.main))
    merged = json.loads(target.read_text())
    assert merged["permissions"] == mine["permissions"] and merged["model"] == "x"
    assert merged["hooks"]["PreToolUse"] == mine["hooks"]["PreToolUse"]
    assert merged["hooks"]["WorktreeCreate"] == [
        {"hooks": [{"type": "command", "command": "devd hook claude-create"}]}]
    assert [g["hooks"][0]["command"] for g in merged["hooks"]["WorktreeRemove"]] == [
        "my-cleanup", "devd hook claude-remove"]
    assert merged["hooks"]["SessionStart"] == [
        {"hooks": [{"type": "command", "command": "devd hook claude-env"}]}]
    text = target.read_text()
    assert "already calls devd" in devd_home.run("hook", "install", "--claude",
                                                 str(repo.main)).stdout
    assert target.read_text() == text


def test_install_claude_upgrades_the_old_remove_command(devd_home: Devd, repo: Repo) -> None:
    """Older devd installed `... || true`, which told Claude "removed" when git failed."""
    target = repo.main / ".claude" / "settings.json"
    target.parent.mkdir()
    target.write_text(json.dumps({"hooks": {"WorktreeRemove": [{"hooks": [
        {"type": "command", "command": "devd hook claude-remove || true"}]}]}}))
    devd_home.run("hook", "install", "--claude", str(repo.main))
    commands = [h["command"] for g in json.loads(target.read_text())["hooks"]["WorktreeRemove"]
                for h in g["hooks"]]
    assert commands == ["devd hook claude-remove"]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"hooks": {"WorktreeCreate": [
    {"hooks": [{"type": "command", "command": "wt-create"}]}]}})])
def test_install_claude_refuses_to_clobber(devd_home: Devd, repo: Repo, content: str) -> None:
    target = repo.main / ".claude" / "settings.json"
    target.parent.mkdir()
    target.write_text(content)
    result = devd_home.run("hook", "install", "--claude", str(repo.main), check=False)
    assert result.returncode in (1, 2) and result.stderr
    assert target.read_text() == content


def test_hook_install_needs_a_choice(devd_home: Devd, repo: Repo) -> None:
    result = devd_home.run("hook", "install", str(repo.main), check=False)
    assert result.returncode == 2 and "--git --claude" in result.stderr


def test_wait_for_an_unregistered_worktree_fails(devd: Devd, repo: Repo) -> None:
    path = repo.worktree("never", "never")
    result = devd.run("wait", str(path), "--timeout", "1", check=False)
    assert result.returncode == 1 and "not registered" in result.stderr


def test_claude_remove_of_a_path_inside_a_worktree_releases_nothing(devd: Devd, repo: Repo,
                                                                     tmp_path: Path) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    (tree / "sub").mkdir()
    payload = json.dumps({"worktree_path": str(tree / "sub")})
    result = claude(devd, "claude-remove", payload, repo.main, cwd=tmp_path)
    assert result.returncode == 1 and "not the root of a git worktree" in result.stderr
    assert devd.worktree(tree)["state"] == "ready" and tree.is_dir()


def test_skill_install_writes_an_agent_skill(devd_home: Devd, repo: Repo) -> None:
    target = repo.main / ".claude" / "skills" / "devd" / "SKILL.md"
    assert "wrote" in devd_home.run("skill", "install", str(repo.main)).stdout
    text = target.read_text()
    front, body = text.split("\n---\n", 1)
    assert front.startswith("---\nname: devd\ndescription: ") and len(front) < 1024
    for topic in ("devd ports", "devd kill-port", "DATABASE_URL", "node_modules", "Vite",
                  ".env", "DEVD_CACHE_DIR", "devd browser", "devd watchers", "devd up",
                  "devd logs"):
        assert topic in body, topic
    assert "up to date" in devd_home.run("skill", "install", str(repo.main)).stdout
    target.write_text("---\nname: mine\n---\n")
    refused = devd_home.run("skill", "install", str(repo.main), check=False)
    assert refused.returncode == 1 and "not devd's skill" in refused.stderr
    assert target.read_text() == "---\nname: mine\n---\n"


def test_installs_never_write_through_a_planted_temp_file(devd_home: Devd, repo: Repo,
                                                          tmp_path: Path) -> None:
    """A checked-in symlink where devd once named its temp file leads nowhere: the skill
    and the Claude settings are written beside it, the file it points to is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    skills = repo.main / ".claude" / "skills" / "devd"
    skills.mkdir(parents=True)
    (skills / ".SKILL.md.devd-tmp").symlink_to(victim)
    (repo.main / ".claude" / "..settings.json.devd-tmp").symlink_to(victim)
    devd_home.run("skill", "install", str(repo.main))
    devd_home.run("hook", "install", "--claude", str(repo.main))
    assert victim.read_text() == "precious\n"
    for target in (skills / "SKILL.md", repo.main / ".claude" / "settings.json"):
        assert target.is_file() and not target.is_symlink(), target


def test_claude_env_never_fails_a_session(devd_home: Devd, repo: Repo, tmp_path: Path) -> None:
    """SessionStart: a bad call is one line and a status; no repo, or no daemon, is no
    failure (stdout tells the model what it lacks)."""
    env_file = tmp_path / "env.sh"
    payload = json.dumps({"hook_event_name": "SessionStart", "cwd": str(repo.main)})
    missing = claude(devd_home, "claude-env", payload, repo.main, cwd=repo.main)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
    plain = tmp_path / "plain"
    plain.mkdir()
    outside = claude(devd_home, "claude-env", json.dumps({"cwd": str(plain)}), plain,
                     cwd=plain, env={"CLAUDE_ENV_FILE": str(env_file)})
    assert outside.returncode == 0 and outside.stdout.strip() == "" and not env_file.exists()
    tree = repo.worktree("shop-a", "a")
    down = claude(devd_home, "claude-env", json.dumps({"cwd": str(tree)}), repo.main,
                  cwd=tree, env={"CLAUDE_ENV_FILE": str(env_file)})
    assert down.returncode == 0 and "could not load" in down.stdout, down.stderr
    script = env_file.read_text()  # later worktrees still get theirs through `devd env`
    assert "devd env" in script and "export PORT" not in script
    assert subprocess.run(["sh", "-n", str(env_file)]).returncode == 0
