"""What keeps a worktree's role from being dropped, found before anything is dropped.

DROP ROLE fails while the role owns anything or holds privileges anywhere on the server
(pg_shdepend). Release drops the worktree's schema or database and its test databases
(databases the role owns named test_*, made by Django, Rails or pytest test runners), then
DROP OWNED in the admin connection's database revokes what is left there and on shared
objects. Anything else (a database of the role's that is not a test database, objects it
owns outside its schema, privileges in a third database) is the user's: release refuses
and names it, rather than drop half and fail.
"""

from __future__ import annotations

from typing import Any

import psycopg

from devd.errors import DevdError
from devd.postgres import names

SHOWN = 5  # blockers named in the message; the rest are counted

_TEST_DATABASES = """
SELECT datname FROM pg_database
WHERE datdba = (SELECT oid FROM pg_roles WHERE rolname = %s) AND datname LIKE 'test\\_%%'
ORDER BY datname
"""
# One row per dependency on the role. pg_identify_object only resolves objects of the
# current database, so it is asked only about those. An extension's schema is the one it
# was created in (DROP SCHEMA ... CASCADE takes it along).
_DEPENDENCIES = """
WITH here AS (SELECT oid FROM pg_database WHERE datname = current_database())
SELECT d.deptype, d.dbid = 0, d.dbid = here.oid, coalesce(db.datname, ''),
       CASE WHEN d.classid = 'pg_database'::regclass
            THEN (SELECT datname FROM pg_database WHERE oid = d.objid) END,
       CASE WHEN d.dbid = here.oid THEN pg_describe_object(d.classid, d.objid, d.objsubid) END,
       CASE WHEN d.dbid <> here.oid THEN NULL
            WHEN d.classid = 'pg_extension'::regclass
            THEN (SELECT extnamespace::regnamespace::text FROM pg_extension WHERE oid = d.objid)
            ELSE (pg_identify_object(d.classid, d.objid, d.objsubid)).schema END,
       CASE WHEN d.dbid = here.oid
            THEN (pg_identify_object(d.classid, d.objid, d.objsubid)).identity END,
       d.classid = 'pg_default_acl'::regclass
FROM pg_shdepend d CROSS JOIN here LEFT JOIN pg_database db ON db.oid = d.dbid
WHERE d.refclassid = 'pg_authid'::regclass
  AND d.refobjid = (SELECT oid FROM pg_roles WHERE rolname = %s)
"""


def test_databases(conn: psycopg.Connection[Any], role: str) -> list[str]:
    """Databases the worktree role owns whose names a test runner gives (test_*)."""
    return [row[0] for row in conn.execute(_TEST_DATABASES, (role,)).fetchall()]


def blockers(conn: psycopg.Connection[Any], detail: dict[str, Any],
             tests: list[str]) -> list[str]:
    """What would make dropping the role fail after its schema or database is gone."""
    name, mode = detail["name"], detail["mode"]
    dropped = set(tests) | ({name} if mode == "database" else set())
    found: list[str] = []
    for row in conn.execute(_DEPENDENCIES, (name,)).fetchall():
        why = _blocker(row, name, mode, dropped)
        if why and why not in found:
            found.append(why)
    return found


def _blocker(row: tuple[Any, ...], name: str, mode: str, dropped: set[str]) -> str | None:
    deptype, shared, local, dbname, database, described, schema, identity, defaults = row
    owns = deptype == "o" and not defaults  # default privileges: DROP OWNED removes them
    if shared:
        if database in dropped or not owns:
            return None  # dropped with it, or a privilege DROP OWNED revokes
        return f"it owns database {database}" if database else "it owns a tablespace"
    if dbname in dropped:
        return None
    if local:
        # Names are [a-z0-9_] (names.identifier), which Postgres prints unquoted.
        inside = mode == "schema" and name in (schema, identity)
        return None if inside or not owns else f"it owns {described} in database {dbname}"
    return f"it {'owns objects' if owns else 'holds privileges'} in database {dbname}"


def error(detail: dict[str, Any], found: list[str]) -> DevdError:
    """The refusal, naming what the user must move or drop first."""
    shown = "; ".join(found[:SHOWN]) + (f"; and {len(found) - SHOWN} more"
                                         if len(found) > SHOWN else "")
    role = detail["name"]
    return DevdError(
        f"Postgres role {role} cannot be dropped: {shown}",
        f"these are not devd's to drop: drop them, or hand them to another role "
        f"(REASSIGN OWNED BY {role} TO ...; in each database named), then release again; "
        f"test databases ({names.TEST_PREFIX}*) owned by {role} are dropped by devd",
        code="postgres_dependents")
