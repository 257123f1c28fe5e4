"""devd's own dirs: markers written atomically, empty dirs adopted, other users' dirs refused."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Devd, Repo
from pgsupport import unavailable

from devd import naming


def _dirs_of(devd: Devd, tree: Path, repo: Repo) -> tuple[Path, Path]:
    wt_id = naming.worktree_id(repo.main, tree)
    paths = devd.paths
    return paths.cache_dir / "worktrees" / wt_id, paths.data_dir / "browser-profiles" / wt_id


def _marker_owner(path: Path) -> str:
    return str(json.loads((path / ".devd-owner").read_text())["owner"])


@pytest.fixture
def full_cache(devd_home: Devd) -> Iterator[Path]:
    """DEVD_HOME's cache dir on a tiny tmpfs, filled to the last byte."""
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    cache = devd_home.paths.cache_dir
    cache.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                           str(cache)], capture_output=True, text=True)
    if done.returncode != 0:
        unavailable(f"this machine cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        (cache / "worktrees").mkdir(mode=0o700)
        with contextlib.suppress(OSError), open(cache / "filler", "wb") as handle:
            while True:
                handle.write(b"x" * 4096)
                handle.flush()
        yield cache
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_a_full_disk_between_mkdir_and_marker_leaves_a_dir_devd_adopts(
        full_cache: Path, devd_home: Devd, repo: Repo) -> None:
    devd_home.start()
    tree = repo.worktree("shop-a", "a")
    cache, _ = _dirs_of(devd_home, tree, repo)
    failed = devd_home.run("provision", str(tree), check=False)
    assert failed.returncode == 1 and "No space left on device" in failed.stderr
    assert "a devd bug" not in failed.stderr
    assert cache.is_dir() and list(cache.iterdir()) == []  # no half marker, no temp file
    devd_home.run("release", str(tree))
    assert not cache.exists(), "release left devd's own empty dir behind"
    assert devd_home.run("provision", str(tree), check=False).returncode == 1
    (full_cache / "filler").unlink()
    devd_home.run("provision", str(tree))
    assert devd_home.worktree(tree)["state"] == "ready"
    assert _marker_owner(cache) == naming.worktree_id(repo.main, tree)
    devd_home.run("release", str(tree))
    assert not cache.exists()
    devd_home.stop()


def test_an_empty_marker_left_by_a_crash_is_adopted(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    cache, profile = _dirs_of(devd, tree, repo)
    for path in (cache, profile):
        path.mkdir(parents=True, mode=0o700)
    (cache / ".devd-owner").touch()  # what the old non-atomic write left on a full disk
    (profile / "..devd-owner.k2j4.devd-tmp").write_text('{"devd": 1, "ow')  # a cut temp file
    devd.run("provision", str(tree))
    for path in (cache, profile):
        assert _marker_owner(path) == naming.worktree_id(repo.main, tree)
    assert not list(profile.glob("*.devd-tmp"))


def test_a_dir_with_content_but_an_empty_marker_is_still_not_ours(devd: Devd,
                                                                 repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    cache, _ = _dirs_of(devd, tree, repo)
    cache.mkdir(parents=True, mode=0o700)
    (cache / ".devd-owner").touch()
    (cache / "notes.txt").write_text("mine")
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "not marked as devd's" in result.stderr
    assert (cache / "notes.txt").read_text() == "mine"
    devd.run("release", str(tree))
    assert (cache / "notes.txt").read_text() == "mine"


@pytest.fixture
def other_user() -> Iterator[str]:
    """A real second OS user, removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        unavailable("a second OS user needs root and useradd")
    name = f"devdt{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def shared_home(devd_home: Devd, other_user: str) -> Iterator[Path]:
    """A DEVD_HOME both users can write (1777, like /tmp), outside root-only pytest dirs."""
    base = Path(tempfile.mkdtemp(prefix="devd-shared-", dir="/tmp"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir(mode=0o1777)
    home.chmod(0o1777)
    devd_home.env["DEVD_HOME"] = str(home)
    try:
        yield home
    finally:
        shutil.rmtree(base)


def _as(user: str, *argv: str) -> None:
    subprocess.run(["runuser", "-u", user, "--", *argv], check=True, capture_output=True)


def _plant(user: str, path: Path, owner: str) -> None:
    """What another user can do: make devd's predictable dir and a marker naming our id."""
    _as(user, "mkdir", "-p", str(path))
    _as(user, "sh", "-c", f"printf '%s\\n' '{json.dumps({'devd': 1, 'owner': owner})}' "
        f"> '{path}/.devd-owner'")


def test_dirs_planted_by_another_user_are_refused(devd_home: Devd, shared_home: Path,
                                                 other_user: str, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    cache, profile = _dirs_of(devd_home, tree, repo)
    wt_id = naming.worktree_id(repo.main, tree)
    for path in (cache, profile):
        _plant(other_user, path, wt_id)
    planted = {p: (p / ".devd-owner").read_bytes() for p in (cache, profile)}
    devd_home.start()
    result = devd_home.run("provision", str(tree), "--json", check=False)
    assert result.returncode == 1
    assert f"belongs to uid {pwd.getpwnam(other_user).pw_uid}" in result.stdout
    entry = devd_home.worktree(tree)
    assert not entry.get("cache_dir") and not entry.get("browser_profile")
    env_text = (tree / ".env").read_text() if (tree / ".env").exists() else ""
    assert str(cache) not in env_text and str(profile) not in env_text
    devd_home.run("release", str(tree))
    for path, marker in planted.items():  # refused, and left exactly as planted
        assert (path / ".devd-owner").read_bytes() == marker
        assert sorted(p.name for p in path.iterdir()) == [".devd-owner"]
    devd_home.stop()


def test_a_parent_another_user_made_is_refused(devd_home: Devd, shared_home: Path,
                                               other_user: str, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    cache, profile = _dirs_of(devd_home, tree, repo)
    _as(other_user, "mkdir", "-m", "0777", str(devd_home.paths.data_dir))
    devd_home.start()
    result = devd_home.run("provision", str(tree), check=False)
    assert result.returncode == 1
    assert f"{devd_home.paths.data_dir} belongs to uid" in result.stderr
    assert not profile.exists()
    devd_home.stop()


def test_a_devd_home_others_may_write_without_sticky_bit_is_refused(
        devd_home: Devd, repo: Repo) -> None:
    devd_home.home.chmod(0o777)
    devd_home.start()
    tree = repo.worktree("shop-a", "a")
    result = devd_home.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "without the sticky bit" in result.stderr
    devd_home.home.chmod(0o1777)  # sticky: others cannot rename what is ours
    devd_home.run("provision", str(tree))
    cache, _ = _dirs_of(devd_home, tree, repo)
    assert cache.stat().st_mode & 0o777 == 0o700
    devd_home.stop()


def test_a_group_writable_parent_is_refused_only_when_the_group_is_shared(
        devd_home: Devd, other_user: str, repo: Repo) -> None:
    devd_home.home.chmod(0o775)  # a umask of 002 under the user's own group: harmless
    devd_home.start()
    tree = repo.worktree("shop-a", "a")
    devd_home.run("provision", str(tree))
    devd_home.run("release", str(tree))
    os.chown(devd_home.home, -1, pwd.getpwnam(other_user).pw_gid)
    result = devd_home.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "without the sticky bit" in result.stderr
    devd_home.stop()
