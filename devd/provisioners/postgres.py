"""Postgres per worktree: a schema, a database or a container, chosen by [postgres] mode.

schema:   a login role and a schema of the same name, owned by it, so the default
          search_path ("$user", public) lands in it with no URL options.
database: a database owned by a per-worktree login role; optionally cloned from a template.
container: see pgcontainer.py.
Teardown always dumps (pg_dump -Fc) before it drops, unless the caller opts out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from devd import pgdump, pgnames, pgserver, processes
from devd.errors import DevdError, OwnershipConflict
from devd.provisioners import pgcontainer
from devd.provisioners.base import Context, Health, Progress, Provisioner

SQL_MODES = ("schema", "database")
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


class PostgresProvisioner(Provisioner):
    kind = "postgres"
    holds_data = True

    def applies(self, ctx: Context) -> bool:
        # Mode none and nothing recorded: this worktree has no Postgres at all.
        return ctx.config.postgres.mode != "none" or bool(ctx.recorded(self.kind).get("mode"))

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        mode, recorded = ctx.config.postgres.mode, ctx.recorded(self.kind)
        old = recorded.get("mode", "none")
        if old not in ("none", mode):
            if mode == "none":
                progress("postgres", f"[postgres] removed; the {old} is kept until "
                         "`devd release --yes`")
                return recorded
            raise DevdError(f"[postgres] mode changed from {old} to {mode}",
                            f"run `devd release --yes` first (a dump of the {old} is kept), "
                            "then provision again", code="config")
        if mode == "none":
            return {"mode": "none"}
        if mode == "container":
            return pgcontainer.ensure(ctx, progress)
        return ensure_sql(ctx, progress, mode)

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        mode = detail.get("mode", "none")
        if mode == "container":
            return pgcontainer.check(ctx, detail)
        if mode in SQL_MODES:
            return check_sql(detail)
        return Health(True)

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        try:
            self._teardown(ctx, detail)
        except OwnershipConflict:
            if detail.get("complete") or detail.get("initialized"):
                raise  # something replaced what devd made: say so, touch nothing
            # Only an intent was recorded: the name was someone else's from the start (the
            # provision failed on that conflict), so there is nothing of ours to remove.

    def _teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        mode = detail.get("mode", "none")
        if mode == "container":
            pgcontainer.teardown(ctx, detail)
        elif mode in SQL_MODES:
            teardown_sql(ctx, detail)

    def env(self, ctx: Context, detail: dict[str, Any]) -> dict[str, str]:
        if detail.get("mode", "none") == "none" or "password" not in detail:
            return {}
        return pgnames.env_for(detail)


def record_intent(ctx: Context, **fields: Any) -> None:
    """Record the names before creating anything: if this run fails half-way, release and
    gc still know what to look for (the names are derived, the password is not)."""
    ctx.registry.set_resource(ctx.worktree.id, PostgresProvisioner.kind, "pending",
                              ctx.recorded(PostgresProvisioner.kind) | fields)


def admin_url(ctx: Context) -> str:
    """DEVD_POSTGRES_URL (the caller's, else the daemon's) wins over devd.toml; empty means
    libpq defaults. A worktree whose objects live on one server stays there: switching
    would create a second copy and orphan the first."""
    url = ctx.options.get("postgres_url") or ctx.settings.postgres_url or ctx.config.postgres.url
    recorded = ctx.recorded("postgres")
    if recorded.get("mode") in SQL_MODES and recorded.get("admin_url", url) != url:
        raise DevdError(
            f"this worktree's Postgres {recorded['mode']} lives on "
            f"{pgnames.mask_url(recorded['admin_url']) or 'the default server'}, not on "
            f"{pgnames.mask_url(url) or 'the default server'}",
            "use the same URL, or `devd release --yes` first (a dump is kept)", code="config")
    return url


def public_view(detail: dict[str, Any], state: str) -> dict[str, Any]:
    """The status --json "postgres" entry: no password, no admin URL."""
    return {"mode": detail.get("mode"), "name": detail.get("name"), "host": detail.get("host"),
            "port": detail.get("port"), "state": state}


# -- schema and database modes ------------------------------------------------------------


def ensure_sql(ctx: Context, progress: Progress, mode: str) -> dict[str, Any]:
    url, wt_id = admin_url(ctx), ctx.worktree.id
    name = pgnames.identifier(wt_id)
    password = ctx.recorded("postgres").get("password") or pgnames.new_password()
    with pgserver.connect(url) as conn:
        needs = ("CREATEROLE", "CREATE") if mode == "schema" else ("CREATEROLE", "CREATEDB")
        superuser = pgserver.require(conn, *needs)
        dbname = conn.info.dbname if mode == "schema" else name
        record_intent(ctx, mode=mode, name=name, admin_url=url, database=dbname,
                      password=password)
        try:
            # Every name first: a conflict anywhere means nothing at all is created.
            ours = pgserver.claim_all(conn, name, wt_id, ("role", mode))
            role = pgserver.role_statements(name, wt_id, password, "role" in ours, superuser)
            if mode == "schema":
                pgserver.batch(conn, role + _schema_statements(name, wt_id, "schema" in ours))
            else:
                pgserver.batch(conn, role)
                _ensure_database(ctx, conn, name, ours.get("database"), progress)
        except psycopg.Error as exc:
            raise pgserver.translate(exc, f"provisioning Postgres {mode} {name}") from exc
        pgserver.remember(ctx.paths, url)
        return {"mode": mode, "name": name, "host": conn.info.host, "port": conn.info.port,
                "user": name, "database": dbname, "password": password, "admin_url": url,
                "complete": True}


def _schema_statements(name: str, wt_id: str, exists: bool) -> list[sql.Composable]:
    create = [] if exists else [sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
        sql.Identifier(name), sql.Identifier(name))]
    return [*create, pgserver.mark("schema", name, wt_id)]


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
    pgserver.batch(conn, [
        pgserver.mark("database", name, wt_id),
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
        raise _template_busy(ctx, cfg.template, pgserver.sessions_on(conn, cfg.template)) from exc


def _clear_template(ctx: Context, conn: psycopg.Connection[Any], template: str) -> None:
    blockers = pgserver.sessions_on(conn, template)
    if not blockers:
        return
    if not ctx.config.postgres.template_terminate:
        raise _template_busy(ctx, template, blockers)
    pgserver.terminate(conn, blockers)


def _template_busy(ctx: Context, template: str, blockers: list[pgserver.Session]) -> DevdError:
    return DevdError(
        f"template database {template!r} has open connections, so it cannot be cloned: "
        + "; ".join(describe_sessions(ctx, blockers)),
        "close those sessions, or set template_terminate = true in [postgres] to let devd end "
        "them", code="postgres_in_use")


def describe_sessions(ctx: Context, sessions: list[pgserver.Session]) -> list[str]:
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
    with pgserver.connect(admin_url(ctx), dbname=name) as conn:
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
        with pgserver.connect(url, timeout=3,
                              dbname=detail["database"] if kind == "schema" else None) as conn:
            found = pgserver.lookup(conn, kind, name)
    except DevdError as exc:
        _unreachable[url] = (time.monotonic() + _UNREACHABLE_FOR, exc.message)
        return Health(False, exc.message, {"state": "unreachable"})
    _unreachable.pop(url, None)
    if found is None:
        return Health(False, f"{kind} {name} is missing (run `devd provision`)",
                      {"state": "missing"})
    return Health(True, "", {"state": "ready"})


def teardown_sql(ctx: Context, detail: dict[str, Any]) -> None:
    url, name, wt_id, mode = detail.get("admin_url", ""), detail["name"], ctx.worktree.id, \
        detail["mode"]
    dbname = detail["database"] if mode == "schema" else None
    with pgserver.connect(url, dbname=dbname) as conn:
        try:
            conn.execute("SET lock_timeout = '10s'")
            if pgserver.claim(conn, mode, name, wt_id, owner_role=name):
                _release_sessions(ctx, conn, detail)
                if ctx.backup:
                    target = pgdump.new_dump_path(ctx.paths, wt_id)
                    pgdump.dump_local(url, detail["database"], target,
                                      schema=name if mode == "schema" else None)
                    ctx.outputs.setdefault("dumps", []).append(str(target))
                drop = "DROP SCHEMA {} CASCADE" if mode == "schema" else "DROP DATABASE {}"
                conn.execute(sql.SQL(drop).format(sql.Identifier(name)))
            pgserver.drop_role(conn, name, wt_id)
        except psycopg.Error as exc:
            raise pgserver.translate(exc, f"dropping Postgres {mode} {name}") from exc
    pgdump.prune(ctx.paths)


def _release_sessions(ctx: Context, conn: psycopg.Connection[Any],
                      detail: dict[str, Any]) -> None:
    """Sessions that would block the drop: name their holders, end them only with --force."""
    sessions = pgserver.sessions_on(conn, detail["database"],
                                    user=detail["name"] if detail["mode"] == "schema" else None)
    if not sessions:
        return
    if not ctx.force:
        raise DevdError(
            f"Postgres {detail['mode']} {detail['name']} is in use: "
            + "; ".join(describe_sessions(ctx, sessions)),
            "stop those processes, or pass --force to end their sessions",
            code="postgres_in_use")
    pgserver.terminate(conn, sessions)


def restore(ctx: Context, detail: dict[str, Any], source: str | None) -> dict[str, Any]:
    """Load a dump (the worktree's latest by default) into its provisioned Postgres."""
    found = Path(source) if source else pgdump.latest(ctx.paths, ctx.worktree.id)
    if found is None:
        raise DevdError(f"no dump of worktree {ctx.worktree.id} in {pgdump.dumps_dir(ctx.paths)}",
                        "pass the dump's path: devd restore --dump FILE", code="usage")
    path = pgdump.verify(found)
    mode = detail.get("mode", "none")
    if mode == "container":
        pgcontainer.restore(ctx, detail, path)
    elif mode in SQL_MODES:
        url = pgnames.env_for(detail)["DATABASE_URL"]
        pgdump.restore_local(url, detail["database"], path,
                             skip_schema=detail["name"] if mode == "schema" else None)
    else:
        raise DevdError(f"{ctx.worktree.path} has no Postgres provisioned",
                        "set [postgres] mode in devd.toml and run `devd provision` first",
                        code="usage")
    return {"restored": str(path), "mode": mode, "name": detail.get("name")}



def orphans(ctx_paths: Any, known_ids: set[str]) -> list[dict[str, str]]:
    """Objects with devd's marker, on every server devd has used, that no worktree owns."""
    found: list[dict[str, str]] = []
    for url in pgserver.servers(ctx_paths):
        if url == pgserver.DOCKER:
            found += pgcontainer.orphans(known_ids)
            continue
        try:
            with pgserver.connect(url, timeout=2) as conn:
                marked = pgserver.marked_objects(conn)
        except (DevdError, psycopg.Error):
            continue  # a server that is down has no orphans we could do anything about
        where = pgnames.mask_url(url) or "default server"
        found += [{"kind": kind, "name": name, "worktree_id": owner, "where": where}
                  for kind, name, owner in marked if owner not in known_ids]
    return found


def status_entry(details: dict[str, dict[str, Any]], checked: dict[str, Health]
                 ) -> dict[str, Any]:
    """{"postgres": {...}} for `devd status --json` when the worktree has one, else {}."""
    detail = details.get("postgres", {})
    if detail.get("mode", "none") == "none":
        return {}
    health = checked.get("postgres")
    state = health.detail.get("state", "ready") if health else "unchecked"
    return {"postgres": public_view(detail, state)}
