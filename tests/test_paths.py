"""Hostile worktree paths: devd names them exactly or refuses, and writes nowhere else."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Devd, Repo, run_git


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, to prove nothing was created or changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


def _hostile_worktree(repo: Repo, name: str) -> Path:
    path = repo.main.parent / name
    run_git(repo.main, "worktree", "add", "-q", "--detach", str(path))
    return path


def test_a_newline_in_a_worktree_path_never_reaches_the_directory_before_it(
        devd: Devd, repo: Repo) -> None:
    (repo.main / ".env").write_text("SECRET=from-main\n")
    victim = repo.main.parent / "victim"
    victim.mkdir()
    (victim / ".env").write_bytes(b"THEIRS=1\n")
    before = _snapshot(victim)
    tree = _hostile_worktree(repo, "victim\nwt")
    alias = repo.main.parent / "alias"  # a symlink's own path has no newline
    alias.symlink_to(tree)
    for target in (tree, alias, tree / "README.md"):
        result = devd.run("provision", str(target), "--json", check=False)
        assert result.returncode == 1, result.stdout
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "unrepresentable_path" and "newline" in error["message"]
    assert _snapshot(victim) == before
    assert not (tree / ".env").exists()
    assert devd.status()["worktrees"] == []
    assert not list((devd.paths.cache_dir).rglob("*victim*"))


def test_a_path_that_is_not_utf8_is_refused_clearly(devd: Devd, repo: Repo) -> None:
    name = os.fsdecode(b"shop-caf\xe9")
    tree = _hostile_worktree(repo, name)
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1
    assert "is not valid UTF-8" in result.stderr and "\\udce9" in result.stderr
    assert not (tree / ".env").exists() and devd.status()["worktrees"] == []


@pytest.mark.parametrize("name", ["wt'$(touch PWNED)'", "wt$(touch PWNED)`touch PWNED`",
                                  "wt;touch PWNED ", " wt\\\"$HOME"])
def test_shell_syntax_in_a_worktree_path_is_only_ever_a_name(devd: Devd, repo: Repo,
                                                            name: str) -> None:
    from dotenv import dotenv_values

    tree = _hostile_worktree(repo, name)
    provisioned = devd.run("provision", str(tree), check=False)
    entry = devd.worktree(tree)
    written = dotenv_values(tree / ".env", interpolate=False)
    if "'" in name and "$" in name:
        # No .env spelling reads back the same in every loader: refused loudly, not guessed.
        assert provisioned.returncode == 1 and "DEVD_WORKTREE" in provisioned.stderr
        assert entry["path"] == str(tree) and "DEVD_WORKTREE" not in written
    else:
        assert provisioned.returncode == 0, provisioned.stderr
        assert entry["path"] == str(tree) and entry["state"] == "ready"
        assert written["DEVD_WORKTREE"] == str(tree)
    ran = devd.run("run", "--path", str(tree), "--", "printenv", "DEVD_WORKTREE")
    assert ran.stdout == f"{tree}\n"
    devd.run("release", str(tree))
    assert not list(repo.main.parent.rglob("PWNED")) and not list(devd.home.rglob("PWNED"))
    assert not Path("PWNED").exists()


def test_a_path_ending_in_a_space_is_kept_exactly(devd: Devd, repo: Repo) -> None:
    tree = _hostile_worktree(repo, "shop b ")
    (repo.main.parent / "shop b").mkdir()  # what a strip() would have named
    devd.run("provision", str(tree))
    assert devd.worktree(tree)["path"] == str(tree)
    assert (tree / ".env").is_file() and not list((repo.main.parent / "shop b").iterdir())


def test_a_git_that_names_a_newline_path_is_caught_by_count(tmp_path: Path) -> None:
    """The library call itself, from inside the worktree (no symlink, no CLI in between)."""
    from devd import git
    from devd.errors import DevdError

    main = tmp_path / "m"
    main.mkdir()
    run_git(main, "init", "-q", "-b", "main")
    run_git(main, "commit", "-q", "--allow-empty", "-m", "i")
    tree = tmp_path / "a\nb"
    run_git(main, "worktree", "add", "-q", "--detach", str(tree))
    with pytest.raises(DevdError, match="newline"):
        git.resolve(tree)
    assert subprocess.run(["git", "-C", str(tree), "status"], capture_output=True).returncode == 0
    odd = tmp_path / os.fsdecode(b"caf\xe9")
    run_git(main, "worktree", "add", "-q", "--detach", str(odd))
    with pytest.raises(DevdError, match="not valid UTF-8"):
        git.resolve(odd)


def test_a_new_user_without_a_cache_dir_gets_one(devd_home: Devd, repo: Repo,
                                                tmp_path: Path) -> None:
    """A fresh account has no ~/.cache (nor ~/.local/share): provisioning makes them, after
    checking the levels above that exist (found by the Debian walkthrough)."""
    home = tmp_path / "newcomer"
    home.mkdir()
    devd_home.env["DEVD_HOME"] = ""  # empty: the default dirs (and the fixture finds it)
    devd_home.env.update({"HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run")})
    for name in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        devd_home.env.pop(name, None)
    devd_home.home = tmp_path  # where the test keeps the daemon's output
    tree = repo.worktree("shop-a", "a")
    devd_home.start()
    devd_home.run("provision", str(tree))
    assert (home / ".cache" / "devd" / "worktrees").is_dir()
    assert (home / ".local" / "share" / "devd" / "browser-profiles").is_dir()
    assert devd_home.stop() == 0
