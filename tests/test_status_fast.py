"""`devd status` fast (issue 13): the daemon answers from a snapshot it keeps current, and the
CLI's fast path (devd/quick.py) prints what the full path would, with the same exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Devd, Repo, wait_for

from devd import protocol, quick
from devd.paths import Paths
from devd.render_status import WIDTH

FULL = "import sys; from devd.cli import main; sys.exit(main(sys.argv[1:]))"


def _both(devd: Devd, *args: str, env: dict[str, str] | None = None
          ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """The same command through the fast path (`python -m devd`) and through devd.cli."""
    run_env = {**devd.env, **(env or {})}
    fast = subprocess.run([sys.executable, "-m", "devd", *args], env=run_env,
                          capture_output=True, text=True, timeout=60)
    full = subprocess.run([sys.executable, "-c", FULL, *args], env=run_env,
                          capture_output=True, text=True, timeout=60)
    return fast, full


def _ask(devd: Devd, method: str, params: dict[str, object]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(devd.paths.socket))
        sock.sendall(protocol.encode(protocol.request(method, params)))
        return json.loads(sock.makefile("rb").readline())


def test_help_text_is_argparse_s(devd_home: Devd, monkeypatch: pytest.MonkeyPatch) -> None:
    from devd.cli import build_parser
    from devd.helptext import HELP

    monkeypatch.setenv("COLUMNS", "80")
    assert build_parser().format_help() == HELP, "run `python -m devd.helptext`"
    for args in (["--version"], ["--help"], []):
        fast, full = _both(devd_home, *args, env={"COLUMNS": "80"})
        assert (fast.returncode, fast.stdout, fast.stderr) == \
            (full.returncode, full.stdout, full.stderr), args
    assert _both(devd_home)[0].returncode == 2  # bare `devd`: help on stderr, usage code


def test_fast_status_prints_what_the_full_path_prints(devd: Devd, make_repo) -> None:
    repo: Repo = make_repo("shop")
    trees = [repo.main, repo.worktree("shop-a", "a")]
    for tree in trees:
        devd.run("provision", str(tree))
    fast, full = _both(devd, "status", "--json")
    assert fast.returncode == full.returncode == 0
    assert json.loads(fast.stdout) == json.loads(full.stdout)
    assert fast.stdout == full.stdout  # the same text, indent and all
    # Rows: the caller's directory marks its worktree; home is the caller's.
    home = str(repo.main.parent.parent)
    fast = subprocess.run([sys.executable, "-m", "devd", "status"], cwd=trees[1],
                          env={**devd.env, "HOME": home}, capture_output=True, text=True)
    full = subprocess.run([sys.executable, "-c", FULL, "status"], cwd=trees[1],
                          env={**devd.env, "HOME": home}, capture_output=True, text=True)
    assert fast.stdout == full.stdout and fast.returncode == 0
    assert "~/src/shop" in fast.stdout
    assert [line for line in fast.stdout.splitlines() if line.startswith("*")][0] \
        .split()[1] == "shop-a"


def test_fast_path_failures_are_the_full_path_s(devd_home: Devd) -> None:
    """No daemon, a bad DEVD_TIMEOUT: the same message and exit code either way."""
    for env in ({}, {"DEVD_TIMEOUT": "soon"}):
        fast, full = _both(devd_home, "status", "--json", env=env)
        assert fast.returncode == full.returncode != 0
        assert (fast.stdout, fast.stderr) == (full.stdout, full.stderr)


def test_fast_path_imports_nothing_heavy(devd: Devd) -> None:
    # What the interpreter loaded at start (an editable install's finder loads re) is not ours.
    code = ("import sys; before = set(sys.modules); from devd.quick import main;"
            "rc = main(['status', '--json']);"
            "heavy = {'argparse', 'pathlib', 'typing', 'json', 'socket', 're'} & "
            "(set(sys.modules) - before); print(sorted(heavy), file=sys.stderr); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], env=devd.env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema"] == 1
    assert result.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("home", ["/tmp/x/devd-home", "/tmp/x//devd-home/", "/tmp/./x/h"])
def test_socket_path_is_paths_one(home: str) -> None:
    assert quick.socket_path({"DEVD_HOME": home}) == str(Paths.resolve({"DEVD_HOME": home})
                                                         .socket)


def test_socket_path_leaves_odd_homes_to_paths(tmp_path: Path) -> None:
    assert quick.socket_path({"DEVD_HOME": "/tmp/a/../b"}) is None
    assert quick.socket_path({"DEVD_HOME": "relative"}) is None
    assert quick.socket_path({"DEVD_HOME": "/" + "d" * 120}) is None  # Paths hashes it
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert quick.socket_path(env) == str(Paths.resolve(env).socket)
    assert quick.socket_path({"XDG_RUNTIME_DIR": str(tmp_path / "none")}) is None


def test_constants_match_their_sources() -> None:
    from devd import paths

    assert quick.PROTOCOL_VERSION == protocol.VERSION
    assert quick.MAX_SOCKET_PATH == paths.MAX_SOCKET_PATH
    assert quick.WIDTH == WIDTH


def test_what_devd_changes_shows_at_once_and_the_rest_by_the_next_pass(
        devd_home: Devd, repo: Repo) -> None:
    devd_home.env["DEVD_STATUS_INTERVAL"] = "0.5"
    devd_home.start()
    try:
        tree = repo.worktree("shop-a", "a")
        devd_home.run("provision", str(tree))
        first = devd_home.status(fresh=False)  # no --fresh: the snapshot
        entry = next(w for w in first["worktrees"] if w["path"] == str(tree))
        assert entry["state"] == "ready" and entry["ports"]["web"]  # provisioned: at once
        assert first["checked_at"].endswith("Z") and first["check_interval_seconds"] == 0.5
        with socket.socket() as server:  # not devd's doing: shown by the next pass
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", entry["ports"]["web"]))
            server.listen()
            wait_for(lambda: _entry(devd_home, tree)["listening"]["web"], what="a pass")
        devd_home.run("release", str(tree))
        assert all(w["path"] != str(tree) for w in devd_home.status(fresh=False)["worktrees"])
        # The raw protocol: fresh is a boolean; a view is json or rows.
        assert _ask(devd_home, "status", {"fresh": True})["ok"] is True
        bad = _ask(devd_home, "status_view", {"view": "yaml"})
        assert bad["ok"] is False and bad["error"]["code"] == "usage"
        assert _ask(devd_home, "status", {"fresh": "yes"})["error"]["code"] == "usage"
    finally:
        assert devd_home.stop() == 0, devd_home.log()


def _entry(devd: Devd, tree: Path) -> dict[str, object]:
    return next(w for w in devd.status(fresh=False)["worktrees"] if w["path"] == str(tree))


UP_SHAPES = [[], ["web"], ["web", "api"], ["--path", "/x", "web"], ["web", "-v"],
             ["web", "-v", "api"], ["-v", "web", "api", "--json"], ["web", "--path", "/y"],
             ["--json", "web", "--path", "/z", "-v"], ["--path=x"], ["--pa", "x"], ["-x"],
             ["--path"], ["--path", "-v"], ["--", "web"], ["web", "--", "api"], ["-h"],
             ["wéb"], ["we\nb"]]


@pytest.mark.parametrize("args", UP_SHAPES, ids=repr)
def test_up_is_sent_early_only_when_argparse_reads_it_the_same(args: list[str]) -> None:
    """devd/quick.py sends `up` before argparse runs: never for a shape argparse would
    refuse or read otherwise (the request would already be out)."""
    from devd.cli import build_parser

    early = quick._up_params(args)
    if early is None:
        return
    parsed = build_parser("up").parse_args(["up", *args])  # must not exit
    assert early["path"] == os.path.abspath(parsed.path)
    assert early.get("services", []) == parsed.services
    line = quick._request("up", early, json.encoder.encode_basestring)  # type: ignore[attr-defined]
    assert json.loads(line) == protocol.request("up", early) | {"heartbeat": True}


def test_up_sent_early_says_what_the_full_path_says(devd: Devd, make_repo) -> None:
    repo: Repo = make_repo("shop")
    devd.run("provision", str(repo.main))
    for args in (["up", "--path", str(repo.main)], ["up", "--json", "--path", str(repo.main),
                                                    "web"]):
        fast, full = _both(devd, *args)
        assert fast.returncode == full.returncode == 2, fast.stderr  # nothing declared
        assert (fast.stdout, fast.stderr) == (full.stdout, full.stderr)
        assert "declares no services" in fast.stderr + fast.stdout


EARLY = """
import os, socket, sys, threading
from devd import quick
path = os.path.join(sys.argv[1], "run", "devd.sock")
os.makedirs(os.path.dirname(path), mode=0o700)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
seen = {}
def spy(*args):  # the request line is made right before it is sent
    seen["cli imported"] = "devd.cli" in sys.modules
    return request(*args)
request, quick._request = quick._request, spy
def answer():
    conn, _ = server.accept()
    conn.makefile("rb").readline()
    conn.sendall(b'{"ok": false, "error": {"code": "usage", "message": "none", "hint": "h"}}\\n')
    conn.close()
thread = threading.Thread(target=answer)
thread.start()
code = quick.main(["up", "--path", "/"])
thread.join()
print(seen, code)
"""


def test_up_goes_out_before_the_cli_is_imported(tmp_path: Path) -> None:
    """The point of sending it early: the daemon starts while devd.cli imports."""
    home = tmp_path / "h"
    reply = subprocess.run([sys.executable, "-c", EARLY, str(home)], capture_output=True,
                           text=True, timeout=60,
                           env={**os.environ, "DEVD_HOME": str(home), "DEVD_NO_AUTOSTART": "1"})
    assert reply.stdout.strip() == "{'cli imported': False} 2", reply.stderr
