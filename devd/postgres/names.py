"""Postgres names, markers and connection strings for one worktree.

Postgres silently cuts identifiers to 63 bytes, so two long names equal in their first 63
bytes would collide: every name here is sanitised to [a-z0-9_] and ends in a hash of the
full worktree id, and is only ever passed to SQL as a quoted psycopg.sql.Identifier.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any
from urllib.parse import quote, urlencode

MAX_IDENTIFIER = 63
MARKER_PREFIX = "devd:"
LABEL_OWNER = "devd.owner"  # docker label: the worktree id
LABEL_KIND = "devd.kind"


def identifier(wt_id: str, prefix: str = "devd_") -> str:
    """e.g. 'devd_shop_feat_a_1a2b3c4d_9f8e7d6c': [a-z0-9_], at most 63 bytes, unique by hash."""
    digest = hashlib.sha256(wt_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9_]+", "_", wt_id.lower()).strip("_")
    room = MAX_IDENTIFIER - len(prefix) - len(digest) - 1
    return f"{prefix}{base[:room].rstrip('_')}_{digest}" if base else f"{prefix}{digest}"


def docker_name(wt_id: str) -> str:
    """Container and volume name: docker allows [a-zA-Z0-9_.-]; the id is a slug already."""
    return "devd-pg-" + identifier(wt_id, prefix="").replace("_", "-")


def marker(wt_id: str) -> str:
    return MARKER_PREFIX + wt_id


def owner_of_marker(comment: str | None) -> str | None:
    """The worktree id in a devd marker comment, or None if it is not ours."""
    if comment and comment.startswith(MARKER_PREFIX):
        return comment[len(MARKER_PREFIX):]
    return None


def new_password() -> str:
    # Hex only: safe in URLs, .env files and shells without quoting.
    return secrets.token_hex(16)


def database_url(host: str, port: int | str, user: str, password: str, dbname: str) -> str:
    """A libpq URL; a Unix socket directory goes in the host query parameter."""
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    if host.startswith("/"):
        return f"postgresql://{auth}/{quote(dbname, safe='')}?" + urlencode({"host": host,
                                                                               "port": port})
    netloc = f"[{host}]" if ":" in host else host
    return f"postgresql://{auth}{netloc}:{port}/{quote(dbname, safe='')}"


def env_for(detail: dict[str, Any]) -> dict[str, str]:
    """DATABASE_URL and the PG* variables for a recorded postgres resource."""
    host, port = str(detail["host"]), str(detail["port"])
    user, password, dbname = detail["user"], detail["password"], detail["database"]
    return {
        "DATABASE_URL": database_url(host, port, user, password, dbname),
        "PGHOST": host, "PGPORT": port, "PGUSER": user, "PGPASSWORD": password,
        "PGDATABASE": dbname,
    }


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for status output and error messages."""
    masked = re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", url)
    return re.sub(r"(password=)[^\s&]*", r"\1***", masked)
