"""Bad input found in review: each gets a clear error and loses nothing."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from conftest import Devd, Repo, run_git


def test_env_file_behind_a_symlinked_dir_is_refused(devd: Devd, repo: Repo, tmp_path: Path
                                                    ) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ".env").write_text("THEIRS=1\n")
    repo.commit({"devd.toml": '[env]\nfile = "config/.env"\n'})
    tree = repo.worktree("shop-a", "a")
    (tree / "config").symlink_to(victim)
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "outside" in result.stderr
    assert (victim / ".env").read_text() == "THEIRS=1\n"


def test_a_non_utf8_env_file_is_released_without_leaking_it(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    (tree / ".env").write_bytes(b"NAME=caf\xe9\nSECRET=hunter2\n")
    devd.run("provision", str(tree))
    devd.run("release", str(tree))
    assert (tree / ".env").read_bytes() == b"NAME=caf\xe9\nSECRET=hunter2\n"


def test_a_damaged_block_is_refused_not_guessed(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    text = (tree / ".env").read_text()
    damaged = text.replace("# <<< devd <<<\n", "") + "MINE=keep\n"
    (tree / ".env").write_text(damaged)
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "damaged" in result.stderr
    assert (tree / ".env").read_text() == damaged


def test_a_path_reused_by_another_repo_gets_a_clear_error(devd: Devd, make_repo) -> None:
    first, second = make_repo("one"), make_repo("two")
    path = first.main.parent / "reused"
    run_git(first.main, "worktree", "add", "-q", "-b", "r", str(path))
    devd.run("provision", str(path))
    run_git(first.main, "worktree", "remove", str(path))
    run_git(second.main, "worktree", "add", "-q", "-b", "o", str(path))
    result = devd.run("provision", str(path), check=False)
    assert result.returncode == 1 and "still registered" in result.stderr
    assert f"devd release {path.resolve()}" in result.stderr
    devd.run("release", str(path))
    devd.run("provision", str(path))
    assert devd.worktree(path.resolve())["repo"] == str(second.main)


def test_reserved_names_cannot_be_cache_variables(devd: Devd, repo: Repo) -> None:
    repo.commit({"devd.toml": '[cache]\nenv = ["PATH"]\n'})
    tree = repo.worktree("shop-a", "a")
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "'PATH' is devd's own or the system's" in result.stderr


def test_env_and_run_refuse_a_worktree_without_ports(devd_home: Devd, repo: Repo) -> None:
    devd_home.env["DEVD_PORT_RANGE"] = "21000-21002"
    devd_home.start()
    try:
        devd_home.run("provision", str(repo.worktree("shop-a", "a")))
        starved = repo.worktree("shop-b", "b")
        devd_home.run("provision", str(starved), check=False)
        result = devd_home.run("run", "--path", str(starved), "--", "true", check=False)
        assert result.returncode == 1 and "not ready" in result.stderr
        env = devd_home.run("env", str(starved), "--format", "json", check=False)
        assert env.returncode == 1 and "PORT" not in env.stdout
    finally:
        devd_home.stop()


def test_a_nested_unregistered_worktree_is_not_mistaken_for_its_parent(devd: Devd,
                                                                        repo: Repo) -> None:
    devd.run("provision", str(repo.main))
    nested = repo.main / ".claude" / "worktrees" / "x"
    run_git(repo.main, "worktree", "add", "-q", "-b", "x", str(nested))
    result = devd.run("env", str(nested), check=False)
    assert result.returncode == 1 and "not registered" in result.stderr


def test_wrong_parameter_types_are_refused(devd: Devd) -> None:
    # Types are checked by the daemon (usage); an empty path by the handler (protocol).
    for params, code in (({"path": 123}, "usage"), ({"path": None}, "usage"),
                         ({"path": ""}, "protocol")):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(devd.paths.socket))
            request = {"v": 1, "method": "provision", "params": params}
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(sock.makefile().readline())
        assert reply["error"]["code"] == code, reply


def test_json_errors_go_to_stdout_for_scripts(devd: Devd, tmp_path: Path) -> None:
    result = devd.run("provision", str(tmp_path / "nope"), "--json", check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "not_a_worktree"


def test_dotenv_values_read_back_exactly(devd: Devd, make_repo) -> None:
    from dotenv import dotenv_values

    odd = make_repo("odd $HOME 'q' dir")
    tree = odd.worktree("odd $x (it) ü", "a")
    devd.run("provision", str(tree))
    expected = json.loads(devd.run("env", str(tree), "--format", "json").stdout)
    parsed = dotenv_values(tree / ".env", interpolate=False)
    assert {k: parsed[k] for k in expected} == expected
    printed = devd.run("env", str(tree), "--format", "dotenv").stdout
    dump = tree.parent / "printed.env"
    dump.write_text(printed)
    assert dict(dotenv_values(dump, interpolate=False)) == expected
    sh = devd.run("env", str(tree), "--format", "sh").stdout
    echoed = subprocess.run(["bash", "-c", sh + '\nprintf %s "$DEVD_WORKTREE"'],
                            capture_output=True, text=True, check=True).stdout
    assert echoed == str(tree)
