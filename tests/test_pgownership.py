"""Template clones are the worktree's, schema mode sees only its schema, and restore never
destroys: against a real Postgres server, through the real daemon."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import test_pgcontainer
import test_postgres
from conftest import Devd, Repo
from pgsupport import IMAGE, env_of, query, with_postgres

from devd import naming
from devd.postgres import names as pgnames

pytestmark = pytest.mark.postgres
# The daemon fixture of test_postgres.py (pg_url: the session's server, conftest.py).
pgdevd = test_postgres.pgdevd
dk = test_pgcontainer.dk
PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"

TEMPLATE_SQL = [
    "CREATE EXTENSION pgcrypto",
    "CREATE SCHEMA app",
    "CREATE TYPE mood AS ENUM ('sad', 'ok')",
    "CREATE TYPE pair AS (a int, b text)",
    "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
    "CREATE TYPE floatrange AS RANGE (subtype = float8)",
    "CREATE TABLE people (id serial PRIMARY KEY, name text, m mood, p posint, "
    "tok bytea DEFAULT gen_random_bytes(4))",
    "CREATE TABLE app.items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text)",
    "CREATE TABLE parted (id int, k int) PARTITION BY RANGE (k)",
    "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10)",
    "CREATE SEQUENCE counter",
    "CREATE VIEW people_v AS SELECT id, name FROM people",
    "CREATE MATERIALIZED VIEW people_mv AS SELECT id FROM people",
    "CREATE FUNCTION add1(int) RETURNS int LANGUAGE sql AS 'SELECT $1 + 1'",
    "CREATE PROCEDURE noop() LANGUAGE sql AS 'SELECT 1'",
    "CREATE AGGREGATE mysum(int) (sfunc = int4pl, stype = int)",
    "CREATE TEXT SEARCH CONFIGURATION mycfg (COPY = simple)",
    "SELECT lo_create(4242)",
    "INSERT INTO people (name, m, p) VALUES ('ann', 'ok', 1)",
    # Hostile names: the generated ALTERs must quote every one of them.
    'CREATE SCHEMA "Sch ema; DROP"',
    'CREATE TABLE "Sch ema; DROP"."we""ird ta-ble" (x int)',
    'CREATE TYPE "Sch ema; DROP"."m\'o""od" AS ENUM (\'x\')',
    'CREATE FUNCTION "Sch ema; DROP"."f\'n ü"("Sch ema; DROP"."m\'o""od") RETURNS int '
    "LANGUAGE sql AS 'SELECT 1'",
]
# What a migration does to objects it must own.
MIGRATION = [
    "ALTER TYPE mood ADD VALUE 'happy'",
    "CREATE OR REPLACE FUNCTION add1(int) RETURNS int LANGUAGE sql AS 'SELECT $1 + 2'",
    "CREATE OR REPLACE PROCEDURE noop() LANGUAGE sql AS 'SELECT 2'",
    "ALTER DOMAIN posint ADD CONSTRAINT small CHECK (VALUE < 1000)",
    "ALTER TYPE pair ADD ATTRIBUTE c int",
    "ALTER VIEW people_v RENAME TO people_names",
    "ALTER MATERIALIZED VIEW people_mv RENAME TO people_ids",
    "ALTER SEQUENCE counter RESTART WITH 100",
    "ALTER TABLE parted ADD COLUMN note text",
    "ALTER TABLE app.items ADD COLUMN done bool",
    "DROP AGGREGATE mysum(int)",
    "ALTER TEXT SEARCH CONFIGURATION mycfg RENAME TO mycfg2",
    "CREATE TABLE notes (body text)",
    "INSERT INTO notes VALUES ('from-the-worktree')",
]
# Objects outside extensions that someone other than the worktree's role still owns (a range
# type's constructors are the bootstrap superuser's even when the role makes the type).
NOT_OURS = """
SELECT kind, name FROM (
  SELECT 'rel' kind, relname::text name, relowner owner, oid, 'pg_class'::regclass cat,
         relnamespace ns FROM pg_class WHERE relkind IN ('r', 'p', 'v', 'm', 'S', 'c')
  UNION ALL SELECT 'proc', proname, proowner, oid, 'pg_proc'::regclass, pronamespace FROM pg_proc
  UNION ALL SELECT 'type', typname, typowner, oid, 'pg_type'::regclass, typnamespace FROM pg_type
  UNION ALL SELECT 'schema', nspname, nspowner, oid, 'pg_namespace'::regclass, oid
    FROM pg_namespace WHERE nspowner <> 'pg_database_owner'::regrole
) o WHERE ns NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace,
                     'pg_toast'::regnamespace)
  AND owner <> current_user::regrole
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = o.cat AND d.objid = o.oid
                  AND (d.deptype = 'e' OR d.deptype = 'i' AND o.kind = 'proc'))
"""


def scratch_db(pg_url: str, statements: list[str]) -> str:
    """A new database on the server with `statements` run in it; returns its URL."""
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    query(pg_url, f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(pg_url, dbname=name)
    for statement in statements:
        query(url, statement)
    return url


def snapshot(url: str) -> list[tuple[object, ...]]:
    return query(url, "SELECT * FROM keep ORDER BY id") + query(url, "SELECT count(*) FROM big")


def test_template_clone_is_the_worktrees_and_restores_with_its_extension(
        pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    template = psycopg.conninfo.conninfo_to_dict(scratch_db(pg_url, TEMPLATE_SQL))["dbname"]
    with_postgres(repo, f'mode = "database"\ntemplate = "{template}"\n')
    tree = repo.worktree("shop-own", "feat/own")
    name = pgnames.identifier(naming.worktree_id(repo.main, tree))
    shown = pgdevd.run("provision", str(tree)).stderr
    assert f"objects over to role {name}" in shown and "handing " in shown
    assert "extension pgcrypto (owner postgres)" in shown
    url = env_of(pgdevd, tree)["DATABASE_URL"]
    assert query(url, NOT_OURS) == []
    for statement in MIGRATION:
        query(url, statement)
    assert query(url, "SELECT add1(1), length(gen_random_bytes(3))") == [(3, 3)]
    assert query(url, "SELECT lomowner::regrole::text FROM pg_largeobject_metadata") == [(name,)]
    # A crash after the clone, before the hand-over and the marker: the next provision
    # finishes it (the hand-over is one transaction, so there is no half-way state).
    admin = psycopg.conninfo.make_conninfo(pg_url, dbname=name)
    query(pg_url, f'COMMENT ON DATABASE "{name}" IS NULL')
    query(admin, "ALTER TYPE mood OWNER TO postgres; ALTER VIEW people_names OWNER TO postgres")
    assert {("type", "mood"), ("rel", "people_names")} <= set(query(url, NOT_OURS))
    assert "handing 2 objects over" in pgdevd.run("provision", str(tree)).stderr
    assert query(url, NOT_OURS) == []
    # Release (dump), provision a fresh clone, restore: the rows and the owners come back.
    released = pgdevd.json("release", str(tree), "--yes")
    assert Path(released["dumps"][0]).stat().st_size > 0
    pgdevd.run("provision", str(tree))
    url = env_of(pgdevd, tree)["DATABASE_URL"]  # a new role, with a new password
    assert query(url, "SELECT to_regclass('notes')") == [(None,)]
    restored = pgdevd.json("restore", str(tree))
    assert "before-restore" in restored["before"] and Path(restored["before"]).is_file()
    assert query(url, "SELECT body FROM notes") == [("from-the-worktree",)]
    assert query(url, "SELECT 'happy'::mood::text, add1(1)") == [("happy", 3)]
    assert query(url, NOT_OURS) == []
    # Again, over the restored data: the extension and its owner are no obstacle.
    pgdevd.run("restore", str(tree))
    assert query(url, "SELECT count(*) FROM notes") == [(1,)]
    # The "before" dump is not taken for the latest: restore still loads the released data.
    assert pgdevd.json("restore", str(tree))["restored"] == released["dumps"][0]


def test_a_failed_or_killed_restore_leaves_the_rows_exactly_as_before(
        pgdevd: Devd, repo: Repo, pg_url: str, tmp_path: Path) -> None:
    with_postgres(repo, 'mode = "database"\n')
    tree = repo.worktree("shop-kill", "feat/kill")
    pgdevd.run("provision", str(tree))
    url = env_of(pgdevd, tree)["DATABASE_URL"]
    good, before = two_states(url, tmp_path)
    # Messages say what is wrong with the file, and nothing changes.
    (tmp_path / "empty.dump").write_bytes(b"")
    (tmp_path / "junk.dump").write_bytes(b"not a dump\n")
    for file, said in (("missing.dump", "not found"), ("empty.dump", "is empty"),
                       ("junk.dump", "is unreadable")):
        failed = pgdevd.run("restore", str(tree), "--dump", str(tmp_path / file), check=False)
        assert failed.returncode == 1 and said in failed.stderr, failed.stderr
        assert "nothing was changed" in failed.stderr
    assert snapshot(url) == before
    # A dump that fails half-way (an extension the role may not create): rolled back.
    foreign = scratch_db(pg_url, ["CREATE EXTENSION dblink", "CREATE TABLE keep (id int)",
                                  "INSERT INTO keep VALUES (9)"])
    subprocess.run([PG_DUMP, "-Fc", "-f", str(tmp_path / "dblink.dump"), foreign], check=True)
    failed = pgdevd.run("restore", str(tree), "--dump", str(tmp_path / "dblink.dump"),
                        check=False)
    assert failed.returncode == 1 and "permission denied" in failed.stderr, failed.stderr
    assert "rolled back: the data is exactly as before" in failed.stderr
    assert snapshot(url) == before
    killed_mid_restore(pgdevd, tree, good, pg_url)
    assert snapshot(url) == before
    # And with nothing in the way, the same dump restores.
    pgdevd.run("restore", str(tree), "--dump", str(good))
    assert snapshot(url) == [(1, "old"), (BIG,)]


def test_container_restore_killed_mid_way_keeps_the_rows(devd: Devd, repo: Repo, dk: object,
                                                         tmp_path: Path) -> None:
    with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
    tree = repo.worktree("shop-ckill", "ckill")
    devd.run("provision", str(tree), timeout=180)
    url = env_of(devd, tree)["DATABASE_URL"]
    good, before = two_states(url, tmp_path)
    killed_mid_restore(devd, tree, good, url)
    assert snapshot(url) == before
    restored = devd.json("restore", str(tree), "--dump", str(good))
    assert snapshot(url) == [(1, "old"), (BIG,)]
    assert Path(restored["before"]).stat().st_size > 0


BIG = 500_000  # rows: loading them takes long enough to be caught inside COPY


def two_states(url: str, tmp_path: Path) -> tuple[Path, list[tuple[object, ...]]]:
    """A dump of one state of the worktree's data, and a snapshot of the current, other one."""
    query(url, "CREATE TABLE keep (id int PRIMARY KEY, v text)")
    query(url, "CREATE TABLE big (n int)")
    query(url, f"INSERT INTO big SELECT generate_series(1, {BIG})")
    query(url, "INSERT INTO keep VALUES (1, 'old')")
    good = tmp_path / "good.dump"
    subprocess.run([PG_DUMP, "-Fc", "-f", str(good), url], check=True)
    query(url, "TRUNCATE big")
    query(url, "INSERT INTO keep VALUES (2, 'current')")
    return good, snapshot(url)


def killed_mid_restore(devd: Devd, tree: Path, dump: Path, admin: str) -> None:
    """The server ends devd's restore backend once it is inside COPY (after the drops)."""
    restoring = subprocess.Popen(
        [sys.executable, "-m", "devd", "restore", str(tree), "--dump", str(dump)],
        env=devd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    while restoring.poll() is None and not killed:
        killed = bool(query(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'devd-restore' AND query LIKE 'COPY%'"))
        time.sleep(0.01)
    _, err = restoring.communicate(timeout=180)
    assert killed and restoring.returncode == 1 and "exactly as before" in err, err


APP_SQL = [
    "CREATE TABLE products (id int PRIMARY KEY, title text)",
    "INSERT INTO products VALUES (1, 'main-row')",
    "CREATE TABLE django_migrations (id serial, app text, name text)",
    "INSERT INTO django_migrations (app, name) VALUES ('shop', '0001_initial')",
    "CREATE SCHEMA extensions",
    "CREATE EXTENSION pgcrypto WITH SCHEMA extensions",
    "GRANT USAGE ON SCHEMA extensions TO PUBLIC",
    "CREATE SCHEMA closed_ext",
    "CREATE EXTENSION citext WITH SCHEMA closed_ext",
]


def test_schema_mode_sees_only_its_own_schema(devd_home: Devd, repo: Repo,
                                              pg_url: str) -> None:
    app = scratch_db(pg_url, APP_SQL)
    devd_home.env["DEVD_POSTGRES_URL"] = app
    devd_home.start()
    with_postgres(repo, 'mode = "schema"\n')
    tree = repo.worktree("shop-schema", "feat/schema")
    name = pgnames.identifier(naming.worktree_id(repo.main, tree))
    shown = devd_home.run("provision", str(tree)).stderr
    assert "GRANT USAGE ON SCHEMA closed_ext TO PUBLIC" in shown
    url = env_of(devd_home, tree)["DATABASE_URL"]
    assert query(url, "SHOW search_path") == [(f"{name}, extensions",)]
    # The app's tables in public: invisible unqualified, unreadable qualified.
    assert query(url, "SELECT to_regclass('django_migrations'), to_regclass('products')") \
        == [(None, None)]
    for statement in ("SELECT * FROM public.products", "INSERT INTO public.products VALUES (2)",
                      "CREATE TABLE public.sneaky (x int)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            query(url, statement)
    query(url, "CREATE TABLE products (id int, title text)")  # lands in its own schema
    query(url, "INSERT INTO products VALUES (7, 'worktree-row')")
    assert query(url, "SELECT relnamespace::regnamespace::text FROM pg_class "
                 "WHERE oid = 'products'::regclass") == [(name,)]
    assert query(url, "SELECT length(gen_random_bytes(2))") == [(2,)]  # extension still usable
    assert query(app, "SELECT * FROM public.products") == [(1, "main-row")]
    # Release, provision, restore: the worktree's rows come back into its schema only.
    devd_home.run("release", str(tree), "--yes")
    devd_home.run("provision", str(tree))
    url = env_of(devd_home, tree)["DATABASE_URL"]
    devd_home.run("restore", str(tree))
    assert query(url, "SELECT * FROM products") == [(7, "worktree-row")]
    assert query(app, "SELECT * FROM public.products") == [(1, "main-row")]
    # A server where anyone may create in public (the PG <= 14 default): refused, loudly.
    query(app, "GRANT CREATE ON SCHEMA public TO PUBLIC")
    other = repo.worktree("shop-open", "feat/open")
    failed = devd_home.run("provision", str(other), check=False)
    assert failed.returncode != 0 and "schema mode cannot isolate" in failed.stderr
    assert 'REVOKE CREATE ON SCHEMA "public" FROM PUBLIC' in failed.stderr
    other_name = pgnames.identifier(naming.worktree_id(repo.main, other))
    assert query(app, "SELECT count(*) FROM pg_roles WHERE rolname = %s", other_name) == [(0,)]
    assert devd_home.stop() == 0, devd_home.log()
