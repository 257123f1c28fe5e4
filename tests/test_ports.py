"""Who holds a port, and kill-port refusing anything outside the asking worktree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Devd, Repo, wait_for

LISTEN = """
import os, signal, socket, sys, time
if "--stubborn" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
time.sleep(300)
"""


@pytest.fixture
def two(devd: Devd, repo: Repo) -> tuple[Path, Path]:
    a, b = repo.worktree("shop-a", "a"), repo.worktree("shop-b", "b")
    for tree in (a, b):
        devd.run("provision", str(tree))
    return a, b


def listen(port: int, cwd: Path, *extra: str, via: list[str] | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*(via or []), sys.executable, "-c", LISTEN, str(port), *extra],
                            cwd=cwd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return proc


def row(devd: Devd, port: int) -> dict:
    return next(r for r in devd.json("ports") if r["port"] == port)


def test_ports_lists_leases_and_holders(devd: Devd, two: tuple[Path, Path]) -> None:
    a, b = two
    web_a = devd.worktree(a)["ports"]["web"]
    server = listen(web_a, a, via=[sys.executable, "-m", "devd", "run", "--path", str(a), "--"],
                    env=devd.env)
    try:
        entry = row(devd, web_a)
        assert entry["listening"] and entry["pid"] == server.pid
        assert entry["name"] == "web" and entry["worktree"] == str(a)
        assert entry["owner_worktree"] == str(a) and entry["command"].startswith("python")
        api_b = row(devd, devd.worktree(b)["ports"]["api"])
        assert api_b["listening"] is False and api_b["pid"] is None
        assert len(devd.json("ports")) == 4
        assert str(web_a) in devd.run("ports").stdout
    finally:
        server.kill()
        server.wait()


def test_kill_port_refuses_another_worktrees_process(devd: Devd, two: tuple[Path, Path]
                                                      ) -> None:
    a, b = two
    web_a = devd.worktree(a)["ports"]["web"]
    server = listen(web_a, a)
    try:
        refused = devd.run("kill-port", str(web_a), "--path", str(b), check=False)
        assert refused.returncode == 1
        assert f"held by pid {server.pid}" in refused.stderr and str(a) in refused.stderr
        assert server.poll() is None
        killed = devd.json("kill-port", str(web_a), "--path", str(a))
        assert killed["pid"] == server.pid and killed["outcome"] == "terminated"
        assert server.wait(timeout=10) != 0
    finally:
        server.kill()


def test_kill_port_refuses_a_process_outside_every_worktree(devd: Devd, two, tmp_path: Path
                                                             ) -> None:
    a, _ = two
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = devd.worktree(a)["ports"]["api"]
    stranger = listen(port, elsewhere)
    try:
        refused = devd.run("kill-port", str(port), "--path", str(a), check=False)
        assert refused.returncode == 1 and "no worktree" in refused.stderr
        assert stranger.poll() is None
        assert row(devd, port)["owner_worktree"] is None
    finally:
        stranger.kill()
        stranger.wait()


def test_kill_port_escalates_to_sigkill(devd_home: Devd, repo: Repo) -> None:
    devd_home.env["DEVD_KILL_TIMEOUT"] = "0.5"
    devd_home.start()
    try:
        tree = repo.worktree("shop-a", "a")
        devd_home.run("provision", str(tree))
        port = devd_home.worktree(tree)["ports"]["web"]
        stubborn = listen(port, tree, "--stubborn")
        result = devd_home.json("kill-port", str(port), "--path", str(tree))
        assert result["outcome"] == "killed"
        assert stubborn.wait(timeout=10) == -9
    finally:
        devd_home.stop()


def test_a_child_of_devd_run_is_attributed_by_ancestry(devd: Devd, two) -> None:
    a, b = two
    port = devd.worktree(a)["ports"]["api"]
    # The listener's cwd is /, outside every worktree; its parent was started by `devd run`.
    spawner = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1],"
               " sys.argv[2]], cwd='/'); p.wait()")
    parent = subprocess.Popen(
        [sys.executable, "-m", "devd", "run", "--path", str(a), "--", sys.executable, "-c",
         spawner, LISTEN, str(port)], env=devd.env, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "listening"
        entry = row(devd, port)
        assert entry["pid"] != parent.pid and entry["owner_worktree"] == str(a)
        assert devd.run("kill-port", str(port), "--path", str(b), check=False).returncode == 1
        devd.run("kill-port", str(port), "--path", str(a))
        wait_for(lambda: not row(devd, port)["listening"], what="listener to stop")
    finally:
        parent.kill()


def test_kill_port_on_a_free_port(devd: Devd, two) -> None:
    a, _ = two
    result = devd.run("kill-port", "1", "--path", str(a), check=False)
    assert result.returncode == 1 and "nothing listens" in result.stderr
