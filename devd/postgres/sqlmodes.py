"""Schema and database modes: a per-worktree login role owning a schema or a database.

schema:   a login role and a schema of the same name, owned by it.
database: a database owned by a per-worktree login role; optionally cloned from a template.
Teardown always dumps (pg_dump -Fc) before it drops, unless the caller opts out.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg import sql

from devd import processes
from devd.errors import DevdError
from devd.postgres import dependents, dump, names, records, server
from devd.postgres.records import admin_url, record_intent
from devd.provisioners.base import Context, Health, Progress

# Relations a template clone brings along, and the ALTER that hands each to the worktree role.
_ALTER = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW",
          "f": "FOREIGN TABLE", "S": "SEQUENCE"}
_NOT_SYSTEM = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
               "AND n.nspname NOT LIKE 'pg\\_%%'")
_FOREIGN_RELATIONS = f"""
SELECT c.relkind, n.nspname, c.relname FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND {_NOT_SYSTEM}
  AND pg_get_userbyid(c.relowner) <> %s
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype IN ('a', 'i', 'e'))
"""
_FOREIGN_SCHEMAS = f"""
SELECT n.nspname FROM pg_namespace n WHERE {_NOT_SYSTEM}
  AND pg_get_userbyid(n.nspowner) NOT IN (%s, 'pg_database_owner')
"""


def ensure_sql(ctx: Context, progress: Progress, mode: str) -> dict[str, Any]:
    url, wt_id = admin_url(ctx), ctx.worktree.id
    # A recorded name wins: names made before they left room for `test_` stay as they are.
    name = ctx.recorded("postgres").get("name") or names.identifier(wt_id)
    password = ctx.recorded("postgres").get("password") or names.new_password()
    createdb = ctx.config.postgres.createdb
    with server.connect(url) as conn:
        needs: tuple[str, ...] = ("CREATEROLE", "CREATE") if mode == "schema" \
            else ("CREATEROLE", "CREATEDB")
        needs += ("CREATEDB",) if createdb and mode == "schema" else ()
        superuser = server.require(conn, *needs)
        dbname = conn.info.dbname if mode == "schema" else name
        record_intent(ctx, mode=mode, name=name, admin_url=url, database=dbname,
                      password=password)
        try:
            # Every name first: a conflict anywhere means nothing at all is created.
            ours = server.claim_all(conn, name, wt_id, ("role", mode))
            role = server.role_statements(name, wt_id, password, "role" in ours, superuser,
                                          createdb)
            if mode == "schema":
                server.batch(conn, role + _schema_statements(name, wt_id, "schema" in ours))
            else:
                server.batch(conn, role)
                _ensure_database(ctx, conn, name, ours.get("database"), progress)
        except psycopg.Error as exc:
            raise server.translate(exc, f"provisioning Postgres {mode} {name}") from exc
        server.remember(ctx.paths, url)
        return {"mode": mode, "name": name, "host": conn.info.host, "port": conn.info.port,
                "user": name, "database": dbname, "password": password, "admin_url": url,
                "complete": True}


def _schema_statements(name: str, wt_id: str, exists: bool) -> list[sql.Composable]:
    create = [] if exists else [sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
        sql.Identifier(name), sql.Identifier(name))]
    return [*create, server.mark("schema", name, wt_id)]


def _ensure_database(ctx: Context, conn: psycopg.Connection[Any], name: str,
                     marked: bool | None, progress: Progress) -> None:
    """`marked`: None if absent, False if ours but unmarked (a crash after the clone)."""
    wt_id, template = ctx.worktree.id, ctx.config.postgres.template
    if marked is None:
        progress("postgres", f"creating database {name}"
                 + (f" from template {template}" if template else ""))
        _create_database(ctx, conn, name)  # cannot share a transaction with anything
    if template and not marked:
        # Before the marker: a crash in between is seen (unmarked) and finished next time.
        _hand_over(ctx, name)
    ident = sql.Identifier(name)
    # Other worktrees' roles may not even connect: isolation by privilege, not by convention.
    server.batch(conn, [
        server.mark("database", name, wt_id),
        sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(ident),
        sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(ident, ident)])


def _create_database(ctx: Context, conn: psycopg.Connection[Any], name: str) -> None:
    cfg = ctx.config.postgres
    stmt = sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                         sql.Identifier(name))
    if cfg.template:
        _clear_template(ctx, conn, cfg.template)
        stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(cfg.template))
        if conn.info.server_version >= 150000:
            stmt += sql.SQL(" STRATEGY FILE_COPY")  # far less WAL than WAL_LOG
    try:
        conn.execute(stmt)
    except psycopg.errors.ObjectInUse as exc:
        # Someone connected to the template between our check and the clone.
        raise _template_busy(ctx, cfg.template, server.sessions_on(conn, cfg.template)) from exc


def _clear_template(ctx: Context, conn: psycopg.Connection[Any], template: str) -> None:
    blockers = server.sessions_on(conn, template)
    if not blockers:
        return
    if not ctx.config.postgres.template_terminate:
        raise _template_busy(ctx, template, blockers)
    server.terminate(conn, blockers)


def _template_busy(ctx: Context, template: str, blockers: list[server.Session]) -> DevdError:
    return DevdError(
        f"template database {template!r} has open connections, so it cannot be cloned: "
        + "; ".join(describe_sessions(ctx, blockers)),
        "close those sessions, or set template_terminate = true in [postgres] to let devd end "
        "them", code="postgres_in_use")


def describe_sessions(ctx: Context, sessions: list[server.Session]) -> list[str]:
    """Each session, with the local worktree behind it when devd can tell."""
    worktrees = ctx.registry.worktrees()
    texts = []
    for session in sessions:
        owner = None
        if session.local_pid:
            holder = processes.describe(session.local_pid)
            found = processes.owner_of(holder, worktrees, ctx.registry)
            owner = str(found.path) if found else None
        texts.append(session.describe(owner))
    return texts


def _hand_over(ctx: Context, name: str) -> None:
    """Give the clone's schemas and relations to the worktree role (the template's owner
    may be a superuser, whose objects REASSIGN OWNED cannot move)."""
    with server.connect(admin_url(ctx), dbname=name) as conn:
        for (schema,) in conn.execute(_FOREIGN_SCHEMAS, (name,)).fetchall():
            conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(
                sql.Identifier(schema), sql.Identifier(name)))
        for relkind, schema, rel in conn.execute(_FOREIGN_RELATIONS, (name,)).fetchall():
            conn.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(
                sql.SQL(_ALTER[relkind]), sql.Identifier(schema, rel), sql.Identifier(name)))


# A server that did not answer is not asked again for a while: `devd status` checks every
# worktree, and each would otherwise wait out the connect timeout on its own.
_UNREACHABLE_FOR = 15.0
_unreachable: dict[str, tuple[float, str]] = {}


def check_sql(detail: dict[str, Any]) -> Health:
    """Read-only: does the schema or database still exist on its server?"""
    kind, name, url = detail["mode"], detail["name"], detail.get("admin_url", "")
    down = _unreachable.get(url)
    if down and time.monotonic() < down[0]:
        return Health(False, down[1], {"state": "unreachable"})
    try:
        with server.connect(url, timeout=3,
                              dbname=detail["database"] if kind == "schema" else None) as conn:
            found = server.lookup(conn, kind, name)
    except DevdError as exc:
        _unreachable[url] = (time.monotonic() + _UNREACHABLE_FOR, exc.message)
        return Health(False, exc.message, {"state": "unreachable"})
    _unreachable.pop(url, None)
    if found is None:
        return Health(False, f"{kind} {name} is missing (run `devd provision`)",
                      {"state": "missing"})
    return Health(True, "", {"state": "ready"})


def check_teardown(ctx: Context, detail: dict[str, Any]) -> None:
    """Read-only: raise what teardown_sql would fail on (server down, a name taken over,
    sessions without --force, no pg_dump, objects that keep the role from being dropped)."""
    with _admin(detail) as conn:
        try:
            present, role, tests = _claims(ctx, conn, detail)
            sessions = _sessions(conn, detail, tests)
            if sessions and not ctx.force:
                raise _in_use(ctx, detail, sessions)
            if present and ctx.backup:
                dump.binary("pg_dump")
                dump.dumps_dir(ctx.paths)  # a private dir to write it to
            blockers = dependents.blockers(conn, detail, tests) if role else []
        except psycopg.Error as exc:
            raise server.translate(exc, f"checking Postgres {detail['mode']} "
                                        f"{detail['name']}") from exc
    if blockers:
        raise dependents.error(detail, blockers)


def teardown_sql(ctx: Context, detail: dict[str, Any]) -> None:
    """Dump, then drop: the worktree's test databases, its schema or database, its role.
    The fallible steps (sessions, the dump) come before the first drop."""
    name, mode = detail["name"], detail["mode"]
    with _admin(detail) as conn:
        try:
            conn.execute("SET lock_timeout = '10s'")
            present, role, tests = _claims(ctx, conn, detail)
            _release_sessions(ctx, conn, detail, tests)
            if present and ctx.backup:
                _dump(ctx, detail)
            records.mark_dropping(ctx)
            for test in tests:
                conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(test)))
                ctx.outputs.setdefault("test_databases_dropped", []).append(test)
            _drop(conn, mode, name, present, role)
        except psycopg.Error as exc:
            raise server.translate(exc, f"dropping Postgres {mode} {name}") from exc
    dump.prune(ctx.paths)


def _admin(detail: dict[str, Any]) -> psycopg.Connection[Any]:
    """The admin connection; in schema mode to the schema's database."""
    dbname = detail["database"] if detail["mode"] == "schema" else None
    return server.connect(detail.get("admin_url", ""), dbname=dbname)


def _claims(ctx: Context, conn: psycopg.Connection[Any], detail: dict[str, Any]
            ) -> tuple[bool, bool, list[str]]:
    """Whether the schema/database and the role exist (ours, else OwnershipConflict), and
    the role's test databases."""
    name, wt_id = detail["name"], ctx.worktree.id
    present = server.claim(conn, detail["mode"], name, wt_id, owner_role=name)
    role = server.claim(conn, "role", name, wt_id)
    return present, role, dependents.test_databases(conn, name) if role else []


def _dump(ctx: Context, detail: dict[str, Any]) -> None:
    target = dump.new_dump_path(ctx.paths, ctx.worktree.id)
    dump.dump_local(detail.get("admin_url", ""), detail["database"], target,
                    schema=detail["name"] if detail["mode"] == "schema" else None)
    ctx.outputs.setdefault("dumps", []).append(str(target))


def _drop(conn: psycopg.Connection[Any], mode: str, name: str, present: bool,
          role: bool) -> None:
    """The schema (with its role, in one transaction) or the database, then its role.
    DROP OWNED only revokes privileges here: check_teardown saw that the role owns
    nothing else in this database."""
    ident = sql.Identifier(name)
    drops: list[sql.Composable] = []
    if present and mode == "schema":
        drops.append(sql.SQL("DROP SCHEMA {} CASCADE").format(ident))
    elif present:
        conn.execute(sql.SQL("DROP DATABASE {}").format(ident))  # never in a transaction
    if role:
        drops += [sql.SQL("DROP OWNED BY {}").format(ident),
                  sql.SQL("DROP ROLE {}").format(ident)]
    if drops:
        server.batch(conn, drops)


def _sessions(conn: psycopg.Connection[Any], detail: dict[str, Any],
              tests: list[str]) -> list[server.Session]:
    """Sessions that would block the drops: the role's (schema mode) or anyone's on the
    database, and anyone's on a test database."""
    found = server.sessions_on(conn, detail["database"],
                               user=detail["name"] if detail["mode"] == "schema" else None)
    return found + [s for test in tests for s in server.sessions_on(conn, test)]


def _release_sessions(ctx: Context, conn: psycopg.Connection[Any], detail: dict[str, Any],
                      tests: list[str]) -> None:
    """Name the holders of blocking sessions; end them only with --force."""
    sessions = _sessions(conn, detail, tests)
    if sessions and not ctx.force:
        raise _in_use(ctx, detail, sessions)
    server.terminate(conn, sessions)


def _in_use(ctx: Context, detail: dict[str, Any], sessions: list[server.Session]
            ) -> DevdError:
    return DevdError(
        f"Postgres {detail['mode']} {detail['name']} is in use: "
        + "; ".join(describe_sessions(ctx, sessions)),
        "stop those processes, or pass --force to end their sessions",
        code="postgres_in_use")
