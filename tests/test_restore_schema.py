"""Schema-mode restore loads as the worktree's own role: crafted dumps fail loudly and change
nothing (neither this worktree's schema nor another's), a dump of another schema is refused
before anything changes, and a dump with every kind of object restores, twice, into the
schema devd keeps made and marked. Real daemon, pg_dump/pg_restore/psql and Postgres."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import test_postgres
from conftest import Devd, Repo
from pgsupport import env_of, query, with_postgres
from test_pgownership import PG_DUMP, scratch_db

from devd import naming
from devd.postgres import names as pgnames

pytestmark = pytest.mark.postgres
pgdevd = test_postgres.pgdevd
COMMENT = "X" * 160  # the one entry a crafted dump edits, in place (same length)


def base_dump(pg_url: str, path: Path, schema: str, extra: list[str]) -> Path:
    """A real -Fc archive of `schema` (one table, one row, a comment to edit) plus `extra`."""
    ident = f'"{schema}"'
    source = scratch_db(pg_url, [f"CREATE SCHEMA {ident}", f"CREATE TABLE {ident}.keep (v text)",
                                 f"INSERT INTO {ident}.keep VALUES ('dump')",
                                 f"COMMENT ON TABLE {ident}.keep IS '{COMMENT}'", *extra])
    subprocess.run([PG_DUMP, "-Fc", "-f", str(path), source], check=True)
    return path


def crafted(base: Path, path: Path, injected: str) -> Path:
    """`base` with its table comment edited in place to end its statement and run
    `injected`: a dump from a stranger (the archive stays valid: same length)."""
    old, new = f"'{COMMENT}';".encode(), f"'x';{injected}\n--".encode()
    assert len(new) <= len(old), injected
    data = base.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new.ljust(len(old))))
    return path


def schema_state(url: str, schema: str) -> list[tuple[object, ...]]:
    """The schema's relations, its owner and its comment (devd's marker)."""
    return query(url, "SELECT c.relname, pg_get_userbyid(n.nspowner), "
                 "obj_description(n.oid, 'pg_namespace') FROM pg_namespace n LEFT JOIN "
                 "pg_class c ON c.relnamespace = n.oid WHERE n.nspname = %s ORDER BY 1", schema)


EVERY_KIND = [  # what a worktree's app may make in its schema, as its role
    "CREATE TABLE t (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, s serial, v text)",
    "CREATE INDEX ON t (v)", "CREATE TABLE child (id int REFERENCES t)",
    "CREATE TABLE parted (k int) PARTITION BY RANGE (k)",
    "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10)",
    "CREATE VIEW vw AS SELECT * FROM t", "CREATE MATERIALIZED VIEW mv AS SELECT * FROM t",
    "CREATE SEQUENCE sq", "CREATE TYPE en AS ENUM ('a', 'b')", "CREATE TYPE comp AS (a int)",
    "CREATE TYPE rng AS RANGE (subtype = float8)", "CREATE DOMAIN dom AS int CHECK (VALUE > 0)",
    "CREATE FUNCTION f(en) RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE PROCEDURE p() LANGUAGE sql AS 'SELECT 1'",
    "CREATE AGGREGATE ag(int) (sfunc = int4pl, stype = int)",
    "CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'",
    "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION trg()",
    "CREATE OPERATOR === (leftarg = int, rightarg = int, function = int4pl)",
    "CREATE COLLATION coll (locale = 'C')", "CREATE STATISTICS st ON id, v FROM t",
    "CREATE TEXT SEARCH CONFIGURATION tsc (COPY = pg_catalog.english)",
    "CREATE POLICY pol ON t USING (true)", "INSERT INTO t (v) VALUES ('restored')",
]


def test_crafted_dumps_in_schema_mode_fail_loudly_and_touch_nothing(
        pgdevd: Devd, repo: Repo, pg_url: str, tmp_path: Path) -> None:
    with_postgres(repo, 'mode = "schema"\n')
    mine, other = repo.worktree("shop-mine", "feat/mine"), repo.worktree("shop-other", "other")
    for tree in (mine, other):
        pgdevd.run("provision", str(tree))
    url, other_url = env_of(pgdevd, mine)["DATABASE_URL"], env_of(pgdevd, other)["DATABASE_URL"]
    name, other_name = env_of(pgdevd, mine)["PGUSER"], env_of(pgdevd, other)["PGUSER"]
    query(url, "CREATE TABLE keep (v text)")
    query(url, "INSERT INTO keep VALUES ('current')")
    query(other_url, "CREATE TABLE theirs (v text)")
    before, theirs = schema_state(pg_url, name), schema_state(pg_url, other_name)
    marker = pgnames.parse_marker(before[0][2])
    assert before[0][1] == name and marker and marker[1] == naming.worktree_id(repo.main, mine)
    pwned = tmp_path / "pwned"
    hostile = {  # injected SQL → what the failure says
        # A search path naming a schema the role may not use is skipped.
        f'SET search_path = "{other_name}"; CREATE TABLE planted (x int);':
            "no schema has been selected to create in",
        f'CREATE TABLE "{other_name}".planted (x int);':
            f"permission denied for schema {other_name}",
        "SET SESSION AUTHORIZATION postgres;": "permission denied to set session authorization",
        # psql meta-commands: pg_restore's \restrict fences them.
        f"\n\\connect postgres postgres\n\\! touch {pwned}": "backslash commands are restricted",
    }
    base = base_dump(pg_url, tmp_path / "base.dump", name, [])
    dumps = [(crafted(base, tmp_path / f"h{i}.dump", sql), said)
             for i, (sql, said) in enumerate(hostile.items())]
    # What only a superuser may create: pg_restore's own entries, refused for the role.
    fn = f'CREATE FUNCTION "{name}".et() RETURNS event_trigger LANGUAGE plpgsql AS \'BEGIN END\''
    dumps += [(base_dump(pg_url, tmp_path / "ext.dump", name, [
        f'CREATE EXTENSION dblink SCHEMA "{name}"']), "permission denied to create extension"),
        (base_dump(pg_url, tmp_path / "et.dump", name, [
            fn, f'CREATE EVENT TRIGGER et ON ddl_command_start EXECUTE FUNCTION "{name}".et()']),
         'permission denied to create event trigger "et"')]
    for path, said in dumps:
        failed = pgdevd.run("restore", str(mine), "--dump", str(path), check=False)
        assert failed.returncode == 1 and said in failed.stderr, failed.stderr
        assert "rolled back: the data is exactly as before" in failed.stderr
        assert schema_state(pg_url, name) == before and query(url, "SELECT * FROM keep") \
            == [("current",)]
    assert schema_state(pg_url, other_name) == theirs and not pwned.exists()
    assert pgdevd.worktree(mine)["postgres"]["state"] == "ready"
    # A dump of the other worktree's schema: refused before even the "before" dump.
    of_other = tmp_path / "other.dump"
    subprocess.run([PG_DUMP, "-Fc", "-n", other_name, "-f", str(of_other), pg_url], check=True)
    kept = sorted(pgdevd.paths.state_dir.glob("dumps/*"))
    refused = pgdevd.run("restore", str(mine), "--dump", str(of_other), check=False)
    assert refused.returncode == 1 and f"holds schema {other_name}, not this worktree's " \
        f"{name}; nothing was changed" in refused.stderr, refused.stderr
    assert sorted(pgdevd.paths.state_dir.glob("dumps/*")) == kept
    # A dump relabelling its own schema loads, and devd's marker is put back.
    relabel = crafted(base, tmp_path / "relabel.dump",
                      f"COMMENT ON SCHEMA \"{name}\" IS 'mine now';")
    pgdevd.run("restore", str(mine), "--dump", str(relabel))
    assert query(url, "SELECT * FROM keep") == [("dump",)]
    assert schema_state(pg_url, name)[0][1:] == before[0][1:]
    # Every kind of object the role can make restores, twice (over itself).
    for statement in ["DROP TABLE keep", *EVERY_KIND]:
        query(url, statement)
    good = tmp_path / "good.dump"
    subprocess.run([PG_DUMP, "-Fc", "-n", name, "-f", str(good), pg_url], check=True)
    made = schema_state(pg_url, name)
    query(url, "CREATE TABLE stray (x int)")
    for _ in range(2):
        pgdevd.run("restore", str(mine), "--dump", str(good))
        assert schema_state(pg_url, name) == made
    assert query(url, "SELECT v FROM vw") == [("restored",)]
    assert query(url, "SELECT 'a'::en, 2 === 3, ag(x) FROM (VALUES (1), (2)) v(x)") \
        == [("a", 5, 3)]
    # A schema handed to another owner behind devd's back: refused, nothing changed.
    query(pg_url, f'ALTER SCHEMA "{name}" OWNER TO postgres')
    refused = pgdevd.run("restore", str(mine), "--dump", str(good), check=False)
    assert refused.returncode == 1 and f"schema {name} is owned by postgres, not by the " \
        "worktree's role" in refused.stderr, refused.stderr
    query(pg_url, f'ALTER SCHEMA "{name}" OWNER TO "{name}"')
    assert schema_state(pg_url, name) == made
