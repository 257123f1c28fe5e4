"""Template hand-over: a clone's objects become the worktree role's, in one transaction.

`CREATE DATABASE ... TEMPLATE` copies the template's owners along. A migration must own what
it alters (ALTER TYPE ... ADD VALUE, CREATE OR REPLACE FUNCTION, ALTER DOMAIN, ALTER VIEW), so
every owned object of the clone goes to the worktree role. REASSIGN OWNED is not used: it
cannot move the bootstrap superuser's objects and it also reassigns shared objects (whole
databases on the server). Objects that belong to an extension keep the extension's owner,
and the extension itself has no ALTER ... OWNER: those are reported, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from devd.errors import DevdError

_USER_NS = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_%%'")


def _select(catalog: str, owner: str, namespace: str | None, what: str,
            where: str = "TRUE", follows: str = "d.deptype = 'e'") -> str:
    """ALTER statements for the objects of one catalog that are not the role's already, and
    do not `follow` another object's owner (extension members, by default)."""
    join = f" JOIN pg_namespace n ON n.oid = x.{namespace}" if namespace else ""
    user = f" AND {_USER_NS}" if namespace else ""
    return (f"SELECT {what} FROM {catalog} x{join} WHERE x.{owner} <> (SELECT r.oid FROM "
            f"pg_roles r WHERE r.rolname = %(role)s){user} AND {where} AND NOT EXISTS (SELECT "
            f"FROM pg_depend d WHERE d.classid = '{catalog}'::regclass AND d.objid = x.oid "
            f"AND ({follows}))")


_RELKIND = ("CASE x.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' "
            "WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END")
_QUALIFIED = "format('ALTER {} %%I.%%I', n.nspname, x.{})"
_PARTS = [
    _select("pg_namespace", "nspowner", None, "format('ALTER SCHEMA %%I', x.nspname)",
            "x.nspname NOT IN ('pg_catalog', 'information_schema') AND x.nspname NOT LIKE "
            "'pg\\_%%' AND x.nspowner <> 'pg_database_owner'::regrole"),
    _select("pg_class", "relowner", "relnamespace",
            f"format('ALTER %%s %%I.%%I', {_RELKIND}, n.nspname, x.relname)",
            "x.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')",
            # Serial and identity sequences follow their table (ALTER SEQUENCE would fail).
            "d.deptype = 'e' OR d.deptype = 'i' AND d.refobjid <> x.oid OR "
            "d.deptype = 'a' AND x.relkind = 'S'"),
    # A range type's constructors belong to the bootstrap superuser even when the role
    # itself creates the type (PostgreSQL's rule): they follow it ('i') and stay.
    _select("pg_proc", "proowner", "pronamespace",
            "format('ALTER ROUTINE %%s', x.oid::regprocedure)",
            follows="d.deptype IN ('e', 'i')"),
    _select("pg_type", "typowner", "typnamespace",
            "format('ALTER %%s %%s', CASE x.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, "
            "x.oid::regtype)",
            "(x.typtype IN ('d', 'e', 'r', 'm') OR x.typtype = 'c' AND (SELECT c.relkind FROM "
            "pg_class c WHERE c.oid = x.typrelid) = 'c')"),
    _select("pg_operator", "oprowner", "oprnamespace",
            "format('ALTER OPERATOR %%s', x.oid::regoperator)"),
    _select("pg_opclass", "opcowner", "opcnamespace",
            "format('ALTER OPERATOR CLASS %%I.%%I USING %%I', n.nspname, x.opcname, "
            "(SELECT a.amname FROM pg_am a WHERE a.oid = x.opcmethod))"),
    _select("pg_opfamily", "opfowner", "opfnamespace",
            "format('ALTER OPERATOR FAMILY %%I.%%I USING %%I', n.nspname, x.opfname, "
            "(SELECT a.amname FROM pg_am a WHERE a.oid = x.opfmethod))"),
    _select("pg_collation", "collowner", "collnamespace",
            _QUALIFIED.format("COLLATION", "collname")),
    _select("pg_conversion", "conowner", "connamespace",
            _QUALIFIED.format("CONVERSION", "conname")),
    _select("pg_ts_config", "cfgowner", "cfgnamespace",
            _QUALIFIED.format("TEXT SEARCH CONFIGURATION", "cfgname")),
    _select("pg_ts_dict", "dictowner", "dictnamespace",
            _QUALIFIED.format("TEXT SEARCH DICTIONARY", "dictname")),
    _select("pg_statistic_ext", "stxowner", "stxnamespace",
            _QUALIFIED.format("STATISTICS", "stxname")),
    _select("pg_largeobject_metadata", "lomowner", None,
            "format('ALTER LARGE OBJECT %%s', x.oid)"),
    # FOR ALL TABLES publications need a superuser owner: they stay, and are reported.
    _select("pg_publication", "pubowner", None, "format('ALTER PUBLICATION %%I', x.pubname)",
            "NOT x.puballtables"),
]
_STATEMENTS = " UNION ALL ".join(_PARTS)

# What cannot change hands: extensions (no ALTER EXTENSION ... OWNER), and kinds whose
# owner must be a superuser. plpgsql lives in pg_catalog in every database: not worth a word.
_KEPT = """
WITH r AS (SELECT oid FROM pg_roles WHERE rolname = %(role)s)
SELECT 'extension ' || quote_ident(extname), pg_get_userbyid(extowner) FROM pg_extension
  WHERE extowner <> (SELECT oid FROM r) AND extnamespace <> 'pg_catalog'::regnamespace
UNION ALL SELECT 'event trigger ' || quote_ident(evtname), pg_get_userbyid(evtowner)
  FROM pg_event_trigger WHERE evtowner <> (SELECT oid FROM r)
UNION ALL SELECT 'publication ' || quote_ident(pubname), pg_get_userbyid(pubowner)
  FROM pg_publication WHERE pubowner <> (SELECT oid FROM r) AND puballtables
UNION ALL SELECT 'foreign server ' || quote_ident(srvname), pg_get_userbyid(srvowner)
  FROM pg_foreign_server WHERE srvowner <> (SELECT oid FROM r)
"""


@dataclass(frozen=True)
class Plan:
    """The ALTER statements of one hand-over, and what stays with another owner."""

    statements: list[str]
    kept: list[str]  # e.g. 'extension pgcrypto (owner postgres)'


def plan(conn: psycopg.Connection[Any], role: str) -> Plan:
    """Read what is to be handed over; names come back schema-qualified and quoted."""
    conn.execute("SET search_path = pg_catalog")  # regprocedure/regtype print qualified names
    rows = conn.execute(_STATEMENTS, {"role": role}).fetchall()
    tail = " OWNER TO " + sql.Identifier(role).as_string(conn)
    kept = conn.execute(_KEPT, {"role": role}).fetchall()
    return Plan([stmt + tail for (stmt,) in rows], [f"{what} (owner {who})" for what, who in kept])


def apply(conn: psycopg.Connection[Any], steps: Plan) -> None:
    """Every ALTER in one query: one round trip, one implicit transaction (all or nothing)."""
    if not steps.statements:
        return
    try:
        conn.execute("; ".join(steps.statements).encode())
    except psycopg.errors.OutOfMemory as exc:
        raise DevdError(
            f"handing {len(steps.statements)} objects over needs more locks than the server "
            f"has in one transaction: {exc}; nothing was handed over",
            "raise max_locks_per_transaction in postgresql.conf (e.g. 256) and restart the "
            "server, then `devd provision` again", code="postgres_error") from exc
