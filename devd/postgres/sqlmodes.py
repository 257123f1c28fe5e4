"""Schema and database modes: a per-worktree login role owning a schema or a database.

schema:   a login role and a schema of the same name, owned by it.
database: a database owned by a per-worktree login role; optionally cloned from a template.
Teardown always dumps (pg_dump -Fc) before it drops, unless the caller opts out.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg
from psycopg import sql

from devd import processes
from devd.errors import DevdError
from devd.postgres import dependents, dump, handover, names, records, server
from devd.postgres.records import admin_url, record_intent
from devd.provisioners.base import Context, Health, Progress

# Schemas whose every relation and routine belongs to an extension: a schema-mode role may
# see them (the app needs its extensions), as they hold none of the app's data.
_EXTENSION_SCHEMAS = """
SELECT n.nspname, has_schema_privilege('public', n.oid, 'USAGE') FROM pg_namespace n
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> %(own)s
  AND EXISTS (SELECT FROM pg_extension e WHERE e.extnamespace = n.oid)
  AND NOT EXISTS (SELECT FROM pg_class c WHERE c.relnamespace = n.oid
                  AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND NOT EXISTS (
                  SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e'))
  AND NOT EXISTS (SELECT FROM pg_proc p WHERE p.pronamespace = n.oid AND NOT EXISTS (
                  SELECT FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e'))
ORDER BY 1
"""
# Schemas anyone may create in (PUBLIC CREATE: the PG <= 14 default on public).
_OPEN_SCHEMAS = """
SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('pg_catalog', 'information_schema')
  AND nspname NOT LIKE 'pg\\_%%' AND nspname <> %s
  AND has_schema_privilege('public', oid, 'CREATE') ORDER BY 1
"""

# Relations outside extensions that every role may read or write (a GRANT ... TO PUBLIC),
# and SECURITY DEFINER routines it may run: reachable qualified (public.orders) from a
# schema-mode worktree, whatever its search path.
_SHARED_WITH_PUBLIC = """
SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
  AND n.nspname <> %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
  AND has_schema_privilege('public', n.oid, 'USAGE')
  AND (has_table_privilege('public', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')
       OR c.relkind <> 'S' AND has_any_column_privilege('public', c.oid, 'SELECT, INSERT, UPDATE'))
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
UNION ALL  -- a SECURITY DEFINER routine anyone may run acts as its owner: as main's app
SELECT format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname <> %s AND has_schema_privilege('public', n.oid, 'USAGE')
  AND has_function_privilege('public', p.oid, 'EXECUTE')
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
ORDER BY 1
"""


def ensure_sql(ctx: Context, progress: Progress, mode: str) -> dict[str, Any]:
    url, wt_id, recorded = admin_url(ctx), ctx.worktree.id, ctx.recorded("postgres")
    # A recorded name wins: names made before they left room for `test_` stay as they are.
    name = recorded.get("name") or names.identifier(wt_id)
    password = recorded.get("password") or names.new_password()
    createdb = ctx.config.postgres.createdb
    with server.connect(url) as conn:
        needs: tuple[str, ...] = ("CREATEROLE", "CREATE") if mode == "schema" \
            else ("CREATEROLE", "CREATEDB")
        needs += ("CREATEDB",) if createdb and mode == "schema" else ()
        superuser = server.require(conn, *needs)
        if mode == "schema":
            _refuse_open_schemas(conn, name)
            _refuse_shared_with_public(conn, name)
        dbname = recorded.get("database") or (conn.info.dbname if mode == "schema" else name)
        record_intent(ctx, mode=mode, name=name, admin_url=url, database=dbname,
                      password=password)
        kept: list[str] = recorded.get("kept_owners", [])
        try:
            # Every name first: a conflict anywhere means nothing at all is created.
            ours = server.claim_all(conn, name, wt_id, ("role", mode))
            role = server.role_statements(name, wt_id, password, "role" in ours, superuser,
                                          createdb)
            if mode == "schema":
                visible = _extension_schemas(conn, name, progress)
                server.batch(conn, role + _schema_statements(
                    name, wt_id, "schema" in ours, dbname, visible))
            else:
                server.batch(conn, role)
                handed = _ensure_database(ctx, conn, name, ours.get("database"), progress)
                kept = kept if handed is None else handed
        except psycopg.Error as exc:
            raise server.translate(exc, f"provisioning Postgres {mode} {name}") from exc
        server.remember(ctx.paths, url)
        strategy = copy_strategy(conn) if mode == "database" and ctx.config.postgres.template \
            else {}
        detail = {"mode": mode, "name": name, "host": conn.info.host, "port": conn.info.port,
                  "user": name, "database": dbname, "password": password, "admin_url": url,
                  "kept_owners": kept, "complete": True} | strategy
    _check_login(detail)
    return detail


def _check_login(detail: dict[str, Any]) -> None:
    """The worktree's own login, as its app will make it: a server whose pg_hba.conf
    refuses it a password login there (Debian's `local all all peer` on the socket) would
    otherwise leave a `ready` worktree whose every connection fails."""
    env = names.env_for(detail)
    try:
        psycopg.connect(env["DATABASE_URL"], connect_timeout=server.CONNECT_TIMEOUT).close()
    except psycopg.OperationalError as exc:
        where = f"{detail['host']}:{detail['port']}"
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise DevdError(
            f"the worktree's role {detail['user']} cannot log in with its password on "
            f"{where}: {text}",
            "the server's pg_hba.conf refuses password logins there: use an admin URL over "
            "TCP (e.g. postgresql://127.0.0.1:5432/postgres, which Debian's PostgreSQL "
            "allows with a password), or allow scram-sha-256 for these roles; then "
            "`devd release --yes PATH` and provision again", code="postgres_login") from exc


def copy_strategy(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """How the server copies a template, as container clones report theirs: "reflink" when
    PostgreSQL 18's file_copy_method = clone shares the blocks (FILE_COPY on a CoW
    filesystem), else "copy" (every byte, so the time grows with the template's size)."""
    if conn.info.server_version >= 180000:
        method = conn.execute("SELECT current_setting('file_copy_method', true)").fetchone()
        if method and method[0] == "clone":
            return {"strategy": "reflink"}
    return {"strategy": "copy"}


def _extension_schemas(conn: psycopg.Connection[Any], name: str, progress: Progress
                       ) -> list[str]:
    """Schemas holding only extensions that every role may use: they join the search path."""
    rows = conn.execute(_EXTENSION_SCHEMAS, {"own": name}).fetchall()
    for schema, _ in (row for row in rows if not row[1]):
        progress("postgres", f"schema {schema} holds only extensions but PUBLIC may not use "
                 f"it, so the worktree cannot: GRANT USAGE ON SCHEMA {schema} TO PUBLIC "
                 "lets it (devd does not change privileges on what it did not make)")
    return [schema for schema, usable in rows if usable]


def _refuse_open_schemas(conn: psycopg.Connection[Any], name: str) -> None:
    """A schema anyone may create in would let the worktree write next to the app's tables."""
    open_schemas = [row[0] for row in conn.execute(_OPEN_SCHEMAS, (name,))]
    if open_schemas:
        fix = " ".join(f"REVOKE CREATE ON SCHEMA {sql.Identifier(s).as_string(conn)} FROM "
                       "PUBLIC;" for s in open_schemas)
        raise DevdError(
            f"schema mode cannot isolate this database: every role may create objects in "
            f"{', '.join(open_schemas)} (the PostgreSQL <= 14 default for public), so a "
            "worktree could write beside the app's tables",
            f"as the database owner: {fix} (or use mode = \"database\")", code="postgres_privilege")


def _refuse_shared_with_public(conn: psycopg.Connection[Any], name: str) -> None:
    """A table (or definer routine) every role may use would let the worktree reach main's
    rows."""
    shared = [row[0] for row in conn.execute(_SHARED_WITH_PUBLIC, (name, name))]
    if shared:
        fix = " ".join(f"REVOKE ALL ON {'FUNCTION ' if '(' in what else ''}{what} FROM PUBLIC;"
                       for what in shared[:5])
        more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
        raise DevdError(
            f"schema mode cannot isolate this database: every role may use "
            f"{', '.join(shared[:5])}{more} (granted to PUBLIC), so a worktree could reach "
            "the app's rows by their qualified names",
            f"as their owner: {fix}{more} (or use mode = \"database\")",
            code="postgres_privilege")


def _schema_statements(name: str, wt_id: str, exists: bool, dbname: str,
                       visible: list[str]) -> list[sql.Composable]:
    """The schema, its marker, and a search path of only it (and extension-only schemas):
    unqualified names never reach the app's own tables in public."""
    ident = sql.Identifier(name)
    create = [] if exists else [sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(ident, ident)]
    path = sql.SQL(", ").join(sql.Identifier(s) for s in [name, *visible])
    return [*create, server.mark("schema", name, wt_id),
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = {}").format(
                ident, sql.Identifier(dbname), path)]


def _ensure_database(ctx: Context, conn: psycopg.Connection[Any], name: str,
                     marked: bool | None, progress: Progress) -> list[str] | None:
    """`marked`: None if absent, False if ours but unmarked (a crash after the clone).
    Returns what the hand-over had to leave with another owner (None if none ran)."""
    wt_id, template = ctx.worktree.id, ctx.config.postgres.template
    if marked is None:
        progress("postgres", f"creating database {name}"
                 + (f" from template {template}" if template else ""))
        _create_database(ctx, conn, name)  # cannot share a transaction with anything
    kept = None
    if template and not marked:
        # Before the marker: a crash in between is seen (unmarked) and finished next time.
        kept = _hand_over(ctx, name, progress)
    ident = sql.Identifier(name)
    # Other worktrees' roles may not even connect: isolation by privilege, not by convention.
    server.batch(conn, [
        server.mark("database", name, wt_id),
        sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(ident),
        sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(ident, ident)])
    return kept


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


def _hand_over(ctx: Context, name: str, progress: Progress) -> list[str]:
    """Give the clone's objects to the worktree role, in one transaction; say what stays."""
    with server.connect(admin_url(ctx), dbname=name) as conn:
        steps = handover.plan(conn, name)
        progress("postgres", f"handing {len(steps.statements)} objects over to role {name}")
        handover.apply(conn, steps)
    if steps.kept:
        progress("postgres", "kept by their owners (no ALTER ... OWNER for them): "
                 f"{', '.join(steps.kept)}; the worktree may use them but not ALTER, DROP or "
                 "UPDATE them")
    return steps.kept


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
            _refuse_sessions(ctx, conn, detail, tests)
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
            # The app logs in as the role: closed first, no session can start after the
            # check and write what the dump no longer sees (reopened if the release stops).
            _set_login(conn, name, role, False)
            try:
                _dump_and_drop(ctx, conn, detail, (present, role, tests))
            except BaseException:
                with contextlib.suppress(psycopg.Error):  # the server went: provision reopens
                    _set_login(conn, name, role, True)
                raise
        except psycopg.Error as exc:
            raise server.translate(exc, f"dropping Postgres {mode} {name}") from exc
    dump.prune(ctx.paths)


def back_up_sql(ctx: Context, detail: dict[str, Any]) -> dict[str, Any]:
    """Phase 1 of a release: the role's logins closed (and, with --force, its sessions
    ended), then the dump. The logins stay closed, so nothing is written that the dump does
    not hold, until teardown_sql drops the role or resume_sql opens them again."""
    name, mode = detail["name"], detail["mode"]
    with _admin(detail) as conn:
        try:
            conn.execute("SET lock_timeout = '10s'")
            present, role, tests = _claims(ctx, conn, detail)
            if not present:
                return {}
            _set_login(conn, name, role, False)
            try:
                _release_sessions(ctx, conn, detail, tests)
                _dump(ctx, detail)
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    _set_login(conn, name, role, True)
                raise
        except psycopg.Error as exc:
            raise server.translate(exc, f"dumping Postgres {mode} {name}") from exc
    return {"dump": ctx.outputs["dumps"][-1], "closed": role}


def resume_sql(ctx: Context, detail: dict[str, Any], made: dict[str, Any]) -> None:
    if made.get("closed"):
        with _admin(detail) as conn:
            try:
                _set_login(conn, detail["name"], True, True)
            except psycopg.Error as exc:
                raise server.translate(exc, f"reopening Postgres {detail['name']}") from exc


def _dump_and_drop(ctx: Context, conn: psycopg.Connection[Any], detail: dict[str, Any],
                   claims: tuple[bool, bool, list[str]]) -> None:
    present, role, tests = claims
    _release_sessions(ctx, conn, detail, tests)
    if present and ctx.backup and records.KIND not in ctx.made:  # else dumped in phase 1
        _dump(ctx, detail)
    records.mark_dropping(ctx)
    for test in tests:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(test)))
        ctx.outputs.setdefault("test_databases_dropped", []).append(test)
    _drop(conn, detail["mode"], detail["name"], present, role)


def _set_login(conn: psycopg.Connection[Any], name: str, role: bool, login: bool) -> None:
    """Allow or refuse new logins of the worktree's role (sessions already open stay)."""
    if role and not conn.closed and not conn.broken:
        conn.execute(sql.SQL("ALTER ROLE {} " + ("LOGIN" if login else "NOLOGIN")).format(
            sql.Identifier(name)))


def _admin(detail: dict[str, Any]) -> psycopg.Connection[Any]:
    """The admin connection; in schema mode to the schema's database."""
    dbname = detail["database"] if detail["mode"] == "schema" else None
    return server.connect(detail.get("admin_url", ""), dbname=dbname)


def _claims(ctx: Context, conn: psycopg.Connection[Any], detail: dict[str, Any]
            ) -> tuple[bool, bool, list[str]]:
    """Whether the schema/database and the role exist (ours, else OwnershipConflict), and
    the role's test databases."""
    name, mode = detail["name"], detail["mode"]
    ours = server.claim_all(conn, name, ctx.worktree.id, (mode, "role"))
    role = "role" in ours
    return mode in ours, role, dependents.test_databases(conn, name) if role else []


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


def _refuse_sessions(ctx: Context, conn: psycopg.Connection[Any], detail: dict[str, Any],
                     tests: list[str]) -> list[server.Session]:
    """The blocking sessions, naming their holders; refused unless --force."""
    sessions = _sessions(conn, detail, tests)
    if sessions and not ctx.force:
        raise _in_use(ctx, detail, sessions)
    return sessions


def _release_sessions(ctx: Context, conn: psycopg.Connection[Any], detail: dict[str, Any],
                      tests: list[str]) -> None:
    """End the blocking sessions, which only --force allows."""
    server.terminate(conn, _refuse_sessions(ctx, conn, detail, tests))


def _in_use(ctx: Context, detail: dict[str, Any], sessions: list[server.Session]
            ) -> DevdError:
    return DevdError(
        f"Postgres {detail['mode']} {detail['name']} is in use: "
        + "; ".join(describe_sessions(ctx, sessions)),
        "stop those processes, or pass --force to end their sessions",
        code="postgres_in_use")
