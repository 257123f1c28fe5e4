"""Talking to a Postgres server as devd's admin: connect, check privileges, claim names.

Foreign errors (psycopg's) are translated here into DevdErrors that say what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from devd import instance
from devd.errors import DevdError, OwnershipConflict
from devd.paths import Paths
from devd.postgres import names

CONNECT_TIMEOUT = 5
DOCKER = "docker"  # the entry in the known-servers file for the Docker engine
THREE_WAYS = ("set DEVD_POSTGRES_URL (or url in devd.toml's [postgres]) to a server you can "
              "reach, start a local Postgres server, or set mode = \"container\" so devd runs "
              "one in Docker")

# Where each kind of object keeps its name and its comment (our marker).
_LOOKUP = {
    "role": "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
    "database": "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                "WHERE datname = %s",
    "schema": "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
}
_MARKED = """
SELECT 'role', rolname, shobj_description(oid, 'pg_authid') AS c FROM pg_roles
  WHERE shobj_description(oid, 'pg_authid') LIKE 'devd:%%'
UNION ALL SELECT 'database', datname, shobj_description(oid, 'pg_database') FROM pg_database
  WHERE shobj_description(oid, 'pg_database') LIKE 'devd:%%'
UNION ALL SELECT 'schema', nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace
  WHERE obj_description(oid, 'pg_namespace') LIKE 'devd:%%'
"""


def connect(url: str, dbname: str | None = None,
            timeout: int = CONNECT_TIMEOUT) -> psycopg.Connection[Any]:
    """An autocommit admin connection; an empty URL means libpq defaults (socket, PG* vars)."""
    extra: dict[str, Any] = {"dbname": dbname} if dbname else {}
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=timeout, **extra)
    except psycopg.Error as exc:
        raise connect_error(url, exc) from exc


def connect_error(url: str, exc: psycopg.Error) -> DevdError:
    where = names.mask_url(url) if url else "the default server (libpq: socket or PG* vars)"
    # libpq's message runs over lines ("server closed the connection unexpectedly" / "This
    # probably means ..." / "before or while ..."): the last alone says nothing.
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) \
        or type(exc).__name__
    lowered = str(exc).lower()
    if "authentication failed" in lowered or "no password supplied" in lowered:
        hint = "fix the user or password in DEVD_POSTGRES_URL or [postgres] url"
    elif "does not exist" in lowered:
        hint = "name an existing database in the admin URL (e.g. .../postgres)"
    else:
        hint = THREE_WAYS
    return DevdError(f"cannot connect to Postgres at {where}: {text}", hint,
                     code="postgres_unreachable")


def translate(exc: psycopg.Error, doing: str) -> DevdError:
    """A server error during `doing`, as a DevdError; privilege errors name the privilege."""
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag and diag.message_primary else str(exc)).strip()
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return DevdError(f"{doing}: permission denied: {message}",
                         "give the admin role the privilege named, or use another admin URL",
                         code="postgres_privilege")
    return DevdError(f"{doing}: {message}", "see the Postgres server log for more",
                     code="postgres_error")


def require(conn: psycopg.Connection[Any], *privileges: str) -> bool:
    """Fail early, naming each missing role attribute (CREATEROLE, CREATEDB) or CREATE."""
    row = conn.execute("SELECT current_user, rolsuper, rolcreaterole, rolcreatedb, "
                       "has_database_privilege(current_database(), 'CREATE') "
                       "FROM pg_roles WHERE rolname = current_user").fetchone()
    assert row is not None
    user, superuser, *flags = row
    if superuser:
        return True
    have = dict(zip(("CREATEROLE", "CREATEDB", "CREATE"), flags, strict=True))
    missing = [p for p in privileges if not have[p]]
    if missing:
        fixes = []
        if role_flags := [p for p in missing if p != "CREATE"]:
            fixes.append(f"ALTER ROLE {user} {' '.join(role_flags)};")
        if "CREATE" in missing:
            fixes.append(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {user};")
        raise DevdError(f"the admin role {user!r} lacks {', '.join(missing)}",
                        f"as a superuser: {' '.join(fixes)}", code="postgres_privilege")
    return False


_ALL_KINDS = """
SELECT 'role', shobj_description(oid, 'pg_authid'), NULL FROM pg_roles WHERE rolname = %(n)s
UNION ALL SELECT 'database', shobj_description(oid, 'pg_database'), pg_get_userbyid(datdba)
  FROM pg_database WHERE datname = %(n)s
UNION ALL SELECT 'schema', obj_description(oid, 'pg_namespace'), pg_get_userbyid(nspowner)
  FROM pg_namespace WHERE nspname = %(n)s
"""


def claim_all(conn: psycopg.Connection[Any], name: str, wt_id: str, kinds: tuple[str, ...]
              ) -> dict[str, bool]:
    """One round trip: which of `kinds` named `name` exist and are ours (→ whether marked
    already); a conflict raises."""
    ours = {}
    for kind, comment, owner in conn.execute(_ALL_KINDS, {"n": name}).fetchall():
        if kind not in kinds:
            continue
        adopted = kind == "database" and comment is None and owner == name
        if names.owner_of_marker(comment) != wt_id and not adopted:
            raise _conflict(kind, name, wt_id, comment)
        ours[kind] = not adopted
    return ours


def _conflict(kind: str, name: str, wt_id: str, comment: str | None) -> OwnershipConflict:
    return OwnershipConflict(
        f"Postgres {kind} {name!r} exists but is not marked as devd's for worktree {wt_id}"
        + (f" (comment: {comment!r})" if comment else ""),
        "devd never touches what it did not make: rename or drop it yourself, then provision",
    )


def lookup(conn: psycopg.Connection[Any], kind: str, name: str) -> tuple[Any, ...] | None:
    """(comment,) of a role, database or schema, or None if there is no such object."""
    return conn.execute(_LOOKUP[kind], (name,)).fetchone()


def mark(kind: str, name: str, wt_id: str) -> sql.Composed:
    return sql.SQL("COMMENT ON {} {} IS {}").format(
        sql.SQL(kind.upper()), sql.Identifier(name), sql.Literal(names.marker(wt_id)))


def role_statements(name: str, wt_id: str, password: str, exists: bool,
                    superuser: bool, createdb: bool = True) -> list[sql.Composable]:
    """Create (or adopt) a login role with its marker; run them as one batch so they commit
    together (a multi-statement query is one implicit transaction). CREATEDB (for the test
    runners' test databases) is set or cleared on every provision, so it follows devd.toml."""
    verb = "ALTER" if exists else "CREATE"
    flag = "CREATEDB" if createdb else "NOCREATEDB"
    statements: list[sql.Composable] = [
        sql.SQL(verb + " ROLE {} LOGIN " + flag + " PASSWORD {}").format(
            sql.Identifier(name), sql.Literal(password)),
        mark("role", name, wt_id)]
    if not superuser:
        # PG 16+: a CREATEROLE admin must be a member to create a database owned by the role.
        statements.append(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(name)))
    return statements


def batch(conn: psycopg.Connection[Any], statements: list[sql.Composable]) -> None:
    """Several statements in one round trip, atomically (no parameters: simple protocol)."""
    conn.execute(sql.SQL("; ").join(statements))


def marked_objects(conn: psycopg.Connection[Any]) -> list[tuple[str, str, str]]:
    """(kind, name, worktree id) of every object carrying this instance's marker. Objects of
    other instances are left out, and so are old-form markers: those name no instance, so
    they may be anyone's and are only ever adopted by the worktree they name."""
    found = []
    for kind, name, comment in conn.execute(_MARKED).fetchall():
        parsed = names.parse_marker(comment)
        if parsed and parsed[0] == instance.current():
            found.append((kind, name, parsed[1]))
    return found


@dataclass(frozen=True)
class Session:
    """A server backend connected to a database, and the local process behind it if known."""

    pid: int
    user: str
    application: str
    client: str
    local_pid: int | None

    def describe(self, worktree: str | None) -> str:
        text = f"backend pid {self.pid} (user {self.user}, {self.application or 'no app name'}"
        text += f", from {self.client})"
        if self.local_pid:
            text += f" held by local process {self.local_pid}"
        return text + (f" of worktree {worktree}" if worktree else "")


def sessions_on(conn: psycopg.Connection[Any], dbname: str,
                user: str | None = None) -> list[Session]:
    """Other sessions on `dbname` (of `user` only, if given): they block cloning and drops."""
    rows = conn.execute(
        "SELECT pid, usename, application_name, host(client_addr), client_port "
        "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
        "AND (%s::text IS NULL OR usename = %s)", (dbname, user, user)).fetchall()
    return [Session(pid, name or "?", app or "", f"{addr}:{port}" if addr else "local socket",
                    _local_client(addr, port)) for pid, name, app, addr, port in rows]


def _local_client(addr: str | None, port: int | None) -> int | None:
    """The local process owning a loopback client socket, when this host can see it."""
    if not addr or not port or port < 0 or addr not in ("127.0.0.1", "::1"):
        return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    except psutil.Error:
        return None
    return None


def terminate(conn: psycopg.Connection[Any], sessions: list[Session]) -> None:
    for session in sessions:
        conn.execute("SELECT pg_terminate_backend(%s)", (session.pid,))


def remember(paths: Paths, url: str) -> None:
    """Note a server devd made objects on, so orphans there can be found after a crash."""
    known = servers(paths)
    if url not in known:
        _servers_file(paths).write_text(json.dumps(known + [url]))
        _servers_file(paths).chmod(0o600)  # admin URLs may carry a password


def servers(paths: Paths) -> list[str]:
    try:
        found = json.loads(_servers_file(paths).read_text())
    except (OSError, ValueError):
        return []
    return [str(url) for url in found] if isinstance(found, list) else []


def _servers_file(paths: Paths) -> Path:
    return paths.state_dir / "postgres-servers.json"
