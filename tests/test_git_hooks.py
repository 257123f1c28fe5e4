"""git hooks in real repos: husky 9, lefthook and pre-commit (the real tools), orphan-branch
checkouts and the main worktree, a global core.hooksPath, and `--no-checkout` worktrees the
daemon's reconcile finds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devd import hooks
from tests.conftest import Devd, Repo, run_git, wait_for
from tests.pgsupport import unavailable
from tests.test_hooks import ZEROS, git, hook_of, shim  # noqa: F401 - shim is a fixture

NO_DEPS = '[ports]\nnames = ["web"]\n[deps]\nnode = "none"\npython = "none"\n'


@pytest.fixture(scope="session")
def npm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One npm cache per session: the registry is asked once per package."""
    if shutil.which("npm") is None:
        unavailable("npm is not installed")
    return tmp_path_factory.mktemp("npm-cache")


def npm(cwd: Path, cache: Path, *args: str, env: dict[str, str]) -> None:
    subprocess.run(["npm", *args, "--cache", str(cache), "--prefer-offline", "--no-audit",
                    "--no-fund", "--loglevel=error"], cwd=cwd, env=env, check=True,
                   capture_output=True, timeout=300)


def recorder(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose `devd` only writes down where it was called (no daemon needed)."""
    bin_dir, calls = tmp_path / "rec-bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "devd").write_text(f'#!/bin/sh\necho "$PWD $*" >> {calls}\n')
    (bin_dir / "devd").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}, calls


def test_only_a_new_linked_worktree_counts(devd_home: Devd, repo: Repo, tmp_path: Path) -> None:
    linked = repo.worktree("linked", "linked")
    devd_home.run("hook", "install", "--git", str(repo.main))
    env, calls = recorder(tmp_path)
    for cwd, branch in ((repo.main, "main"), (linked, "linked")):
        # Leaving an orphan (unborn) branch: the previous HEAD is all zeros, as for a new
        # worktree, in the main worktree and in an old linked one.
        git(cwd, "checkout", "-q", "--orphan", f"unborn-{cwd.name}", env=env)
        git(cwd, "checkout", "-q", branch, env=env)
    new = repo.main.parent / "new"
    git(repo.main, "worktree", "add", "-q", "-b", "new", str(new), env=env)
    # The line, not the file: `echo >> calls` creates the file before it writes.
    wait_for(lambda: calls.exists() and calls.read_text().endswith("\n"),
             what="the hook to call devd for the new worktree")
    assert calls.read_text().splitlines() == [f"{new} provision --background ."]
    # The same rules for hook managers' `devd hook post-checkout`.
    assert [hooks.is_new_worktree(ZEROS, p) for p in (repo.main, linked, new)] \
        == [False, False, True]
    assert not hooks.is_new_worktree("1" * 40, new)


def test_a_fifo_for_a_head_log_never_holds_git_up(devd_home: Devd, repo: Repo,
                                                  tmp_path: Path) -> None:
    new = repo.worktree("fifo", "fifo")
    head_log = Path(run_git(new, "rev-parse", "--absolute-git-dir").strip()) / "logs" / "HEAD"
    head_log.unlink()
    os.mkfifo(head_log)  # nothing ever writes it: a read would block for good
    devd_home.run("hook", "install", "--git", str(repo.main))
    env, calls = recorder(tmp_path)
    subprocess.run([str(hook_of(repo)), ZEROS, "abc", "1"], cwd=new, env=env, check=True,
                   timeout=30)
    assert hooks.is_new_worktree(ZEROS, new)  # returns: the FIFO is not read
    wait_for(calls.exists, what="the hook to call devd")


def test_husky_9_keeps_provisioning_after_npm_install(devd: Devd, make_repo, npm_cache: Path,
                                                      shim: dict[str, str]) -> None:  # noqa: F811
    repo = make_repo("hus", NO_DEPS)
    (repo.main / "package.json").write_text(json.dumps(
        {"name": "hus", "private": True, "scripts": {"prepare": "husky"},
         "devDependencies": {"husky": "^9"}}))
    npm(repo.main, npm_cache, "install", env=shim)  # prepare: husky sets core.hooksPath
    assert run_git(repo.main, "config", "core.hooksPath").strip() == ".husky/_"
    generated = (repo.main / ".husky" / "_" / "post-checkout").read_text()
    out = devd.run("hook", "install", "--git", str(repo.main)).stdout
    assert f"wrote {repo.main / '.husky' / 'post-checkout'}" in out and "husky runs it" in out
    assert (repo.main / ".husky" / "_" / "post-checkout").read_text() == generated
    repo.commit({".gitignore": ".env\nnode_modules\n"}, "husky")
    npm(repo.main, npm_cache, "install", env=shim)  # husky writes .husky/_ anew
    path = repo.main.parent / "hus-feat"
    git(repo.main, "worktree", "add", "-q", "-b", "feat", str(path), env=shim)
    assert devd.json("wait", str(path), "--timeout", "120")["state"] == "ready"
    assert "devd hook install" in (repo.main / ".husky" / "post-checkout").read_text()


def test_an_existing_husky_hook_keeps_its_lines_and_mode(devd_home: Devd, repo: Repo) -> None:
    run_git(repo.main, "config", "core.hooksPath", ".husky/_")
    mine = repo.main / ".husky" / "post-checkout"
    mine.parent.mkdir()
    mine.write_text("npm run build-types\n")  # husky 9 style: no shebang, not executable
    mine.chmod(0o644)
    devd_home.run("hook", "install", "--git", str(repo.main))
    text = mine.read_text()
    assert text.startswith("# >>> devd") and text.endswith("npm run build-types\n")
    assert mine.stat().st_mode & 0o777 == 0o644
    assert not (repo.main / ".husky" / "_").exists()


def test_lefthook_hook_is_refused_with_the_config_that_works(devd: Devd, make_repo,
                                                             npm_cache: Path,
                                                             shim: dict[str, str]  # noqa: F811
                                                             ) -> None:
    repo = make_repo("lh", NO_DEPS)
    (repo.main / "package.json").write_text(json.dumps({"name": "lh", "private": True}))
    npm(repo.main, npm_cache, "install", "--save-dev", "lefthook", env=shim)
    lefthook = str(repo.main / "node_modules" / ".bin" / "lefthook")
    (repo.main / "lefthook.yml").write_text("post-checkout:\n  commands:\n    hi:\n"
                                            "      run: echo hi\n")
    subprocess.run([lefthook, "install"], cwd=repo.main, env=shim, check=True,
                   capture_output=True)
    before = hook_of(repo).read_text()
    refused = devd.run("hook", "install", "--git", str(repo.main), check=False)
    assert refused.returncode == 1 and "generated by lefthook" in refused.stderr
    assert hook_of(repo).read_text() == before
    assert "run: devd hook post-checkout {0}" in refused.stderr
    # What the hint says, done: lefthook calls devd, and the new worktree is provisioned.
    (repo.main / "lefthook.yml").write_text("post-checkout:\n  commands:\n    devd:\n"
                                            "      run: devd hook post-checkout {0}\n")
    repo.commit({".gitignore": ".env\nnode_modules\n"}, "lefthook")
    subprocess.run([lefthook, "install"], cwd=repo.main, env=shim, check=True,
                   capture_output=True)
    path = repo.main.parent / "lh-feat"
    git(repo.main, "worktree", "add", "-q", "-b", "feat", str(path), env=shim)
    assert devd.json("wait", str(path), "--timeout", "120")["state"] == "ready"


def test_pre_commit_hook_is_refused_with_the_config_that_works(devd: Devd, make_repo,
                                                               tmp_path: Path,
                                                               shim: dict[str, str]  # noqa: F811
                                                               ) -> None:
    pre_commit = shutil.which("pre-commit", path=str(Path(sys.executable).parent))
    if pre_commit is None:
        unavailable("pre-commit is not installed (pip install pre-commit)")
    env = {**shim, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home")}
    repo = make_repo("pc", NO_DEPS)
    subprocess.run([pre_commit, "install", "--hook-type", "post-checkout"], cwd=repo.main,
                   env=env, check=True, capture_output=True)
    refused = devd.run("hook", "install", "--git", str(repo.main), check=False)
    assert refused.returncode == 1 and "generated by pre-commit" in refused.stderr
    config = refused.stderr.split("add to .pre-commit-config.yaml:\n", 1)[1]
    config = config.split("then run", 1)[0].replace("hint: ", "")
    repo.commit({".pre-commit-config.yaml": "repos:\n" + config}, "pre-commit")
    path = repo.main.parent / "pc-feat"
    git(repo.main, "worktree", "add", "-q", "-b", "feat", str(path), env=env)
    assert devd.json("wait", str(path), "--timeout", "120")["state"] == "ready"


def test_global_hooks_path_needs_the_flag(devd_home: Devd, repo: Repo, tmp_path: Path) -> None:
    shared = tmp_path / "global-hooks"
    config = tmp_path / "gitconfig"
    config.write_text(f"[core]\n\thooksPath = {shared}\n")
    env = {"GIT_CONFIG_GLOBAL": str(config)}
    refused = devd_home.run("hook", "install", "--git", str(repo.main), env=env, check=False)
    assert refused.returncode == 1 and "global git config" in refused.stderr
    assert "--global-hooks-path" in refused.stderr and not shared.exists()
    devd_home.run("hook", "install", "--git", "--global-hooks-path", str(repo.main), env=env)
    assert "devd hook install" in (shared / "post-checkout").read_text()


def test_no_checkout_worktrees_are_found_when_the_repo_opts_in(devd: Devd, make_repo) -> None:
    quiet = make_repo("quiet", NO_DEPS)
    eager = make_repo("eager", NO_DEPS + "[hooks]\nprovision_on_discover = true\n")
    for repo in (quiet, eager):
        devd.run("provision", str(repo.main))  # the daemon knows the repo
    run_git(quiet.main, "worktree", "add", "-q", "--no-checkout", "-b", "q",
            str(quiet.main.parent / "quiet-nc"))
    found = eager.main.parent / "eager-nc"
    run_git(eager.main, "worktree", "add", "-q", "--no-checkout", "-b", "e", str(found))
    wait_for(lambda: str(found) in {w["path"] for w in devd.status()["worktrees"]},
             what="reconcile to find the --no-checkout worktree")
    assert devd.json("wait", str(found), "--timeout", "60")["state"] == "ready"
    # The reconcile that found it ran after the quiet repo's worktree was made, too.
    paths = {w["path"] for w in devd.status()["worktrees"]}
    assert str(quiet.main.parent / "quiet-nc") not in paths
