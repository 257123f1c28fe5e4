"""Attacks on `devd status` at a glance and instantly (issue 13): what changes behind devd's
back (a branch switched, a leased port taken), a Docker engine that hangs, a status pass
that throws or sticks, a dumb terminal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Devd, Repo, run_git, wait_for

from devd.containers import compose, engine
from devd.postgres import container

LISTEN = """import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); print("up", flush=True); sys.stdin.read()
"""


def _entry(devd: Devd, tree: Path) -> dict[str, object]:
    return next(w for w in devd.status()["worktrees"] if w["path"] == str(tree))


def test_a_branch_switched_in_the_worktree_is_shown(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    run_git(tree, "switch", "-q", "-c", "b-after")
    assert _entry(devd, tree)["branch"] == "b-after"  # was "a" for good
    run_git(tree, "switch", "-q", "--detach")
    assert _entry(devd, tree)["branch"] is None
    assert "(detached HEAD)" in devd.run("status", "--fresh", cwd=tree).stdout
    # Bytes that are not UTF-8 in a branch name: shown escaped, not an internal error.
    odd = repo.worktree("shop-odd", "odd")
    run_git(odd, "switch", "-q", "-c", os.fsdecode(b"odd-\xff"))
    devd.run("provision", str(odd))
    assert _entry(devd, odd)["branch"] == "odd-\\xff"


@pytest.fixture
def listener() -> Iterator[object]:
    """Starts processes listening on a port from a directory; stops them at the end."""
    started: list[subprocess.Popen[str]] = []

    def listen(port: int, cwd: Path) -> int:
        proc = subprocess.Popen([sys.executable, "-c", LISTEN, str(port)], cwd=cwd, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        return proc.pid

    yield listen
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_leased_port_held_by_another_worktree_or_none_is_warned(
        devd: Devd, repo: Repo, listener, tmp_path: Path) -> None:
    a, b = repo.worktree("shop-a", "a"), repo.worktree("shop-b", "b")
    for tree in (a, b):
        devd.run("provision", str(tree))
    ports_a = _entry(devd, a)["ports"]
    assert isinstance(ports_a, dict)
    own = listener(ports_a["api"], a)  # the worktree's own server: no warning
    by_b = listener(ports_a["web"], b)
    entry = _entry(devd, a)
    assert entry["foreign_holders"] == [{"name": "web", "port": ports_a["web"], "pid": by_b,
                                         "command": entry["foreign_holders"][0]["command"],
                                         "worktree": str(b)}]
    text = devd.run("status", "--fresh").stdout
    assert f"! shop-a: port web {ports_a['web']} is held by pid {by_b}" in text
    assert "a process of shop-b" in text and f"pid {own}" not in text
    # One of no worktree, on b's port.
    stray = listener(_entry(devd, b)["ports"]["web"], tmp_path)  # type: ignore[index]
    devd.status()  # a pass after it listens (a text --fresh may reuse an older one)
    assert f"pid {stray} python" in devd.run("status", "--fresh").stdout
    assert "outside any worktree" in devd.run("status", "--fresh").stdout


@pytest.fixture
def silent_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """DOCKER_HOST at a socket that takes connections and never answers (a hung engine);
    yields the connections it took."""
    path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(16)
    taken: list[object] = []

    def accept() -> None:
        while True:
            try:
                taken.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    monkeypatch.setattr(engine, "CHECK_TIMEOUT", 1)
    monkeypatch.setattr(engine, "_silent", {})
    yield taken
    server.close()


def test_a_hung_engine_costs_one_timeout_not_one_per_worktree(
        silent_engine: list[object]) -> None:
    detail = {"mode": "container", "container": "devd-pg-x"}
    health = [container.check(None, detail) for _ in range(3)]  # type: ignore[arg-type]
    assert len(silent_engine) == 1, "asked again while it had just not answered"
    assert all(not h.ok and h.detail == {"state": "unknown"} for h in health)
    assert "Docker does not answer" in health[0].message
    assert compose.service_states("devd-x") == [{"name": "devd-x", "state": "unknown"}]
    assert len(silent_engine) == 1


PATCHED_DAEMON = """import sys, time
from pathlib import Path
from devd import processes
from devd.provisioners import ports

trigger = Path(sys.argv[1])
plain_check, plain_table = ports.PortsProvisioner.check, processes.all_listening_ports

def said():
    return trigger.read_text() if trigger.exists() else ""

def check(self, ctx, detail):
    if said() == "raise":
        raise RuntimeError("a check broke")
    if said() == "block":
        Path(str(trigger) + ".entered").touch()
        while trigger.exists():
            time.sleep(0.05)
    return plain_check(self, ctx, detail)

def table():
    if said() == "pass":
        raise OSError("the /proc table broke")
    return plain_table()

ports.PortsProvisioner.check, processes.all_listening_ports = check, table
from devd.cli import main
sys.exit(main(["daemon"]))
"""


@pytest.fixture
def patched(devd_home: Devd, tmp_path: Path) -> Iterator[tuple[Devd, Path]]:
    """A daemon whose ports check raises or blocks while the trigger file says so."""
    trigger = tmp_path / "trigger"
    devd_home.env["DEVD_STATUS_INTERVAL"] = "0.5"
    log = open(devd_home.home / "daemon-test.log", "ab")  # noqa: SIM115 - closed below
    devd_home.proc = subprocess.Popen([sys.executable, "-c", PATCHED_DAEMON, str(trigger),
                                       "daemon"], env=devd_home.env, stdout=log, stderr=log)
    wait_for(lambda: devd_home.run("status", check=False).returncode == 0, what="daemon")
    yield devd_home, trigger
    trigger.unlink(missing_ok=True)
    assert devd_home.stop() == 0, devd_home.log()
    log.close()


def test_a_pass_that_throws_or_sticks_is_said_and_never_holds_status(
        patched: tuple[Devd, Path], repo: Repo) -> None:
    devd, trigger = patched
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    trigger.write_text("raise")  # was: an internal error, and so was every status after
    entry = _entry(devd, tree)
    assert entry["state"] == "ready" and {"kind": "ports", "state": "failed", "detail":
        "its check failed: RuntimeError: a check broke"} in entry["resources"]
    assert " degraded " in devd.run("status").stdout
    trigger.write_text("pass")  # the pass itself fails: the last one is shown, and why
    result = devd.run("status", "--fresh")
    assert "! the daemon's status checks failed (OSError: the /proc table broke)" in \
        result.stdout
    assert json.loads(devd.run("status", "--json").stdout)["check_error"] == \
        "OSError: the /proc table broke"
    trigger.write_text("")
    wait_for(lambda: devd.status(fresh=False)["check_error"] is None, what="a good pass")
    # A pass that sticks: status answers from the last one (the client's own timeout is
    # 60 s here; a request waiting on the pass would be held as long as the pass) and
    # says how old that is.
    trigger.write_text("block")
    wait_for(lambda: Path(f"{trigger}.entered").exists(), what="the pass to stick")
    wait_for(lambda: "· checked " in devd.run("status", timeout=30).stdout.split("\n")[0],
             what="the answer to say it is old")
    assert "· checked " in devd.run("status", "--fresh", timeout=30).stdout  # not held either
    trigger.unlink()


def test_a_dumb_terminal_gets_no_colour(devd: Devd, repo: Repo) -> None:
    import pty

    devd.run("provision", str(repo.main))
    for entry in ([sys.executable, "-m", "devd", "status"],
                  [sys.executable, "-c", "import sys; from devd.cli import main; "
                   "sys.exit(main(sys.argv[1:]))", "status"]):
        leader, follower = pty.openpty()
        done = subprocess.run(entry, env={**devd.env, "TERM": "dumb"}, stdout=follower,
                              timeout=60)
        os.close(follower)
        out = os.read(leader, 65536).decode()
        os.close(leader)
        assert done.returncode == 0 and "shop" in out and "\033[" not in out, out


def test_twenty_rows_at_80_columns_stay_told_apart() -> None:
    """Cut at the end, every `shop-feature-N` read `shop-feat…` and every branch
    `feature/a-r…`: twenty rows nobody could tell apart."""
    from devd.render_status import Painter, cells, render_status

    worktrees = [{"path": f"/home/u/src/{repo}" + (f"-feature-{i}" if i else ""),
                  "repo": f"/home/u/src/{repo}", "state": "ready",
                  "branch": f"feature/a-rather-long-branch-name-{i}" if i else "main",
                  "ports": {"web": 20000 + i, "api": 20100 + i}, "resources": [],
                  "postgres": {"mode": "database", "state": "ready"}}
                 for repo, count in (("shop", 7), ("billing-service", 7), ("docs", 6))
                 for i in range(count)]
    result = {"daemon": {"version": "0", "pid": 1}, "worktrees": worktrees, "orphans": [],
              "proxy": {"state": "running", "port": 1356,  # the default: its 81-cell
                        "dashboard": f"http://devd.localhost:1356/{'k' * 43}/"}}  # line wrapped
    lines = render_status(result, None, Painter(False), 80, home="/home/u").split("\n")
    rows = [line.split() for line in lines if "web=" in line]
    assert len(lines) == 24 and all(cells(line) <= 80 for line in lines)
    assert len({(row[0], row[1]) for row in rows}) == 20, "\n".join(lines)
    assert len({row[0] for row in rows}) == 20, "\n".join(lines)


def test_a_server_that_hangs_up_is_said_in_full() -> None:
    """libpq's message runs over lines; status showed the last alone: `\\tbefore or while
    processing the request.`"""
    from devd.errors import DevdError
    from devd.postgres import server

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()

        def hang_up() -> None:
            for _ in range(4):  # libpq may try again (without, then with SSL)
                try:
                    listening.accept()[0].close()
                except OSError:
                    return

        threading.Thread(target=hang_up, daemon=True).start()
        port = listening.getsockname()[1]
        with pytest.raises(DevdError) as caught:
            server.connect(f"postgresql://u:pw@127.0.0.1:{port}/postgres", timeout=5)
    message = caught.value.message
    assert "server closed the connection unexpectedly" in message, message
    assert "\t" not in message and "\n" not in message


def test_a_hand_edit_inside_devd_s_env_block_is_warned(devd: Devd, repo: Repo) -> None:
    a, b = repo.worktree("shop-a", "a"), repo.worktree("shop-b", "b")
    for tree in (a, b):
        devd.run("provision", str(tree))
    env = a / ".env"
    written = env.read_text()
    web_b = _entry(devd, b)["ports"]["web"]  # type: ignore[index]
    port_a = next(line for line in written.splitlines() if line.startswith("PORT="))
    env.write_text(written.replace(port_a, f"PORT={web_b}"))  # now a's server takes b's port
    entry = _entry(devd, a)
    envfile = next(r for r in entry["resources"] if r["kind"] == "envfile")  # type: ignore[attr-defined]
    assert envfile["state"] == "failed" and "edited by hand (PORT)" in envfile["detail"]
    assert "! shop-a: envfile failed devd's block in .env was edited by hand (PORT)" in \
        devd.run("status").stdout
    devd.run("provision", str(a))
    assert env.read_text() == written and " degraded " not in devd.run("status").stdout
    # Lines of the user's own outside the block are theirs to edit.
    env.write_text(written + "MINE=1\n")
    assert all(r["state"] == "ready" for r in _entry(devd, a)["resources"])  # type: ignore[attr-defined]
