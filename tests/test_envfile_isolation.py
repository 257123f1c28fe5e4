"""The worktree's .env holds devd's values and only devd's, read the same by every loader.

Real git worktrees, a real daemon, real loaders (python-dotenv, npm dotenv from the registry,
direnv, Docker Compose 1.29, sh/dash/bash) and, for the Postgres part, a real server.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import envloaders
import pytest
from conftest import Devd, Repo, run_git, wait_for
from pgsupport import env_of, start_server

from devd import dotenv
from devd.errors import DevdError
from devd.provisioners import envguard

MAIN_URL = "postgresql://postgres:main-secret@127.0.0.1:5432/shop_dev"
# The brief's hostile directory names; none may run under `set -a; . ./.env`.
HOSTILE = ["it's", 'say "hi"', "$(touch pwned)", "`touch pwned`", "back\\slash", "two words"]
MATRIX = ["plain", "", "it's", 'say "hi"', "$(touch pwned)", "`touch pwned`", "back\\slash",
          "tab\there", "ü", "a#b", "a #b", "  lead", "trail  ", "=x", "~/x", "x;y", "a&b|c",
          "*", "{a,b}", "$HOME", "$", "a\\nb", "#start", "'", '"', "x'", "'x", "!x", "it's!"]
REFUSED = {"it's $x": "$", "it's `x`": "`", "it's \\x": "\\", "a\\\\b": "backslash",
           "trail\\": "backslash", "new\nline": "U+000A", "${HOME}": "${", "cr\rx": "U+000D",
           "js\u2028x": "U+2028"}


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return envloaders.install_node(tmp_path_factory.mktemp("node-dotenv"))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    yield from start_server()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_all(paths: list[Path], node_modules: Path, scratch: Path
             ) -> dict[Path, dict[str, dict[str, str]]]:
    scratch.mkdir(exist_ok=True)
    read = envloaders.every_loader(paths, node_modules, scratch)
    assert not list(scratch.glob("pwned*")), "sourcing a .env ran a command"
    return read


def assert_agree(read: dict[str, dict[str, str]], expected: dict[str, str]) -> None:
    for loader, values in read.items():
        assert {k: values.get(k) for k in expected} == expected, loader


# -- quoting ---------------------------------------------------------------------------


def test_every_loader_reads_every_written_value_back(node_modules: Path, tmp_path: Path
                                                     ) -> None:
    expected = {f"V{i}": value for i, value in enumerate(MATRIX)}
    path = tmp_path / "all.env"
    path.write_text("\n".join(dotenv.render(expected)) + "\n")
    assert_agree(read_all([path], node_modules, tmp_path / "scratch")[path], expected)


@pytest.mark.parametrize("value", sorted(REFUSED))
def test_values_no_spelling_fits_are_refused_naming_key_and_character(value: str) -> None:
    with pytest.raises(DevdError) as caught:
        dotenv.quote("DEVD_WORKTREE", value)
    assert caught.value.message.startswith("DEVD_WORKTREE: ")
    assert REFUSED[value] in caught.value.message and caught.value.code == "env_value"


def test_hostile_worktree_names_read_back_through_every_loader(
        devd: Devd, repo: Repo, node_modules: Path, tmp_path: Path) -> None:
    trees = [repo.worktree(name, f"b{i}") for i, name in enumerate(HOSTILE)]
    for tree in trees:
        devd.run("provision", str(tree))
    files = [tree / ".env" for tree in trees]
    read = read_all(files, node_modules, tmp_path / "scratch")
    for tree, path in zip(trees, files, strict=True):
        expected = json.loads(devd.run("env", str(tree), "--format", "json").stdout)
        assert expected["DEVD_WORKTREE"] == str(tree)
        assert_agree(read[path], expected)


def test_a_compose_container_gets_the_same_bytes(devd: Devd, repo: Repo, tmp_path: Path
                                                 ) -> None:
    tree = repo.worktree("`touch pwned` $(touch pwned) \\ \"q\"", "c")
    devd.run("provision", str(tree))
    container = envloaders.compose_run([tree / ".env"], tmp_path / "compose-run", 0)
    assert container["DEVD_WORKTREE"] == str(tree)


def test_a_name_no_spelling_fits_fails_loudly_and_writes_the_rest(devd: Devd, repo: Repo,
                                                                 tmp_path: Path) -> None:
    tree = repo.worktree("it's$(touch pwned)", "b")
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1
    assert "DEVD_WORKTREE: its value holds both ' and $" in result.stderr
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert envfile["state"] == "failed" and "DEVD_WORKTREE" in envfile["detail"]
    text = (tree / ".env").read_text()
    assert "# DEVD_WORKTREE: not written" in text and "PORT_WEB=" in text
    for name in envloaders.SHELLS:
        values = envloaders.shell(name, tree / ".env", tmp_path)
        assert "DEVD_WORKTREE" not in values and values["PORT"].isdigit()
    assert not list(tmp_path.glob("pwned*"))
    printed = devd.run("env", str(tree), "--format", "dotenv", check=False)
    assert printed.returncode == 1 and "DEVD_WORKTREE" in printed.stderr and not printed.stdout
    # The environment itself stays exact: no .env quoting is involved.
    assert json.loads(devd.run("env", str(tree), "--format", "json").stdout)[
        "DEVD_WORKTREE"] == str(tree)


# -- managed keys, copies, user files --------------------------------------------------


def test_neutralise_handles_export_spaces_twice_and_multi_line_values() -> None:
    text = ("A=1\nexport  PORT = 3000\nPORT=3001\nKEEP='x\ny'\nDATABASE_URL=\"a\nb\"\n"
            "PORT: 3002\n# PORT=comment\nZ=2\n'PGHOST'=h\nPGPORT:1\n")
    new, removed = dotenv.neutralise(text, {"PORT", "DATABASE_URL", "PGHOST", "PGPORT"}
                                     .__contains__, lambda key: f"# {key} removed")
    assert removed == ["PORT", "PORT", "DATABASE_URL", "PORT", "PGHOST", "PGPORT"]
    assert new == ("A=1\n# PORT removed\n# PORT removed\nKEEP='x\ny'\n# DATABASE_URL removed\n"
                   "# PORT removed\n# PORT=comment\nZ=2\n# PGHOST removed\n# PGPORT removed\n")


def write_main_env(repo: Repo) -> None:
    (repo.main / ".env").write_text(
        f"SECRET=keep-me\nDATABASE_URL={MAIN_URL}\nPORT=3000\nexport PORT = 3001\n"
        "PGPASSWORD=\"main-secret\nspans lines\"\nREDIS_URL=redis://main:6379/0\n"
        "DEVD_CACHE_DIR=/main/cache\n")
    (repo.main / ".env.local").write_text(f"DATABASE_URL: {MAIN_URL}\nLOCAL_ONLY=1\n")
    os.chmod(repo.main / ".env", 0o644)
    os.chmod(repo.main / ".env.local", 0o644)


def test_a_failed_postgres_step_never_leaves_a_path_to_mains_database(
        devd: Devd, repo: Repo, node_modules: Path, pg_url: str, tmp_path: Path) -> None:
    repo.commit({"devd.toml": '[ports]\nnames = ["web"]\n\n[env]\nmanaged = ["REDIS_*"]\n\n'
                 f'[postgres]\nmode = "database"\n'
                 f'url = "postgresql://postgres@127.0.0.1:{closed_port()}/postgres"\n'})
    write_main_env(repo)
    tree = repo.worktree("shop-a", "a")
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "cannot connect to Postgres" in result.stderr
    # devd's own block (the copied .env is also [env] file) is never taken for a copy's line.
    assert "removed the main worktree's DEVD_WORKTREE" not in result.stderr
    env_file, local = tree / ".env", tree / ".env.local"
    for path in (env_file, local):
        text = path.read_text()
        assert "shop_dev" not in text and "main-secret" not in text and "redis://main" \
            not in text, text
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "SECRET=keep-me" in env_file.read_text() and "LOCAL_ONLY=1" in local.read_text()
    assert "spans lines" not in env_file.read_text()  # a multi-line value goes whole
    read = read_all([env_file, local], node_modules, tmp_path / "scratch")
    for path in (env_file, local):
        for loader, values in read[path].items():
            assert "shop_dev" not in values.get("DATABASE_URL", ""), (path, loader)
            assert values.get("PORT", "") not in ("3000", "3001"), (path, loader)
    # Next.js and Vite read .env.local over .env: it holds no DATABASE_URL at all now.
    assert "DATABASE_URL" not in read[local]["dotenv"]
    placeholder = read[env_file]["python-dotenv"]["DATABASE_URL"]
    assert "devd-postgres-failed-see-devd-status.invalid" in placeholder
    assert_agree(read[env_file], {"DATABASE_URL": placeholder})

    # devd env / run: the same placeholders, one warning line on stderr.
    shown = devd.run("env", str(tree), "--format", "json")
    assert json.loads(shown.stdout)["DATABASE_URL"] == placeholder
    warnings = [line for line in shown.stderr.splitlines() if line]
    assert len(warnings) == 1 and "Postgres is failed" in warnings[0], shown.stderr
    probe = ("import os, psycopg\ntry:\n psycopg.connect(os.environ['DATABASE_URL'], "
             "connect_timeout=10)\nexcept psycopg.OperationalError as e:\n print(e)")
    caller = {"DATABASE_URL": MAIN_URL, "PGHOST": "main-host", "PGHOSTADDR": "127.0.0.1",
              "PGSERVICE": "main"}  # the main worktree's shell
    ran = devd.run("run", "--path", str(tree), "--", sys.executable, "-c", probe, env=caller)
    assert "devd-postgres-failed" in ran.stdout and "shop_dev" not in ran.stdout
    seen = devd.run("run", "--path", str(tree), "--", "env", env=caller).stdout
    assert "PGHOSTADDR=" not in seen and "PGSERVICE=" not in seen
    pg_js = ("new (require('pg').Client)({connectionString: process.env.DATABASE_URL})"
             ".connect().catch(e => console.log(e.message))")
    ran = devd.run("run", "--path", str(tree), "--", "node", "-e", pg_js,
                   env={"NODE_PATH": str(node_modules)})
    assert "ENOTFOUND devd-postgres-failed" in ran.stdout, ran.stdout
    entry = devd.worktree(tree)
    states = {r["kind"]: (r["state"], r["detail"]) for r in entry["resources"]}
    assert states["postgres"][0] == "failed"
    assert "Postgres is failed" in states["envfile"][1] and "devd provision" in \
        states["envfile"][1]

    # A real server: the next provision writes the real values, the copies stay clean.
    devd.run("provision", str(tree), env={"DEVD_POSTGRES_URL": pg_url})
    real = env_of(devd, tree)
    assert real["PGHOST"] != placeholder and ".invalid" not in real["DATABASE_URL"]
    read = read_all([env_file, local], node_modules, tmp_path / "scratch2")
    assert_agree(read[env_file], {k: real[k] for k in envguard.DB_KEYS})
    import psycopg

    with psycopg.connect(read[env_file]["python-dotenv"]["DATABASE_URL"],
                         connect_timeout=10) as conn:
        assert conn.info.dbname == real["PGDATABASE"] != "shop_dev"
    assert "DATABASE_URL" not in read[local]["dotenv"]
    assert not devd.run("env", str(tree)).stderr.strip()
    assert {r["kind"]: r["state"] for r in devd.worktree(tree)["resources"]}["envfile"] \
        == "ready"
    devd.run("release", str(tree), "--yes", "--no-backup")


def test_a_pending_postgres_step_already_has_failing_placeholders(
        devd: Devd, repo: Repo, node_modules: Path, tmp_path: Path) -> None:
    with socket.socket() as server:  # accepts, never answers: the step hangs until closed
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        repo.commit({"devd.toml": '[postgres]\nmode = "schema"\n'
                     f'url = "postgresql://postgres@127.0.0.1:{port}/postgres"\n'})
        write_main_env(repo)
        tree = repo.worktree("shop-p", "p")
        devd.run("provision", "--background", str(tree))
        # The step times out by itself after a few seconds: keep the very text that was
        # seen pending (a second read may already find it failed).
        snapshot = tmp_path / "pending.env"

        def pending() -> bool:
            snapshot.write_text(text := _text(tree / ".env"))
            return "devd-postgres-pending" in text
        wait_for(pending, what="early .env")
        read = read_all([snapshot], node_modules, tmp_path / "scratch")[snapshot]
        assert_agree(read, {"PGHOST": "devd-postgres-pending-see-devd-status.invalid"})
        assert "shop_dev" not in (tree / ".env").read_text() + (tree / ".env.local").read_text()
        conn, _ = server.accept()
        conn.close()
    wait_for(lambda: devd.worktree(tree)["state"] == "failed", timeout=60,
             what="provision to fail")
    assert "devd-postgres-failed" in (tree / ".env").read_text()


def test_postgres_added_after_provisioning_gets_placeholders_until_provisioned(
        devd: Devd, repo: Repo) -> None:
    write_main_env(repo)
    tree = repo.worktree("shop-n", "n")
    devd.run("provision", str(tree))
    assert "shop_dev" in (tree / ".env").read_text()  # no [postgres]: main's URL is the app's
    (tree / "devd.toml").write_text('[postgres]\nmode = "schema"\n')  # the branch adds it
    shown = devd.run("env", str(tree), "--format", "json")
    assert "devd-postgres-not-provisioned" in json.loads(shown.stdout)["DATABASE_URL"]
    assert "devd: warning: this worktree's Postgres is not-provisioned" in shown.stderr
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert envfile["state"] == "failed" and "DATABASE_URL at .env:2" in envfile["detail"]
    result = devd.run("provision", str(tree), check=False)  # no server: fails, but cleans
    assert result.returncode == 1
    assert "shop_dev" not in (tree / ".env").read_text() + (tree / ".env.local").read_text()


def test_user_files_are_reported_not_rewritten(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-u", "u")
    mine = "export PORT = 3000\n# a note\nPORT_WEB=1\nDEVD_WORKTREE = /elsewhere\nOK=1\n"
    (tree / ".env.development.local").write_text(mine)
    (tree / ".env").write_text("PORT=4000\n")  # the user's own, made before devd copied
    os.chmod(tree / ".env", 0o644)
    devd.run("provision", str(tree))
    assert (tree / ".env.development.local").read_text() == mine
    assert (tree / ".env").read_text().startswith("PORT=4000\n")
    assert stat.S_IMODE((tree / ".env").stat().st_mode) == 0o600
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert envfile["state"] == "failed", envfile
    for spot in ("PORT at .env:1, .env.development.local:1", "PORT_WEB at "
                 ".env.development.local:3", "DEVD_WORKTREE at .env.development.local:4"):
        assert spot in envfile["detail"], envfile["detail"]
    assert "OK" not in envfile["detail"] and "devd run" in envfile["detail"]
    text = devd.run("status", str(tree)).stdout
    assert ".env.development.local:1" in text
    (tree / ".env.development.local").write_text("OK=1\n")
    (tree / ".env").write_text("\n".join((tree / ".env").read_text().split("\n")[1:]))
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert envfile["state"] == "ready", envfile


# -- where devd may write ----------------------------------------------------------------


@pytest.mark.parametrize("section", ['file = ".git/config"', 'copy = ["x/.GIT/hooks/a"]',
                                     'file = "../outside.env"', 'managed = ["NOT-A-KEY"]'])
def test_env_paths_into_git_or_outside_are_config_errors(devd: Devd, repo: Repo,
                                                         section: str) -> None:
    repo.commit({"devd.toml": f"[env]\n{section}\n"})
    tree = repo.worktree("shop-g", "g")
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "devd.toml" in result.stderr, result.stderr
    assert run_git(tree, "status", "--porcelain") == ""
    assert "devd" not in (repo.main / ".git" / "config").read_text()


@pytest.mark.parametrize("section", ['file = "README.md"', 'copy = ["README.md"]'])
def test_tracked_files_are_refused(devd: Devd, repo: Repo, section: str) -> None:
    repo.commit({"devd.toml": f"[env]\n{section}\n"})
    tree = repo.worktree("shop-t", "t")
    if "copy" in section:
        (tree / "README.md").unlink()  # a copy would be made: the entry is refused first
    result = devd.run("provision", str(tree), check=False)
    assert result.returncode == 1 and "'README.md' is tracked by git" in result.stderr
    assert (repo.main / "README.md").read_text() == "hello\n"
    if "file" in section:
        assert (tree / "README.md").read_text() == "hello\n"


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_modes_of_copies_keep_only_owner_bits(devd: Devd, repo: Repo) -> None:
    write_main_env(repo)
    os.chmod(repo.main / ".env.local", 0o755)
    tree = repo.worktree("shop-m", "m")
    devd.run("provision", str(tree))
    assert stat.S_IMODE((tree / ".env").stat().st_mode) == 0o600
    assert stat.S_IMODE((tree / ".env.local").stat().st_mode) == 0o700
    assert subprocess.run(["git", "-C", str(tree), "status", "--porcelain"],
                          capture_output=True, text=True, check=True).stdout == ""


def test_a_newline_in_the_worktree_path_writes_nothing_outside_it(devd: Devd, repo: Repo,
                                                                  tmp_path: Path) -> None:
    victim = repo.main.parent / "victim"
    victim.mkdir()
    tree = repo.worktree("victim\nwt", "nl")
    result = devd.run("provision", str(tree), check=False)
    assert list(victim.iterdir()) == [], "devd wrote into a directory that is not the worktree"
    assert str(victim) not in [w["path"] for w in devd.status()["worktrees"]]
    if result.returncode == 0:
        values = envloaders.shell("sh", tree / ".env", tmp_path)
        assert "DEVD_WORKTREE" not in values  # refused: no spelling holds a newline
