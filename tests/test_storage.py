"""A full or read-only state dir is said plainly ("disk is full", "read-only"), never as a bug."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Devd, Repo


@pytest.fixture
def small_state(devd_home: Devd) -> Iterator[Path]:
    """DEVD_HOME/state on its own 1 MiB tmpfs (the daemon's log stays outside it)."""
    state = devd_home.paths.state_dir
    state.mkdir(parents=True, mode=0o700)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                              str(state)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (tests run as root): {mounted.stderr.strip()}")
    try:
        yield state
    finally:
        if devd_home.proc is not None:
            devd_home.proc.kill()
            devd_home.proc.wait()
            devd_home.proc = None
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


def test_a_full_state_dir_is_reported_as_a_full_disk(devd_home: Devd, repo: Repo,
                                                     small_state: Path) -> None:
    devd_home.start()
    tree = repo.worktree("shop-a", "a")
    fill(small_state)
    done = devd_home.run("provision", str(tree), check=False)
    assert done.returncode == 1, done.stderr
    assert "disk is full" in done.stderr and "devd bug" not in done.stderr, done.stderr
    (small_state / "filler").unlink()
    devd_home.run("provision", str(tree))  # room again: it simply works
    assert devd_home.worktree(tree)["state"] == "ready"


def test_a_read_only_cache_dir_fails_the_provision_plainly(devd_home: Devd, repo: Repo,
                                                          tmp_path: Path) -> None:
    cache = devd_home.paths.cache_dir
    cache.mkdir(parents=True, mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(cache)],
                   check=True)
    try:
        devd_home.start()
        tree = repo.worktree("shop-a", "a")
        done = devd_home.run("provision", str(tree), check=False)
        assert done.returncode == 1, done.stderr
        assert "read-only" in done.stderr.lower() and "devd bug" not in done.stderr
        assert "Traceback" not in done.stderr
        assert devd_home.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_autostart_into_a_read_only_state_dir_says_so(devd_home: Devd,
                                                      small_state: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_state)], check=True)
    done = devd_home.run("status", check=False, env={"DEVD_NO_AUTOSTART": "0"})
    assert done.returncode == 1 and "read-only" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    daemon = devd_home.run("daemon", check=False)
    assert daemon.returncode == 1 and "read-only" in daemon.stderr, daemon.stderr
    assert "Traceback" not in daemon.stderr
