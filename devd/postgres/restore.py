"""Restore that never destroys before it can succeed.

The current data is dumped first (kept, noted "before-restore", never taken for `latest`).
Then one psql transaction clears what the worktree role owns and loads the dump as that
role, so it owns every object it loads; any error, a killed backend or a stopped server
rolls the whole transaction back and the data is exactly as before.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from psycopg import sql
from psycopg.conninfo import make_conninfo

from devd.postgres import dump, server
from devd.provisioners.base import Context

BEFORE = "before-restore"
LOCK_TIMEOUT = "SET lock_timeout = '10s';"  # an app mid-transaction: fail, do not hang


def restore_sql(ctx: Context, detail: dict[str, Any], source: Path) -> Path:
    """Schema or database mode; returns the dump of the data as it was before."""
    url, name, dbname = detail.get("admin_url", ""), detail["name"], detail["database"]
    schema = name if detail["mode"] == "schema" else None
    before = dump.dump_local(url, dbname, dump.new_dump_path(ctx.paths, ctx.worktree.id, BEFORE),
                             schema=schema, failure=dump.RESTORE_FAILURE)
    with tempfile.TemporaryDirectory(prefix="devd-restore-") as scratch:
        script = dump.restore_script(source, Path(scratch) / "restore.sql", skip_schema=schema)
        prologue = Path(scratch) / "prologue.sql"
        prologue.write_text(_prologue(name, ctx.worktree.id, schema))
        # Database mode loads over the role's own login: a dump is SQL, and a RESET ROLE in
        # it would otherwise run the rest as the admin. Schema mode must recreate its schema
        # in a database the role may not create in, so it still loads via SET ROLE.
        dump.run_psql(url if schema else _as_role(url, detail), dbname, [prologue, script])
    return before


def _as_role(url: str, detail: dict[str, Any]) -> str:
    """The admin URL with the worktree role's credentials (same host, port, TLS options)."""
    return make_conninfo(url, user=detail["name"], password=detail["password"])


def _prologue(role: str, wt_id: str, schema: str | None) -> str:
    """Clear the worktree's objects, then become its role (the loaded objects are its own)."""
    ident = sql.Identifier(role).as_string(None)
    if schema:
        clear = (f"DROP SCHEMA {ident} CASCADE; CREATE SCHEMA {ident} AUTHORIZATION {ident}; "
                 + server.mark("schema", schema, wt_id).as_string(None) + ";")
    else:
        # Everything the role owns in its database (not the database itself); extensions
        # it does not own stay, and the dump's CREATE EXTENSION IF NOT EXISTS keeps them.
        # PG <= 14: a handed-over public went too, and dumps assume it exists.
        clear = f"DROP OWNED BY {ident} CASCADE; CREATE SCHEMA IF NOT EXISTS public " \
                f"AUTHORIZATION {ident};"
    return f"{LOCK_TIMEOUT}\n{clear}\nSET ROLE {ident};\n"


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
