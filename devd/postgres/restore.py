"""Restore that never destroys before it can succeed.

The current data is dumped first (kept, noted "before-restore", never taken for `latest`).
Then one psql transaction, over the worktree role's own login in every SQL mode, clears
what that role owns and loads the dump, so it owns every object it loads and nothing in
the dump can act as anyone else. Any error, a killed backend or a stopped server rolls the
whole transaction back and the data is exactly as before.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from devd.errors import DevdError
from devd.postgres import dump, server
from devd.provisioners.base import Context

BEFORE = "before-restore"
LOCK_TIMEOUT = "SET lock_timeout = '10s';"  # an app mid-transaction: fail, do not hang

# Schema mode: the role may not create schemas, so its schema stays (devd's, marked) and
# what is in it goes: each object that DROP SCHEMA ... CASCADE would take, dropped by the
# schema's owner (extension members and internal parts, such as an identity column's
# sequence, go with what they belong to). One DROP per kind where DROP takes a list, tables
# first: most of the rest goes with them. The role and its schema share a name, so nothing
# is spliced into the SQL.
CLEAR_SCHEMA = """SET client_min_messages = warning;
DO $devd$
DECLARE
  own oid := (SELECT oid FROM pg_namespace WHERE nspname = current_user);
  obj record;
  kept text;
BEGIN
  FOR obj IN
    SELECT kind, string_agg(identity, ', ') AS names FROM (
      SELECT CASE o.type WHEN 'statistics object' THEN 'STATISTICS' ELSE upper(o.type) END
             AS kind, o.identity
      FROM pg_depend d, pg_identify_object(d.classid, d.objid, 0) o
      WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = own AND d.deptype = 'n'
        AND NOT EXISTS (SELECT FROM pg_depend p WHERE p.classid = d.classid
                        AND p.objid = d.objid AND p.deptype IN ('e', 'i')
                        AND (p.refclassid, p.refobjid) <> (d.classid, d.objid))) objects
    GROUP BY kind, CASE WHEN kind IN ('TABLE', 'VIEW', 'MATERIALIZED VIEW', 'SEQUENCE',
      'FOREIGN TABLE', 'TYPE', 'FUNCTION', 'PROCEDURE', 'AGGREGATE', 'OPERATOR',
      'STATISTICS') THEN '' ELSE identity END
    ORDER BY kind <> 'TABLE'
  LOOP
    EXECUTE format('DROP %s IF EXISTS %s CASCADE', obj.kind, obj.names);
  END LOOP;
  SELECT string_agg(pg_describe_object(classid, objid, 0), ', ') INTO kept FROM pg_depend
  WHERE refclassid = 'pg_namespace'::regclass AND refobjid = own AND deptype = 'n';
  IF kept IS NOT NULL THEN
    RAISE EXCEPTION 'schema % still holds %, which its role cannot drop', current_user, kept;
  END IF;
END
$devd$;
"""


def restore_sql(ctx: Context, detail: dict[str, Any], source: Path) -> Path:
    """Schema or database mode; returns the dump of the data as it was before."""
    url, name, dbname = detail.get("admin_url", ""), detail["name"], detail["database"]
    schema = name if detail["mode"] == "schema" else None
    if schema:
        dump.refuse_other_schemas(source, schema)
        _prepare_schema(ctx, detail)
    before = dump.dump_local(url, dbname, dump.new_dump_path(ctx.paths, ctx.worktree.id, BEFORE),
                             schema=schema, failure=dump.RESTORE_FAILURE)
    with tempfile.TemporaryDirectory(prefix="devd-restore-") as scratch:
        script = dump.restore_script(source, Path(scratch) / "restore.sql", skip_schema=schema)
        prologue = Path(scratch) / "prologue.sql"
        prologue.write_text(_prologue(name, schema))
        # Over the role's login, never the admin's with SET ROLE: a dump is SQL, and its
        # RESET ROLE (or SET SESSION AUTHORIZATION) would run the rest as the admin.
        dump.run_psql(_as_role(url, detail), dbname, [prologue, script])
    if schema:
        _remark_schema(ctx, detail)
    return before


def _as_role(url: str, detail: dict[str, Any]) -> str:
    """The admin URL with the worktree role's credentials (same host, port, TLS options)."""
    return make_conninfo(url, user=detail["name"], password=detail["password"])


def _prologue(role: str, schema: str | None) -> str:
    """As the role: clear its objects (the loaded ones are then its own)."""
    if schema:
        return f"{LOCK_TIMEOUT}\n{CLEAR_SCHEMA}"
    ident = sql.Identifier(role).as_string(None)
    # Everything the role owns in its database (not the database itself); extensions it
    # does not own stay, and the dump's CREATE EXTENSION IF NOT EXISTS keeps them.
    # PG <= 14: a handed-over public went too, and dumps assume it exists.
    return (f"{LOCK_TIMEOUT}\nDROP OWNED BY {ident} CASCADE;\n"
            f"CREATE SCHEMA IF NOT EXISTS public AUTHORIZATION {ident};\n")


def _prepare_schema(ctx: Context, detail: dict[str, Any]) -> None:
    """Before the load, as the admin and as provisioning does (the role may not create
    schemas): the role's schema exists, is the role's, and carries devd's marker."""
    name = detail["name"]
    with _admin(detail, f"preparing schema {name} for the restore") as conn:
        ours = server.claim_all(conn, name, ctx.worktree.id, ("schema", "role"))
        owner = _owner(conn, name)
        if "role" not in ours or owner not in (None, name):
            raise DevdError(f"role {name} is missing; nothing was changed" if "role" not in ours
                            else f"schema {name} is owned by {owner}, not by the worktree's "
                            "role, which could not load into it; nothing was changed",
                            "run `devd provision`, then `devd restore` again",
                            code="restore_failed")
        _mark(conn, name, ctx.worktree.id)


def _remark_schema(ctx: Context, detail: dict[str, Any]) -> None:
    """After the load: the dump ran as the schema's owner, who may drop it or change its
    comment (devd's marker). The comment is put back; a dropped schema is said so."""
    name = detail["name"]
    with _admin(detail, f"checking schema {name} after the restore") as conn:
        if _owner(conn, name) is None:
            raise DevdError(f"the dump dropped schema {name} itself (it ran as the schema's "
                            "owner, and committed): the worktree has no schema now",
                            "run `devd provision` for an empty one, then `devd restore "
                            "--dump` a dump you trust", code="restore_failed")
        _mark(conn, name, ctx.worktree.id)


@contextmanager
def _admin(detail: dict[str, Any], doing: str) -> Iterator[psycopg.Connection[Any]]:
    with server.connect(detail.get("admin_url", ""), dbname=detail["database"]) as conn:
        try:
            yield conn
        except psycopg.Error as exc:
            raise server.translate(exc, doing) from exc


def _owner(conn: psycopg.Connection[Any], schema: str) -> str | None:
    row = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace "
                       "WHERE nspname = %s", (schema,)).fetchone()
    return str(row[0]) if row else None


def _mark(conn: psycopg.Connection[Any], name: str, wt_id: str) -> None:
    ident = sql.Identifier(name)
    server.batch(conn, [sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
        ident, ident), server.mark("schema", name, wt_id)])


# Container mode: the database is the container's own, owned by its superuser; every
# user schema goes, and public comes back as PostgreSQL 15 makes it.
CONTAINER_PROLOGUE = LOCK_TIMEOUT + """
DO $$DECLARE s text; BEGIN
  FOR s IN SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('pg_catalog',
      'information_schema') AND nspname NOT LIKE 'pg\\_%' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s);
  END LOOP;
  PERFORM lo_unlink(oid) FROM pg_largeobject_metadata;
END$$;
CREATE SCHEMA public AUTHORIZATION pg_database_owner;
GRANT USAGE ON SCHEMA public TO PUBLIC;
COMMENT ON SCHEMA public IS 'standard public schema';
"""
