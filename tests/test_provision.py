"""Provisioning worktrees end to end: ports, dirs, .env, status, removal, gc."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Devd, Repo, run_git, wait_for


def ports_of(devd: Devd, path: Path) -> dict[str, int]:
    return devd.worktree(path)["ports"]


def test_three_worktrees_get_distinct_stable_environments(devd: Devd, repo: Repo) -> None:
    trees = [repo.worktree(f"shop-{n}", f"feat/{n}") for n in "abc"]
    for tree in trees:
        devd.run("provision", str(tree))
    status = devd.status()
    shown = {w["path"]: w for w in status["worktrees"]}
    blocks = [shown[str(t)]["ports"] for t in trees]
    all_ports = [p for block in blocks for p in block.values()]
    assert len(set(all_ports)) == 6 and all(set(b) == {"web", "api"} for b in blocks)
    assert all(20000 <= p <= 29999 for p in all_ports)
    assert len({shown[str(t)]["cache_dir"] for t in trees}) == 3
    assert len({shown[str(t)]["browser_profile"] for t in trees}) == 3
    for tree in trees:
        entry = shown[str(tree)]
        assert entry["state"] == "ready" and entry["branch"] == f"feat/{tree.name[-1]}"
        assert Path(entry["cache_dir"], ".devd-owner").is_file()
        assert Path(entry["browser_profile"], ".devd-owner").is_file()
        env_text = (tree / ".env").read_text()
        assert f"PORT_WEB={entry['ports']['web']}" in env_text
        assert [r["state"] for r in entry["resources"]] == ["ready"] * 3
    # Same worktree, same ports: across re-provision and a daemon restart.
    devd.run("provision", str(trees[0]))
    assert ports_of(devd, trees[0]) == blocks[0]
    devd.stop()
    devd.start()
    devd.run("provision", str(trees[1]))
    assert ports_of(devd, trees[1]) == blocks[1]
    assert ports_of(devd, trees[0]) == blocks[0]


def test_env_contract_in_every_format(devd: Devd, repo: Repo) -> None:
    repo.commit({"devd.toml": '[ports]\nnames = ["web", "api"]\n'
                 '[cache]\nenv = ["TURBO_CACHE_DIR"]\n'})
    tree = repo.worktree("shop a ü", "a")
    devd.run("provision", str(tree))
    env = devd.json_env = json.loads(devd.run("env", str(tree), "--format", "json").stdout)
    entry = devd.worktree(tree)
    assert env["DEVD_WORKTREE"] == str(tree) and env["DEVD_WORKTREE_ID"] == entry["id"]
    assert env["PORT"] == str(entry["ports"]["web"]) == env["PORT_WEB"]
    assert env["PORT_API"] == str(entry["ports"]["api"])
    assert env["DEVD_CACHE_DIR"] == entry["cache_dir"]
    assert env["DEVD_BROWSER_PROFILE"] == entry["browser_profile"]
    assert env["TURBO_CACHE_DIR"].startswith(entry["cache_dir"])
    sh = devd.run("env", str(tree), "--format", "sh").stdout
    echoed = subprocess.run(["bash", "-c", sh + '\nprintf %s "$DEVD_WORKTREE"'],
                            capture_output=True, text=True, check=True).stdout
    assert echoed == str(tree)
    dotenv = devd.run("env", str(tree), "--format", "dotenv").stdout
    assert f"DEVD_WORKTREE='{tree}'" in dotenv
    # from inside the worktree, no path argument
    inside = json.loads(devd.run("env", "--format", "json", cwd=tree / ".").stdout)
    assert inside == env


def test_run_gives_the_command_the_environment(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    out = devd.run("run", "--path", str(tree), "--", sys.executable, "-c",
                   "import os; print(os.environ['PORT'], os.environ['DEVD_WORKTREE'])").stdout
    assert out.split() == [str(ports_of(devd, tree)["web"]), str(tree)]
    missing = devd.run("run", "--path", str(tree), "--", "no-such-command-xyz", check=False)
    assert missing.returncode == 127 and "cannot run" in missing.stderr


def test_no_devd_toml_works_with_defaults(devd: Devd, make_repo) -> None:
    plain = make_repo("plain", devd_toml=None)
    tree = plain.worktree("plain-a", "a")
    devd.run("provision", str(tree))
    entry = devd.worktree(tree)
    assert list(entry["ports"]) == ["web"] and entry["state"] == "ready"


@pytest.mark.parametrize("branch", [
    "feature/deep/slashes", "ünïcödé-ブランチ", "quote'and\"dq", "semi;$(touch${IFS}pwned)`x`|&>",
    "b" * 200,
])
def test_hostile_branch_names(devd: Devd, repo: Repo, branch: str) -> None:
    tree = repo.worktree("shop-hostile", branch)
    devd.run("provision", str(tree))
    entry = devd.worktree(tree)
    assert entry["branch"] == branch and entry["state"] == "ready"
    assert not (tree / "pwned").exists() and not Path("pwned").exists()
    assert all(c.isalnum() or c == "-" for c in entry["id"]) and len(entry["id"]) < 80
    devd.run("status")  # renders without crashing


def test_escape_codes_in_branch_are_printed_safely(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-esc", "esc")
    # git refuses control characters in ref names, but HEAD can be edited by anyone
    gitdir = Path(run_git(tree, "rev-parse", "--absolute-git-dir").strip())
    (gitdir / "HEAD").write_text("ref: refs/heads/evil\x1b[31mred\n")
    devd.run("provision", str(tree), check=False)
    text = devd.run("status").stdout
    assert "\x1b" not in text and "\\x1b" in text


def test_detached_head(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-detached")
    devd.run("provision", str(tree))
    entry = devd.worktree(tree)
    assert entry["branch"] is None and entry["state"] == "ready"
    text = devd.run("status").stdout
    assert "(detached HEAD)" in text and "watchers ok" in text


@pytest.mark.parametrize("kind", ["missing", "plain-dir", "bare"])
def test_not_a_worktree(devd: Devd, tmp_path: Path, kind: str) -> None:
    target = tmp_path / "nothing"
    if kind == "plain-dir":
        target.mkdir()
    if kind == "bare":
        subprocess.run(["git", "init", "-q", "--bare", str(target)], check=True)
    result = devd.run("provision", str(target), check=False)
    assert result.returncode == 1
    expected = {"missing": "does not exist", "plain-dir": "not inside a git worktree",
                "bare": "bare repository"}[kind]
    assert expected in result.stderr and "hint:" in result.stderr
    assert devd.status()["worktrees"] == []


def test_malformed_devd_toml_names_file_line_and_key(devd: Devd, repo: Repo) -> None:
    repo.commit({"devd.toml": '# ports\n[ports]\nnames = "web"\n'})
    tree = repo.worktree("shop-bad", "bad")
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1
    assert f"{tree / 'devd.toml'}:3: ports.names" in result.stderr
    syntax = tree / "devd.toml"
    syntax.write_text("[ports\n")
    result = devd.run("provision", str(tree), check=False)
    assert "devd.toml" in result.stderr and "line 1" in result.stderr
    assert devd.worktree(tree)["state"] == "failed"


def test_port_range_too_small_leases_nothing(devd_home: Devd, repo: Repo) -> None:
    devd_home.env["DEVD_PORT_RANGE"] = "21000-21002"
    devd_home.start()
    try:
        first = repo.worktree("shop-a", "a")
        devd_home.run("provision", str(first))
        second = repo.worktree("shop-b", "b")
        result = devd_home.run("provision", str(second), check=False)
        assert result.returncode == 1 and "no free port" in result.stderr
        assert devd_home.worktree(second)["ports"] == {}
        leases = sqlite3.connect(devd_home.paths.registry).execute(
            "SELECT count(*) FROM port_leases").fetchone()[0]
        assert leases == 2  # only the first worktree's block
        repo.commit({"devd.toml": '[ports]\nnames = ["a", "b", "c", "d"]\n'})
        third = repo.worktree("shop-c", "c")
        too_many = devd_home.run("provision", str(third), check=False)
        assert "holds 3 port(s)" in too_many.stderr
    finally:
        devd_home.stop()


def test_a_port_in_use_is_skipped(devd: Devd, repo: Repo) -> None:
    import socket

    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    web = ports_of(devd, tree)["web"]
    devd.run("release", str(tree))
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", web))
        blocker.listen()
        devd.run("provision", str(tree))
        assert ports_of(devd, tree)["web"] != web


def test_two_provisions_of_one_worktree_are_serialised(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda: results.append(
        devd.run("provision", str(tree), "--json"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ports = [json.loads(r.stdout)["ports"] for r in results]
    assert ports[0] == ports[1]
    assert (tree / ".env").read_text().count("# >>> devd") == 1


def test_twenty_concurrent_provisions_get_unique_ports(devd: Devd, repo: Repo) -> None:
    trees = [repo.worktree(f"shop-{i:02d}", f"b{i}") for i in range(20)]
    procs = [subprocess.Popen([sys.executable, "-m", "devd", "provision", str(t), "--json"],
                              env=devd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for t in trees]
    ports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        ports += json.loads(out)["ports"].values()
    assert len(ports) == 40 and len(set(ports)) == 40


def test_env_file_keeps_user_lines_and_copies_from_main(devd: Devd, repo: Repo) -> None:
    (repo.main / ".env").write_text("SECRET=from-main\n")
    (repo.main / ".env.local").write_text("LOCAL=1\n")
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    text = (tree / ".env").read_text()
    assert text.startswith("SECRET=from-main\n") and "# >>> devd" in text
    assert (tree / ".env.local").read_text() == "LOCAL=1\n"
    # The user's edits around the block survive re-provisioning; the block is replaced whole.
    (tree / ".env").write_text("MINE=1\n" + text + "AFTER=2\n")
    devd.run("provision", str(tree))
    again = (tree / ".env").read_text()
    assert again.startswith("MINE=1\nSECRET=from-main\n") and again.endswith("AFTER=2\n")
    assert again.count("# >>> devd") == 1
    # Drift: the main worktree's copy changed since it was copied.
    (repo.main / ".env").write_text("SECRET=rotated\n")
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert ".env" in envfile["detail"] and "changed" in envfile["detail"]
    # Release takes only devd's block away.
    devd.run("release", str(tree))
    left = (tree / ".env").read_text()
    assert "# >>> devd" not in left and "MINE=1" in left and "AFTER=2" in left


def test_main_worktree_block_does_not_leak_into_copies(devd: Devd, repo: Repo) -> None:
    devd.run("provision", str(repo.main))
    main_env = (repo.main / ".env").read_text()
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    assert main_env.count("PORT_WEB=") == 1
    assert (tree / ".env").read_text().count("PORT_WEB=") == 1
    assert f"PORT_WEB={ports_of(devd, tree)['web']}" in (tree / ".env").read_text()


def test_worktreeinclude_copies_only_ignored_files(devd: Devd, repo: Repo) -> None:
    repo.commit({".worktreeinclude": "config/*.json\n", "config/tracked.json": "{}\n",
                 ".gitignore": ".env\nconfig/secret*.json\n"})
    (repo.main / "config" / "secret.json").write_text('{"k": 1}\n')
    (repo.main / "config" / "untracked-not-ignored.json").write_text("{}\n")
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    assert (tree / "config" / "secret.json").read_text() == '{"k": 1}\n'
    assert not (tree / "config" / "untracked-not-ignored.json").exists()


def test_symlinked_env_file_is_refused(devd: Devd, repo: Repo) -> None:
    (repo.main / ".env").write_text("SHARED=1\n")
    tree = repo.worktree("shop-a", "a")
    (tree / ".env").symlink_to(repo.main / ".env")
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "symlink" in result.stderr
    assert (repo.main / ".env").read_text() == "SHARED=1\n"
    entry = devd.worktree(tree)
    assert entry["state"] == "failed" and entry["ports"]  # the other resources stay usable


def test_foreign_dir_under_our_name_is_not_touched(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    entry = devd.worktree(tree)
    devd.run("release", str(tree))
    squatter = Path(entry["cache_dir"])
    squatter.mkdir(parents=True)
    (squatter / "precious.txt").write_text("mine")
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "not marked as devd's" in result.stderr
    assert (squatter / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in squatter.iterdir()) == ["precious.txt"]


def test_git_worktree_remove_is_noticed_and_gc_frees_ports(devd: Devd, repo: Repo) -> None:
    keep, doomed = repo.worktree("shop-keep", "keep"), repo.worktree("shop-doomed", "doomed")
    for tree in (keep, doomed):
        devd.run("provision", str(tree))
    doomed_ports = set(ports_of(devd, doomed).values())
    cache = Path(devd.worktree(doomed)["cache_dir"])
    run_git(repo.main, "worktree", "remove", "--force", str(doomed))
    # The daemon's watcher notices on its own, without a status request.
    registry = devd.paths.registry

    def state_in_registry() -> str:
        with sqlite3.connect(registry) as db:
            return db.execute("SELECT state FROM worktrees WHERE path = ?",
                              (str(doomed),)).fetchone()[0]
    wait_for(lambda: state_in_registry() == "gone", what="watcher to notice")
    entry = devd.worktree(doomed)
    assert entry["state"] == "gone" and set(entry["ports"].values()) == doomed_ports
    assert cache.is_dir()  # nothing destroyed at that moment
    dry = devd.json("gc", "--grace", "0", "--dry-run")
    assert [w["path"] for w in dry["worktrees"]] == [str(doomed)]
    assert devd.worktree(doomed)["state"] == "gone"
    kept = devd.json("gc")  # default grace 24h: too young
    assert kept["worktrees"] == []
    done = devd.json("gc", "--grace", "0")
    assert done["worktrees"][0]["released"] is True
    assert str(doomed) not in [w["path"] for w in devd.status()["worktrees"]]
    leased = {row["port"] for row in devd.json("ports")}
    assert not leased & doomed_ports and not cache.exists()
    assert devd.worktree(keep)["state"] == "ready"


def test_rm_rf_is_noticed_on_status(devd: Devd, repo: Repo) -> None:
    import shutil

    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    shutil.rmtree(tree)
    assert devd.worktree(tree)["state"] == "gone"
    assert devd.worktree(tree)["gone_at"] is not None


def test_reprovision_brings_a_gone_worktree_back(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    ports = ports_of(devd, tree)
    run_git(repo.main, "worktree", "remove", str(tree))
    assert devd.worktree(tree)["state"] == "gone"
    run_git(repo.main, "worktree", "add", "-q", str(tree), "a")
    devd.run("provision", str(tree))
    assert devd.worktree(tree)["state"] == "ready" and ports_of(devd, tree) == ports


def test_release_removes_what_devd_made(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    entry = devd.worktree(tree)
    devd.run("release", str(tree))
    assert not Path(entry["cache_dir"]).exists() and not Path(entry["browser_profile"]).exists()
    assert not (tree / ".env").exists()  # devd created it, and only devd's block was in it
    assert devd.status()["worktrees"] == []
    unknown = devd.run("release", str(tree), check=False)
    assert unknown.returncode == 1 and "not registered" in unknown.stderr


def test_status_for_one_path_and_unregistered_path(devd: Devd, repo: Repo) -> None:
    a, b = repo.worktree("shop-a", "a"), repo.worktree("shop-b", "b")
    devd.run("provision", str(a))
    one = devd.json("status", str(a / "."))
    assert [w["path"] for w in one["worktrees"]] == [str(a)]
    result = devd.run("status", str(b), check=False)
    assert result.returncode == 1 and f"devd provision {b}" in result.stderr


def test_status_json_shape(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    status = devd.status()
    assert set(status["daemon"]) >= {"pid", "version", "socket"}
    entry = status["worktrees"][0]
    assert set(entry) >= {"id", "path", "repo", "branch", "state", "ports", "cache_dir",
                          "browser_profile", "env_file", "resources"}
    assert entry["repo"] == str(repo.main)
    assert all(set(r) == {"kind", "state", "detail"} for r in entry["resources"])


def test_background_provision_returns_at_once(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    out = devd.json("provision", str(tree), "--background")
    assert out["state"] in ("provisioning", "ready")
    wait_for(lambda: devd.worktree(tree)["state"] == "ready", what="background provision")


def test_init_writes_a_starter_config(devd_home: Devd, tmp_path: Path) -> None:
    target = tmp_path / "proj"
    target.mkdir()
    devd_home.run("init", str(target))
    import tomllib

    parsed = tomllib.loads((target / "devd.toml").read_text())
    assert parsed["ports"]["names"] == ["web"]
    again = devd_home.run("init", str(target), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_browser_opens_with_the_profile(devd: Devd, repo: Repo, tmp_path: Path) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    record = tmp_path / "args.txt"
    fake = tmp_path / "browser.sh"  # a browser stand-in: this machine has no display
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    devd.run("browser", "--path", str(tree), env={"DEVD_BROWSER": str(fake)})
    # Its output, not the file: `> record` creates the file before printf writes.
    wait_for(lambda: record.exists() and record.read_text().endswith("\n"),
             what="browser to start")
    args = record.read_text().split("\n")
    entry = devd.worktree(tree)
    assert f"--user-data-dir={entry['browser_profile']}" in args
    assert f"http://localhost:{entry['ports']['web']}/" in args


def test_registry_schema_is_versioned(devd: Devd) -> None:
    with sqlite3.connect(devd.paths.registry) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_malformed_global_config(devd_home: Devd) -> None:
    config = devd_home.paths.config_file
    config.parent.mkdir(parents=True)
    config.write_text('port_range = "abc"\n')
    result = devd_home.run("daemon", check=False, timeout=30)
    assert result.returncode == 1 and "config.toml:1: port_range" in result.stderr
    env_override = devd_home.run("daemon", check=False, timeout=30,
                                 env={"DEVD_PORT_RANGE": "30000-1"})
    assert env_override.returncode == 1




def test_a_provision_cut_short_by_a_dead_daemon_is_reported_and_finished(devd: Devd,
                                                                        repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    devd.proc.kill()  # SIGKILL: no cleanup at all
    devd.proc.wait()
    devd.proc = None
    with sqlite3.connect(devd.paths.registry) as db:  # what a kill mid-provision leaves
        db.execute("UPDATE worktrees SET state = 'provisioning'")
        db.execute("UPDATE resources SET state = 'pending' WHERE kind = 'envfile'")
    devd.start()  # the stale socket is replaced, the lock was freed by the kernel
    entry = devd.worktree(tree)
    assert entry["state"] == "failed" and "interrupted" in entry["error"]
    envfile = [r for r in entry["resources"] if r["kind"] == "envfile"][0]
    assert envfile["state"] == "failed" and "interrupted" in envfile["detail"]
    devd.run("provision", str(tree))
    assert devd.worktree(tree)["state"] == "ready"


def test_an_env_file_git_does_not_ignore_is_flagged(devd: Devd, make_repo) -> None:
    bare = make_repo("noignore")
    bare.commit({".gitignore": "node_modules/\n"})
    tree = bare.worktree("noignore-a", "a")
    devd.run("provision", str(tree))
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert ".env is not in .gitignore" in envfile["detail"]


def test_release_after_a_half_failed_provision_removes_what_was_made(devd: Devd,
                                                                     repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    entry = devd.worktree(tree)
    devd.run("release", str(tree))
    # The profile dir is squatted: the next provision makes the cache dir, then fails.
    squatter = Path(entry["browser_profile"])
    squatter.mkdir(parents=True)
    (squatter / "precious").write_text("mine")
    assert devd.run("provision", str(tree), check=False).returncode == 1
    assert Path(entry["cache_dir"]).is_dir()
    devd.run("release", str(tree))
    assert not Path(entry["cache_dir"]).exists()
    assert (squatter / "precious").read_text() == "mine"

