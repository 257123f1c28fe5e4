"""Attacks on issue 9's isolation: main-worktree files spelt the way real editors and
loaders allow, failures half-way, a second instance. Real git, daemon, loaders, Postgres.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import test_pgownership
import test_postgres
from conftest import Devd, Repo, wait_for
from envloaders import SHELLS, compose_config, direnv, node, python_dotenv, shell
from pgsupport import IMAGE, TEST_LABEL, docker_client, env_of, query, unavailable, with_postgres
from test_envfile_isolation import MAIN_URL, closed_port, node_modules

from devd import dotenv

__all__ = ["node_modules"]  # the session fixture, shared with test_envfile_isolation

# Each is a main-worktree .env that python-dotenv and npm dotenv both read MAIN_URL from.
TRICKS = {
    # python-dotenv and npm dotenv close "C:\\" at its quote; a lone-backslash rule did not.
    "escaped-backslash": f'WIN_DIR="C:\\\\"\nDATABASE_URL={MAIN_URL}\nOTHER="x"\n',
    "bom": f"\ufeffDATABASE_URL={MAIN_URL}\nA=1\n",  # Windows editors write one
    "cr-only": f"A=1\rDATABASE_URL={MAIN_URL}\rB=2\r",
    "crlf": f"A=1\r\nexport DATABASE_URL={MAIN_URL}\r\nB=2\r\n",
    "nbsp": f"\u00a0DATABASE_URL={MAIN_URL}\n",
}


def loaders(path: Path, modules: Path, scratch: Path) -> dict[str, dict[str, str]]:
    """{loader: values}; a loader that refuses the file (direnv, Compose on a BOM) fails
    loudly, which is no leak: it reads nothing."""
    scratch.mkdir(exist_ok=True)
    read = {"python-dotenv": python_dotenv(path), **node(modules, [path])[str(path)]}
    readers = {"direnv": lambda: direnv(path),
               "compose-1.29": lambda: compose_config([path], scratch / "c")[path],
               **{name: (lambda name=name: shell(name, path, scratch)) for name in SHELLS}}
    for name, reader in readers.items():
        try:
            read[name] = reader()
        except subprocess.CalledProcessError:
            read[name] = {}
    return read


def node_env_file(path: Path) -> str:
    """What Node's own loaders (node --env-file, process.loadEnvFile) read for DATABASE_URL."""
    flag = subprocess.run(["node", f"--env-file={path}", "-p", "process.env.DATABASE_URL"],
                          capture_output=True, text=True, check=True).stdout
    loaded = subprocess.run(["node", "-p", f"process.loadEnvFile({str(path)!r}); "
                             "process.env.DATABASE_URL"], capture_output=True, text=True,
                            check=True).stdout
    return flag + loaded


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_tricky_spellings_are_neutralised_for_every_loader(
        trick: str, node_modules: Path, tmp_path: Path) -> None:
    original = TRICKS[trick]
    before = tmp_path / "before.env"
    before.write_text(original, newline="")
    read = loaders(before, node_modules, tmp_path / "scratch")
    assert read["python-dotenv"]["DATABASE_URL"] == read["dotenv"]["DATABASE_URL"] == MAIN_URL
    new, removed = dotenv.neutralise(original, {"DATABASE_URL"}.__contains__,
                                     lambda key: f"# {key} removed")
    assert removed == ["DATABASE_URL"]
    after = tmp_path / "after.env"
    after.write_text(new, newline="")
    read = loaders(after, node_modules, tmp_path / "scratch2")
    for loader, values in read.items():
        assert MAIN_URL not in values.get("DATABASE_URL", ""), loader
    assert MAIN_URL not in node_env_file(after)
    # The other lines keep their line endings.
    assert new.count("\r") == original.count("\r")


def test_copied_tricky_files_and_envrc_never_lead_to_main(
        devd: Devd, repo: Repo, node_modules: Path, tmp_path: Path) -> None:
    repo.commit({"devd.toml": '[postgres]\nmode = "database"\n'
                 f'url = "postgresql://postgres@127.0.0.1:{closed_port()}/postgres"\n',
                 ".worktreeinclude": ".env*\n", ".gitignore": ".env*\n"})
    (repo.main / ".env").write_text(TRICKS["escaped-backslash"])
    (repo.main / ".env.development.local").write_bytes(TRICKS["bom"].encode())
    (repo.main / ".env.test").write_bytes(TRICKS["cr-only"].encode())
    (repo.main / ".envrc").write_text(f"dotenv\nexport DATABASE_URL={MAIN_URL}\n")
    os.chmod(repo.main / ".envrc", 0o644)
    tree = repo.worktree("shop-t", "t")
    assert devd.run("provision", str(tree), check=False).returncode == 1  # no server
    files = [tree / name for name in (".env", ".env.development.local", ".env.test")]
    for path in files:
        for loader, values in loaders(path, node_modules, tmp_path / path.name).items():
            assert MAIN_URL not in values.get("DATABASE_URL", ""), (path.name, loader)
        assert MAIN_URL not in node_env_file(path), path.name
    assert MAIN_URL not in (tree / ".envrc").read_text()
    # A line added by hand after the copy is reported, in a file direnv loads.
    (tree / ".envrc").write_text(f"export DATABASE_URL={MAIN_URL}\n")
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert "DATABASE_URL at .envrc:1" in envfile["detail"], envfile["detail"]


def test_postgres_urls_under_other_names_are_removed_from_copies(
        devd: Devd, repo: Repo, node_modules: Path, tmp_path: Path) -> None:
    repo.commit({"devd.toml": '[postgres]\nmode = "database"\n'
                 f'url = "postgresql://postgres@127.0.0.1:{closed_port()}/postgres"\n'})
    main_db = MAIN_URL.split("://", 1)[1]
    (repo.main / ".env").write_text(  # Prisma, Vercel Postgres, SQLAlchemy, JDBC spellings
        f"DIRECT_URL={MAIN_URL}\nPOSTGRES_PRISMA_URL=\"postgres://{main_db}?pgbouncer=true\"\n"
        f"SQLALCHEMY_URL=postgresql+psycopg://{main_db}\nJDBC=jdbc:postgresql://{main_db}\n"
        "REDIS_URL=redis://main:6379/0\n# docs: postgres://example\n")
    tree = repo.worktree("shop-u", "u")
    assert devd.run("provision", str(tree), check=False).returncode == 1  # no server
    text = (tree / ".env").read_text()
    assert main_db not in text and "REDIS_URL=redis://main:6379/0" in text, text
    assert "# docs: postgres://example" in text and "DIRECT_URL: the main worktree's Postgres" \
        in text
    for loader, values in loaders(tree / ".env", node_modules, tmp_path).items():
        assert not [k for k, v in values.items() if main_db in v], loader
        # Failing, not absent: an app falling back to DATABASE_URL (its dev database) for
        # TEST_DATABASE_URL or DIRECT_URL would run its tests or migrations there.
        assert ".invalid" in values["DIRECT_URL"] and ".invalid" in values["JDBC"], loader
    again = devd.run("provision", str(tree), check=False)
    assert (tree / ".env").read_text() == text and "DIRECT_URL" not in again.stderr


def test_lowercase_keys_pydantic_settings_reads_are_neutralised(
        devd: Devd, repo: Repo, tmp_path: Path) -> None:
    from pydantic_settings import BaseSettings, SettingsConfigDict

    repo.commit({"devd.toml": '[postgres]\nmode = "database"\n'
                 f'url = "postgresql://postgres@127.0.0.1:{closed_port()}/postgres"\n'})
    (repo.main / ".env.local").write_text(f"database_url={MAIN_URL}\nPgPassword=main-secret\n")
    tree = repo.worktree("shop-l", "l")
    assert devd.run("provision", str(tree), check=False).returncode == 1  # no server

    class Settings(BaseSettings):  # FastAPI's usual settings, case-insensitive by default
        model_config = SettingsConfigDict(env_file=(tree / ".env", tree / ".env.local"),
                                          extra="ignore")
        database_url: str
        pgpassword: str

    read = Settings()
    assert ".invalid" in read.database_url and read.pgpassword != "main-secret"
    (tree / ".env.local").write_text(f"database_url={MAIN_URL}\n")  # the user's own now
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert "database_url at .env.local:1" in envfile["detail"], envfile["detail"]


# -- Postgres ------------------------------------------------------------------------------

PUBLIC_GRANTS = ["CREATE TABLE orders (id int, who text)", "INSERT INTO orders VALUES (1, 'main')",
                 "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO PUBLIC",
                 "CREATE FUNCTION archive() RETURNS void LANGUAGE sql SECURITY DEFINER "
                 "AS 'DELETE FROM orders'"]


@pytest.mark.postgres
def test_schema_mode_refuses_tables_every_role_may_read(devd_home: Devd, repo: Repo,
                                                        pg_url: str) -> None:
    app = test_pgownership.scratch_db(pg_url, PUBLIC_GRANTS)
    devd_home.env["DEVD_POSTGRES_URL"] = app
    devd_home.start()
    with_postgres(repo, 'mode = "schema"\n')
    tree = repo.worktree("shop-pub", "feat/pub")
    result = devd_home.run("provision", str(tree), check=False)
    if result.returncode == 0:  # then the worktree must at least not reach main's rows
        url = env_of(devd_home, tree)["DATABASE_URL"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            query(url, "SELECT * FROM public.orders")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            query(url, "INSERT INTO public.orders VALUES (2, 'worktree')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            query(url, "SELECT public.archive()")
    assert result.returncode == 1 and "schema mode cannot isolate" in result.stderr
    assert "public.orders" in result.stderr and "FROM PUBLIC" in result.stderr
    assert "REVOKE ALL ON FUNCTION public.archive() FROM PUBLIC" in result.stderr
    assert ".invalid" in env_of(devd_home, tree)["DATABASE_URL"]
    assert query(app, "SELECT * FROM orders") == [(1, "main")]
    assert devd_home.stop() == 0, devd_home.log()


def dump_waiting(admin: str) -> bool:
    return bool(query(admin, "SELECT 1 FROM pg_stat_activity WHERE application_name = "
                      "'pg_dump' AND wait_event_type = 'Lock'"))


@pytest.mark.postgres
def test_a_write_during_the_release_dump_is_never_dropped_unseen(
        devd_home: Devd, repo: Repo, pg_url: str) -> None:
    app = test_pgownership.scratch_db(pg_url, [])
    devd_home.env["DEVD_POSTGRES_URL"] = app
    devd_home.start()
    with_postgres(repo, 'mode = "schema"\n')
    tree = repo.worktree("shop-race", "feat/race")
    devd_home.run("provision", str(tree))
    env = env_of(devd_home, tree)
    query(env["DATABASE_URL"], "CREATE TABLE slow (x int); CREATE TABLE jobs (x int)")
    # Another role's lock holds pg_dump at one table: the window a big dump has anyway.
    with psycopg.connect(app) as holder:
        holder.execute(f'LOCK TABLE "{env["PGUSER"]}".slow IN ACCESS EXCLUSIVE MODE')
        release = subprocess.Popen([sys.executable, "-m", "devd", "release", str(tree), "--yes"],
                                   env=devd_home.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        wait_for(lambda: dump_waiting(app), what="pg_dump to wait on the lock")
        try:  # a worker of the app writes a row and disconnects, as apps do
            query(env["DATABASE_URL"], "INSERT INTO jobs VALUES (42)")
            written = True
        except psycopg.OperationalError:
            written = False  # refused loudly while the release runs: nothing to lose
    out, err = release.communicate(timeout=180)
    if release.returncode == 0 and written:
        devd_home.run("provision", str(tree))
        devd_home.run("restore", str(tree))
        rows = query(env_of(devd_home, tree)["DATABASE_URL"], "SELECT * FROM jobs")
        assert rows == [(42,)], "a row written during the release is in neither place"
    assert release.returncode == 0 and not written, (out, err)
    assert devd_home.stop() == 0, devd_home.log()


pgdevd = test_postgres.pgdevd


@pytest.mark.postgres
def test_a_restore_failing_after_large_objects_is_rolled_back(
        pgdevd: Devd, repo: Repo, pg_url: str, tmp_path: Path) -> None:
    with_postgres(repo, 'mode = "database"\n')
    tree = repo.worktree("shop-lo", "feat/lo")
    pgdevd.run("provision", str(tree))
    url = env_of(pgdevd, tree)["DATABASE_URL"]
    query(url, "CREATE TABLE keep (id int, v text)")
    query(url, "INSERT INTO keep VALUES (1, 'current')")
    # pg_restore wraps large objects in BEGIN/COMMIT; the event trigger after them (post-data,
    # superuser only) fails when loaded as the worktree role.
    foreign = test_pgownership.scratch_db(pg_url, [
        "CREATE TABLE keep (id int, v text)", "INSERT INTO keep VALUES (9, 'dump')",
        "SELECT lo_create(4243)",
        "CREATE FUNCTION et() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END'",
        "CREATE EVENT TRIGGER et ON ddl_command_start EXECUTE FUNCTION et()"])
    dumped = tmp_path / "lo.dump"
    subprocess.run([test_pgownership.PG_DUMP, "-Fc", "-f", str(dumped), foreign], check=True)
    failed = pgdevd.run("restore", str(tree), "--dump", str(dumped), check=False)
    assert failed.returncode == 1 and "exactly as before" in failed.stderr, failed.stderr
    assert query(url, "SELECT * FROM keep") == [(1, "current")]
    assert query(url, "SELECT count(*) FROM pg_largeobject_metadata") == [(0,)]


def evil_dump(pg_url: str, tmp_path: Path, role: str, schema: str) -> Path:
    """A real -Fc archive whose one TOC entry's SQL was edited (same length) to leave the
    restoring role: a dump from a stranger, a CI artifact, a bug report."""
    comment = "X" * 60
    source = test_pgownership.scratch_db(pg_url, [
        f'CREATE SCHEMA IF NOT EXISTS "{schema}"', f'CREATE TABLE "{schema}".keep (id int)',
        f"COMMENT ON TABLE \"{schema}\".keep IS '{comment}'"])
    path = tmp_path / "evil.dump"
    subprocess.run([test_pgownership.PG_DUMP, "-Fc", "-f", str(path), source], check=True)
    old = f"'{comment}';".encode()
    new = f"'x'; RESET ROLE; CREATE ROLE {role};--".encode().ljust(len(old))
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["database", "schema"])
def test_a_hostile_dump_cannot_act_as_the_admin(pgdevd: Devd, repo: Repo, pg_url: str,
                                                tmp_path: Path, mode: str) -> None:
    with_postgres(repo, f'mode = "{mode}"\n')
    tree = repo.worktree(f"shop-evil-{mode}", f"evil-{mode}")
    pgdevd.run("provision", str(tree))
    role = f"devd_pwned_{uuid.uuid4().hex[:8]}"
    schema = env_of(pgdevd, tree)["PGUSER"] if mode == "schema" else "public"
    done = pgdevd.run("restore", str(tree), "--dump",
                      str(evil_dump(pg_url, tmp_path, role, schema)), check=False)
    made = query(pg_url, "SELECT count(*) FROM pg_roles WHERE rolname = %s", role) == [(1,)]
    if made:
        query(pg_url, f'DROP ROLE "{role}"')
    assert not made, done.stderr
    assert done.returncode == 1 and "exactly as before" in done.stderr, done.stderr


@pytest.fixture
def own_server() -> Iterator[Any]:
    """A server of this test's own, which it may freeze and stop."""
    docker_client()
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer
    container = PostgresContainer(IMAGE, username="postgres", password="devd-test-pw",
                                  dbname="postgres", driver=None)
    container.with_kwargs(labels={TEST_LABEL: "postgres-server"})
    try:
        container.start()
    except Exception as exc:  # noqa: BLE001 - image missing, engine refusing: unavailable
        container.stop()
        unavailable(f"cannot start {IMAGE}: {exc}")
    try:
        yield container
    finally:
        with contextlib.suppress(Exception):
            container.get_wrapped_container().unpause()
        container.stop()


@pytest.mark.postgres
def test_a_server_frozen_then_stopped_mid_clone_never_leads_to_main(
        devd_home: Devd, repo: Repo, own_server: Any, node_modules: Path,
        tmp_path: Path) -> None:
    url = own_server.get_connection_url()
    query(url, "CREATE DATABASE shop_tpl")
    query(psycopg.conninfo.make_conninfo(url, dbname="shop_tpl"),
          "CREATE TABLE big AS SELECT g, md5(g::text) m FROM generate_series(1, 400000) g")
    devd_home.env["DEVD_POSTGRES_URL"] = url
    devd_home.start()
    with_postgres(repo, 'mode = "database"\ntemplate = "shop_tpl"\n')
    (repo.main / ".env").write_text(f"DATABASE_URL={MAIN_URL}\nPGDATABASE=shop_dev\n")
    tree = repo.worktree("shop-frozen", "frozen")
    devd_home.run("provision", "--background", str(tree))
    wait_for(lambda: query(url, "SELECT 1 FROM pg_stat_activity WHERE query LIKE "
                                "'CREATE DATABASE%%TEMPLATE%%' AND pid <> pg_backend_pid()"),
             timeout=60, what="the clone to start")
    own_server.get_wrapped_container().pause()  # frozen mid-clone
    snapshot = tmp_path / "frozen.env"
    snapshot.write_text((tree / ".env").read_text())
    for loader, values in loaders(snapshot, node_modules, tmp_path / "s1").items():
        assert MAIN_URL not in values.get("DATABASE_URL", "") and values.get(
            "PGDATABASE") != "shop_dev", loader
    assert "devd-postgres-pending" in snapshot.read_text()
    own_server.get_wrapped_container().unpause()
    own_server.get_wrapped_container().kill()  # and then gone
    wait_for(lambda: devd_home.worktree(tree)["state"] == "failed", timeout=120,
             what="provision to fail")
    text = (tree / ".env").read_text()
    assert "devd-postgres-failed" in text and "shop_dev" not in text, text
    shown = devd_home.run("env", str(tree), "--format", "json")
    assert ".invalid" in json.loads(shown.stdout)["DATABASE_URL"] and "failed" in shown.stderr
    assert devd_home.stop() == 0, devd_home.log()
