"""Postgres schema and database modes against a real server: isolation with real rows,
template clones, crash-safety, ownership, dumps before drops and restoring them."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import psycopg.sql
import pytest
from conftest import Devd, Repo, run_git
from pgsupport import env_of, query, with_postgres

from devd import naming
from devd.postgres import names as pgnames

pytestmark = pytest.mark.postgres
PSQL = "/usr/lib/postgresql/15/bin/psql"


@pytest.fixture
def pgdevd(devd_home: Devd, pg_url: str) -> Iterator[Devd]:
    devd_home.env["DEVD_POSTGRES_URL"] = pg_url
    devd_home.start()
    yield devd_home
    if devd_home.proc is not None:
        assert devd_home.stop() == 0, devd_home.log()


def pg_name(repo: Repo, tree: Path) -> str:
    return pgnames.identifier(naming.worktree_id(repo.main, tree))


def exists(url: str, kind: str, name: str) -> bool:
    table, column = {"role": ("pg_roles", "rolname"), "database": ("pg_database", "datname"),
                     "schema": ("pg_namespace", "nspname")}[kind]
    return bool(query(url, f"SELECT 1 FROM {table} WHERE {column} = %s", name))


def make_template(pg_url: str, rows: int = 3) -> str:
    name = f"tpl_{uuid.uuid4().hex[:8]}"
    query(pg_url, f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(pg_url, dbname=name)
    query(url, "CREATE TABLE products (id serial PRIMARY KEY, title text)")
    query(url, "INSERT INTO products (title) SELECT 'p' || g FROM generate_series(1, %s) g", rows)
    return name


def remove_worktree(repo: Repo, tree: Path) -> None:
    run_git(repo.main, "worktree", "remove", "--force", str(tree))


def test_database_mode_isolates_clones_dumps_and_restores(pgdevd: Devd, repo: Repo,
                                                          pg_url: str) -> None:
    template = make_template(pg_url)
    with_postgres(repo, f'mode = "database"\ntemplate = "{template}"\n')
    a, b = repo.worktree("shop-a", "feat/a"), repo.worktree("shop-b", "feat/b")
    for tree in (a, b):
        made = pgdevd.run("provision", str(tree))
        # The placeholders written before the database is made are no failure to fix.
        assert "hold placeholders until" in made.stderr and "fix the cause" not in made.stderr
    env_a, env_b = env_of(pgdevd, a), env_of(pgdevd, b)
    assert env_a["DATABASE_URL"] != env_b["DATABASE_URL"]
    assert {"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"} <= set(env_a)
    assert f"DATABASE_URL={env_a['DATABASE_URL']}" in (a / ".env").read_text()
    text = pgdevd.run("status", str(a)).stdout
    assert f"postgres database {env_a['PGDATABASE']} on" in text and "(ready)" in text
    assert env_a["PGPASSWORD"] not in text
    # The clone carries the template's data, owned by the worktree's role.
    assert query(env_a["DATABASE_URL"], "SELECT count(*) FROM products") == [(3,)]
    query(env_a["DATABASE_URL"], "INSERT INTO products (title) VALUES ('only-in-a')")
    query(env_a["DATABASE_URL"], "CREATE TABLE notes (body text)")
    query(env_a["DATABASE_URL"], "INSERT INTO notes VALUES ('from-a')")
    assert query(env_b["DATABASE_URL"], "SELECT count(*) FROM products") == [(3,)]
    with pytest.raises(psycopg.errors.UndefinedTable):
        query(env_b["DATABASE_URL"], "SELECT * FROM notes")
    # B's role may not even connect to A's database.
    b_into_a = psycopg.conninfo.make_conninfo(env_b["DATABASE_URL"], dbname=env_a["PGDATABASE"])
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        query(b_into_a, "SELECT 1")
    status = pgdevd.status()
    entry = pgdevd.worktree(a)["postgres"]
    assert entry == {"mode": "database", "name": pg_name(repo, a), "host": env_a["PGHOST"],
                     "port": int(env_a["PGPORT"]), "state": "ready",
                     # PostgreSQL before 18 (or without file_copy_method = clone) copies bytes
                     "strategy": "copy"}
    assert env_a["PGPASSWORD"] not in str(status)
    # Release needs consent; the worktree removed by git is collected with a dump kept.
    remove_worktree(repo, a)
    result = pgdevd.json("gc", "--grace", "0")
    [released] = [w for w in result["worktrees"] if w["path"] == str(a)]
    assert released["released"] and len(released["dumps"]) == 1
    dump = Path(released["dumps"][0])
    assert dump.stat().st_size > 0 and dump.parent == pgdevd.paths.state_dir / "dumps"
    name = pg_name(repo, a)
    assert not exists(pg_url, "database", name) and not exists(pg_url, "role", name)
    assert query(env_b["DATABASE_URL"], "SELECT count(*) FROM products") == [(3,)]
    # The dump restores: into a scratch database by hand, and by `devd restore`.
    scratch = f"restore_{uuid.uuid4().hex[:8]}"
    query(pg_url, f'CREATE DATABASE "{scratch}"')
    target = psycopg.conninfo.make_conninfo(pg_url, dbname=scratch)
    subprocess.run(["/usr/lib/postgresql/15/bin/pg_restore", "--no-owner", "-d", target,
                    str(dump)], check=True, capture_output=True)
    assert query(target, "SELECT body FROM notes") == [("from-a",)]
    run_git(repo.main, "worktree", "add", "-q", str(a), "feat/a")
    pgdevd.run("provision", str(a))
    env_a = env_of(pgdevd, a)
    assert query(env_a["DATABASE_URL"], "SELECT count(*) FROM products") == [(3,)]
    pgdevd.run("restore", str(a))
    assert query(env_a["DATABASE_URL"], "SELECT body FROM notes") == [("from-a",)]
    assert query(env_a["DATABASE_URL"], "SELECT count(*) FROM products") == [(4,)]


def test_schema_mode_isolates_rows_without_url_options(pgdevd: Devd, repo: Repo,
                                                       pg_url: str) -> None:
    with_postgres(repo, 'mode = "schema"\n')
    hostile = repo.worktree('x"; DROP TABLE y; -- ü', "feat/hostile")
    plain = repo.worktree("shop-plain", "feat/plain")
    for tree in (hostile, plain):
        pgdevd.run("provision", str(tree))
    env_h, env_p = env_of(pgdevd, hostile), env_of(pgdevd, plain)
    assert "options" not in env_h["DATABASE_URL"] and env_h["PGDATABASE"] == env_p["PGDATABASE"]
    for env in (env_h, env_p):
        query(env["DATABASE_URL"], "CREATE TABLE items (v text)")
    query(env_h["DATABASE_URL"], "INSERT INTO items VALUES ('secret')")
    assert query(env_h["DATABASE_URL"], "SELECT current_schema()") == [(pg_name(repo, hostile),)]
    assert query(env_p["DATABASE_URL"], "SELECT count(*) FROM items") == [(0,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(env_p["DATABASE_URL"], f'SELECT * FROM "{pg_name(repo, hostile)}".items')
    assert pgdevd.worktree(hostile)["postgres"]["state"] == "ready"
    remove_worktree(repo, hostile)
    result = pgdevd.json("gc", "--grace", "0")
    [released] = [w for w in result["worktrees"] if w["path"] == str(hostile)]
    assert released["released"] and Path(released["dumps"][0]).stat().st_size > 0
    name = pg_name(repo, hostile)
    assert not exists(pg_url, "schema", name) and not exists(pg_url, "role", name)
    assert query(env_p["DATABASE_URL"], "SELECT count(*) FROM items") == [(0,)]


def test_template_in_use_is_reported_and_only_terminated_on_opt_in(
        pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    template = make_template(pg_url)
    with_postgres(repo, f'mode = "database"\ntemplate = "{template}"\n')
    tree = repo.worktree("shop-t", "feat/t")
    blocker = psycopg.connect(psycopg.conninfo.make_conninfo(
        pg_url, dbname=template, application_name="seed-script"), autocommit=True)
    try:
        failed = pgdevd.run("provision", str(tree), check=False)
        assert failed.returncode == 1
        assert "seed-script" in failed.stderr and str(blocker.info.backend_pid) in failed.stderr
        assert "template_terminate" in failed.stderr
        assert blocker.execute("SELECT 1").fetchone() == (1,)  # not terminated
        (tree / "devd.toml").write_text('[postgres]\nmode = "database"\n'
                                        f'template = "{template}"\ntemplate_terminate = true\n')
        pgdevd.run("provision", str(tree))
        with pytest.raises(psycopg.OperationalError):
            blocker.execute("SELECT 1")
    finally:
        blocker.close()
    assert query(env_of(pgdevd, tree)["DATABASE_URL"], "SELECT count(*) FROM products") == [(3,)]


def test_a_half_made_database_is_released_completely(pgdevd: Devd, repo: Repo,
                                                     pg_url: str) -> None:
    template = make_template(pg_url)
    with_postgres(repo, f'mode = "database"\ntemplate = "{template}"\n')
    tree = repo.worktree("shop-half", "half")
    blocker = psycopg.connect(psycopg.conninfo.make_conninfo(pg_url, dbname=template),
                              autocommit=True)
    try:  # the role is made, then CREATE DATABASE fails on the busy template
        assert pgdevd.run("provision", str(tree), check=False).returncode == 1
        assert exists(pg_url, "role", pg_name(repo, tree))
    finally:
        blocker.close()
    pgdevd.run("release", str(tree), "--yes")
    assert not exists(pg_url, "role", pg_name(repo, tree))


def test_crash_between_role_and_database_is_finished_and_conflicts_touch_nothing(
        pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    with_postgres(repo, 'mode = "database"\n')
    crashed, taken = repo.worktree("shop-crash", "c"), repo.worktree("shop-taken", "t")
    name = pg_name(repo, crashed)
    wt_id = naming.worktree_id(repo.main, crashed)
    # What a daemon killed right after CREATE ROLE leaves behind: a marked role, no database.
    query(pg_url, f'CREATE ROLE "{name}" LOGIN')
    query(pg_url, f"COMMENT ON ROLE \"{name}\" IS 'devd:{wt_id}'")
    pgdevd.run("provision", str(crashed))
    assert exists(pg_url, "database", name)
    assert query(env_of(pgdevd, crashed)["DATABASE_URL"], "SELECT current_user") == [(name,)]
    # Someone else's database under the name devd would use: refused, left as it was.
    other = pg_name(repo, taken)
    query(pg_url, f'CREATE DATABASE "{other}"')
    failed = pgdevd.run("provision", str(taken), check=False)
    assert failed.returncode == 1 and "ownership_conflict" in failed.stderr
    assert exists(pg_url, "database", other) and not exists(pg_url, "role", other)
    pgdevd.run("release", str(taken), "--yes")  # nothing of ours there: succeeds, touches none
    assert exists(pg_url, "database", other)
    query(pg_url, f'DROP DATABASE "{other}"')


def test_release_refuses_while_held_then_force(pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    with_postgres(repo, 'mode = "database"\n')
    tree = repo.worktree("shop-held", "h")
    pgdevd.run("provision", str(tree))
    env = env_of(pgdevd, tree)
    holder = subprocess.Popen([PSQL, env["DATABASE_URL"], "-c", "SELECT pg_sleep(120)"],
                              cwd=tree, env={"PGAPPNAME": "dev-server"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from conftest import wait_for

        wait_for(lambda: query(pg_url, "SELECT 1 FROM pg_stat_activity WHERE application_name"
                               " = 'dev-server'") != [], what="psql session")
        refused = pgdevd.run("release", str(tree), check=False)
        assert refused.returncode == 2 and "--yes" in refused.stderr
        held = pgdevd.run("release", str(tree), "--yes", check=False)
        assert held.returncode == 1 and "dev-server" in held.stderr and "--force" in held.stderr
        assert exists(pg_url, "database", pg_name(repo, tree))
        done = pgdevd.run("release", str(tree), "--yes", "--force", "--no-backup")
        assert "dump kept" not in done.stdout
    finally:
        holder.kill()
        holder.wait()
    assert not exists(pg_url, "database", pg_name(repo, tree))


def test_orphans_are_listed_in_status_and_gc(pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    with_postgres(repo, 'mode = "schema"\n')
    pgdevd.run("provision", str(repo.worktree("shop-o", "o")))
    ghost = f"devd_ghost_{uuid.uuid4().hex[:8]}"
    instance = (pgdevd.paths.state_dir / "instance-id").read_text().strip()
    query(pg_url, f'CREATE ROLE "{ghost}"')
    query(pg_url, f"COMMENT ON ROLE \"{ghost}\" IS 'devd:{instance}:ghost-worktree'")
    try:
        orphans = pgdevd.status()["orphans"]
        assert {"kind": "role", "name": ghost, "worktree_id": "ghost-worktree"} \
            .items() <= next(o for o in orphans if o["name"] == ghost).items()
        dry = pgdevd.run("gc", "--dry-run")
        assert f"orphan role {ghost}" in dry.stdout
        assert exists(pg_url, "role", ghost)
    finally:
        query(pg_url, f'DROP ROLE "{ghost}"')


def test_bad_admin_urls_and_missing_privileges(devd: Devd, repo: Repo, pg_url: str) -> None:
    tree = repo.worktree("shop-bad", "bad")
    low = f"devd_lowpriv_{uuid.uuid4().hex[:6]}"
    query(pg_url, f"CREATE ROLE \"{low}\" LOGIN PASSWORD 'pw'")
    cases = {
        psycopg.conninfo.make_conninfo(pg_url, password="wrong"): "password",
        "postgresql://postgres@127.0.0.1:1/postgres": "start a local Postgres server",
        psycopg.conninfo.make_conninfo(pg_url, dbname="nope"): "existing database",
        psycopg.conninfo.make_conninfo(pg_url, user=low, password="pw"): "CREATEROLE, CREATEDB",
    }
    try:
        for url, expected in cases.items():
            (tree / "devd.toml").write_text(f'[postgres]\nmode = "database"\nurl = "{url}"\n')
            failed = devd.run("provision", str(tree), check=False)
            assert failed.returncode == 1 and expected in failed.stderr, failed.stderr
            assert "wrong" not in failed.stderr  # the admin password is masked
    finally:
        query(pg_url, f'DROP ROLE "{low}"')


def test_names_are_bounded_unique_and_sanitised() -> None:
    long_a, long_b = "w" * 70 + "-a", "w" * 70 + "-b"
    names = {pgnames.identifier(x) for x in (long_a, long_b, 'x"; DROP TABLE y; --', "ü-ß")}
    assert len(names) == 4
    for name in names:
        assert len(name.encode()) <= 63 and all(c.isalnum() or c == "_" for c in name)
        assert name == name.lower() and name.isascii()
    assert pgnames.mask_url("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"


def test_the_callers_postgres_url_wins_and_a_worktree_stays_on_its_server(
        devd: Devd, repo: Repo, pg_url: str) -> None:
    # The daemon was started without DEVD_POSTGRES_URL; the user's shell has it.
    with_postgres(repo, 'mode = "schema"\n')
    tree = repo.worktree("shop-env", "env")
    devd.run("provision", str(tree), env={"DEVD_POSTGRES_URL": pg_url})
    assert query(env_of(devd, tree)["DATABASE_URL"], "SELECT 1") == [(1,)]
    elsewhere = psycopg.conninfo.make_conninfo(pg_url, application_name="other")
    moved = devd.run("provision", str(tree), check=False, env={"DEVD_POSTGRES_URL": elsewhere})
    assert moved.returncode == 1 and "lives on" in moved.stderr
    devd.run("release", str(tree), "--yes", "--no-backup")


@contextlib.contextmanager
def only_admin_may_log_in(pg_url: str) -> Iterator[None]:
    """pg_hba.conf as Debian's socket has it for every role but the admin's: no password
    login (here: no entry at all) for the worktree roles. Restored afterwards."""
    (path,) = query(pg_url, "SELECT current_setting('hba_file')")[0]
    (text,) = query(pg_url, "SELECT pg_read_file(current_setting('hba_file'))")[0]
    admin = psycopg.conninfo.conninfo_to_dict(pg_url)["user"]

    def write(lines: list[str]) -> None:  # COPY writes a row per line (tabs escaped: spaces)
        copy = psycopg.sql.SQL("COPY (SELECT unnest({}::text[])) TO {}").format(
            psycopg.sql.Literal(lines), psycopg.sql.Literal(path))
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(copy)
            conn.execute("SELECT pg_reload_conf()")

    write(["local all all trust", f"host all {admin} all scram-sha-256"])
    try:
        yield
    finally:
        write([line.replace("\t", " ") for line in text.splitlines()])


def test_a_role_the_server_will_not_let_log_in_fails_provision(pgdevd: Devd, repo: Repo,
                                                               pg_url: str) -> None:
    with_postgres(repo, 'mode = "database"\n')
    tree = repo.worktree("shop-peer", "peer")
    with only_admin_may_log_in(pg_url):
        failed = pgdevd.run("provision", str(tree), check=False)
        (postgres,) = [r for r in pgdevd.worktree(tree)["resources"] if r["kind"] == "postgres"]
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"role {pg_name(repo, tree)} cannot log in with its password" in failed.stderr
    assert "pg_hba.conf" in failed.stderr and "over TCP" in failed.stderr
    assert postgres["state"] == "failed", postgres
    assert "PGUSER=devd-postgres-failed" in (tree / ".env").read_text()  # not a dead login
    pgdevd.run("provision", str(tree))  # logins allowed again: the same role, now ready
    assert query(env_of(pgdevd, tree)["DATABASE_URL"], "SELECT 1") == [(1,)]
    pgdevd.run("release", str(tree), "--yes", "--no-backup")
