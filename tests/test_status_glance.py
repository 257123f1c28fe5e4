"""`devd status` and `devd ports` at a glance, and status' versioned --json (issue 13)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Devd, Repo
from pgsupport import query, start_server, with_postgres

from devd import naming
from devd.postgres import names as pgnames
from devd.render_status import cells

WIDE = "機能テスト"  # East Asian wide: two cells a character


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def _twenty(make_repo) -> list[Path]:
    """20 worktrees of 3 repos (mains included), long branches, one wide name."""
    trees = []
    for name, count in (("shop", 7), ("billing-service", 7), ("docs", 6)):
        repo: Repo = make_repo(name)
        trees.append(repo.main)
        for i in range(1, count):
            dir_name = f"{name}-{WIDE}" if (name, i) == ("docs", 1) else f"{name}-feature-{i}"
            trees.append(repo.worktree(dir_name, f"feature/a-rather-long-branch-name-{i}"))
    return trees


def test_twenty_worktrees_of_three_repos_fit_one_screen(devd: Devd, make_repo) -> None:
    trees = _twenty(make_repo)
    for tree in trees:
        devd.run("provision", str(tree))
    here = trees[3]
    text = devd.run("status", cwd=here / ".").stdout
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == 1 + 3 + 20 <= 24, text
    assert all(cells(line) <= 100 for line in lines), text
    rows = [line for line in lines if "web=" in line]
    assert len(rows) == 20
    # Aligned: the ports column starts at the same cell in every row, wide name included.
    assert len({cells(line[:line.index("web=")]) for line in rows}) == 1, text
    marked = [line for line in rows if line.startswith("*")]
    assert len(marked) == 1 and here.name in marked[0]
    assert any(WIDE in line for line in rows)
    assert "\033" not in text  # not a terminal: no colour


def test_json_is_versioned_with_iso_times_and_listening(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    web = devd.worktree(tree)["ports"]["web"]
    with _listen(web):
        status = devd.status()
        entry = next(w for w in status["worktrees"] if w["path"] == str(tree))
        assert status["schema"] == 1
        assert entry["listening"] == {"web": True, "api": False}
        assert "top" not in (status.get("watchers") or {})
        assert status["daemon"]["gc_grace_seconds"] == 24 * 3600
        assert f"web={web}+" in devd.run("status", "--fresh").stdout
    shutil.rmtree(tree)
    gone = devd.worktree(tree)
    assert gone["gone_at"].endswith("Z")
    assert datetime.fromisoformat(gone["gone_at"].replace("Z", "+00:00")).tzinfo is not None


def test_gone_row_says_when_gc_is_due_and_home_is_tilde(devd: Devd, repo: Repo,
                                                        tmp_path: Path) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    shutil.rmtree(tree)
    text = devd.run("status", env={"HOME": str(tmp_path)}).stdout
    row = next(line for line in text.splitlines() if "shop-a" in line)
    assert "gone " in row and "· gc in 23h" in row, text
    assert "~/src/shop" in text and str(tmp_path) not in text


def test_hostile_names_are_escaped_clipped_and_full_on_request(devd: Devd, repo: Repo) -> None:
    # Control characters are refused at provision; a bidi override and a 120-character
    # name are not: escaped, and clipped to keep the row on one line.
    evil = repo.worktree("shop-\u202eevil-" + "x" * 120, "evil")
    devd.run("provision", str(evil))
    text = devd.run("status").stdout
    assert "\u202e" not in text and "\\u202eevil" in text
    assert all(cells(line) <= 100 for line in text.splitlines()) and "…" in text
    full = devd.run("status", str(evil)).stdout
    assert "  path " in full and "\u202e" not in full
    assert "  path " in devd.run("status", "-v").stdout


def test_warnings_are_gathered_at_the_bottom(devd: Devd, make_repo) -> None:
    repo = make_repo("shop", devd_toml='[ports]\nnames = ["web"]\n[env]\nfile = "../out.env"\n')
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree), check=False)
    lines = devd.run("status").stdout.rstrip("\n").split("\n")
    warned = [i for i, line in enumerate(lines) if line.startswith("! ")]
    assert warned and warned[-1] == len(lines) - 1, lines
    assert all(i > max(j for j, line in enumerate(lines) if "shop-a" in line
                       and not line.startswith("! ")) for i in warned)


def test_colour_only_on_a_terminal_and_no_color_honoured(devd: Devd, repo: Repo) -> None:
    devd.run("provision", str(repo.main))
    assert "\033[" in _on_a_terminal(devd, {})
    assert "\033[" not in _on_a_terminal(devd, {"NO_COLOR": "1"})


def _on_a_terminal(devd: Devd, extra: dict[str, str]) -> str:
    """`devd status` with its stdout on a real pseudo-terminal."""
    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "devd", "status"], stdout=slave,
                              stderr=subprocess.PIPE, env={**devd.env, **extra}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the writer is gone and all was read
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(master)


def test_ports_has_a_header_and_aligned_columns(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    web = devd.worktree(tree)["ports"]["web"]
    with _listen(web):
        lines = devd.run("ports").stdout.rstrip("\n").split("\n")
    header = lines[0].split()
    assert header == ["PORT", "NAME", "WORKTREE", "LISTENING", "PID", "COMMAND", "OWNER"]
    assert len(lines) == 3  # header + web and api of shop-a
    row = next(line for line in lines if line.startswith(str(web)))
    assert "yes" in row and str(os.getpid()) in row and "(outside any worktree)" in row
    starts = lines[0].index("LISTENING")
    assert all(line[starts:starts + 3] in ("yes", "no ") for line in lines[1:]), lines
    assert devd.json("ports")[0]["worktree_state"] == "ready"  # still a list, as before


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    yield from start_server()


def test_postgres_in_a_word_and_its_loss_warned(devd_home: Devd, repo: Repo,
                                                pg_url: str) -> None:
    devd_home.env["DEVD_POSTGRES_URL"] = pg_url
    devd_home.start()
    try:
        with_postgres(repo, 'mode = "schema"\n')
        tree = repo.worktree("shop-pg", "pg")
        devd_home.run("provision", str(tree))
        row = _row(devd_home.run("status").stdout, "shop-pg")
        assert "pg-schema:ready" in row and " ready " in row
        # Someone drops the schema behind devd's back: the row and a warning say so.
        schema = pgnames.identifier(naming.worktree_id(repo.main, tree))
        query(pg_url, f'DROP SCHEMA "{schema}" CASCADE')
        devd_home.status()  # a pass after the drop (a text --fresh may reuse an older one)
        text = devd_home.run("status", "--fresh").stdout
        row = _row(text, "shop-pg")
        assert "degraded" in row and "pg-schema:ready" not in row, text
        assert text.rstrip("\n").split("\n")[-1].startswith("! shop-pg: postgres failed"), text
    finally:
        devd_home.run("release", str(repo.main.parent / "shop-pg"), "--yes", "--no-backup",
                      check=False)
        devd_home.stop()


def _row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line[2:].startswith(name + " "))


def test_an_answer_made_before_the_first_pass_says_so() -> None:
    from devd.render_status import stale

    unchecked = {"worktrees": [{"checked": False}, {"checked": True}], "checked_at": None,
                 "check_interval_seconds": 5}
    assert stale(unchecked, now=0.0) == " · not checked yet"
    checked = unchecked | {"worktrees": [{"checked": True}]}
    assert stale(checked, now=0.0) == ""
