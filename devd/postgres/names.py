"""Postgres names, markers and connection strings for one worktree.

Postgres silently cuts identifiers to 63 bytes, so two long names equal in their first 63
bytes would collide: every name here is sanitised to [a-z0-9_] and ends in a hash of the
full worktree id, and is only ever passed to SQL as a quoted psycopg.sql.Identifier.
New names stop at 58 bytes, leaving room for the `test_` that Django, Rails and pytest
plugins put in front of a database name. Names recorded before (up to 63 bytes) stay valid:
teardown and ensure use the recorded name, never a recomputed one.

A marker is `devd:<instance id>:<worktree id>` (see devd/instance.py). The older form
`devd:<worktree id>` names no instance: it is trusted only for a worktree registered here.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any
from urllib.parse import quote, urlencode

from devd import instance

MAX_IDENTIFIER = 63
TEST_PREFIX = "test_"  # what test runners put before the database name
NAME_LIMIT = MAX_IDENTIFIER - len(TEST_PREFIX)
MARKER_PREFIX = "devd:"
LABEL_OWNER = "devd.owner"  # docker label: the worktree id
LABEL_INSTANCE = "devd.instance"  # docker label: the devd instance id
LABEL_KIND = "devd.kind"


def identifier(wt_id: str, prefix: str = "devd_", limit: int = NAME_LIMIT) -> str:
    """e.g. 'devd_shop_feat_a_1a2b3c4d_9f8e7d6c': [a-z0-9_], at most `limit` bytes (58 by
    default, so `test_` + name fits Postgres' 63), unique by hash."""
    digest = _digest(wt_id)
    base = re.sub(r"[^a-z0-9_]+", "_", wt_id.lower()).strip("_")
    room = limit - len(prefix) - len(digest) - 1
    return f"{prefix}{base[:room].rstrip('_')}_{digest}" if base else f"{prefix}{digest}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def test_database(name: str) -> str:
    """The test database of a worktree whose database or schema is `name`: `test_` + name,
    hashed down for a name recorded before names left room for the prefix."""
    wanted = TEST_PREFIX + name
    if len(wanted) <= MAX_IDENTIFIER:
        return wanted
    return f"{TEST_PREFIX}{name[:NAME_LIMIT - 9].rstrip('_')}_{_digest(name)}"


def docker_name(wt_id: str) -> str:
    """Container and volume name: docker allows [a-zA-Z0-9_.-]; the id is a slug already.
    Not bound by the test prefix: the name must stay what existing containers carry."""
    return "devd-pg-" + identifier(wt_id, prefix="", limit=MAX_IDENTIFIER).replace("_", "-")


def marker(wt_id: str) -> str:
    """This instance's marker for a worktree's object."""
    return f"{MARKER_PREFIX}{instance.current()}:{wt_id}"


def parse_marker(comment: str | None) -> tuple[str | None, str] | None:
    """(instance id or None for the old form, worktree id) of a devd marker, else None."""
    if not comment or not comment.startswith(MARKER_PREFIX):
        return None
    rest = comment[len(MARKER_PREFIX):]
    made_by, sep, wt_id = rest.partition(":")
    return (made_by, wt_id) if sep else (None, rest)


def owner_of_marker(comment: str | None) -> str | None:
    """The worktree id in a marker of this instance (or of the old form), else None: another
    instance's object is as foreign as one devd never made."""
    parsed = parse_marker(comment)
    if parsed is None or parsed[0] not in (None, instance.current()):
        return None
    return parsed[1]


def new_password() -> str:
    # Hex only: safe in URLs, .env files and shells without quoting.
    return secrets.token_hex(16)


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """What Postgres stores for a SCRAM-SHA-256 password (RFC 5802/7677), made here: an
    ALTER ROLE ... PASSWORD with it never shows the password itself to the server, whose
    log (log_statement = 'ddl' in the source's config) or pg_stat_statements would keep it
    in the data every clone copies. devd's passwords are ASCII: SASLprep leaves them as
    they are."""
    import base64
    import hmac

    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client = hmac.new(salted, b"Client Key", "sha256").digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return (f"SCRAM-SHA-256${iterations}:{b64(salt)}$"
            f"{b64(hashlib.sha256(client).digest())}:{b64(server)}")


def database_url(host: str, port: int | str, user: str, password: str, dbname: str) -> str:
    """A libpq URL; a Unix socket directory goes in the host query parameter."""
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    if host.startswith("/"):
        return f"postgresql://{auth}/{quote(dbname, safe='')}?" + urlencode({"host": host,
                                                                               "port": port})
    netloc = f"[{host}]" if ":" in host else host
    return f"postgresql://{auth}{netloc}:{port}/{quote(dbname, safe='')}"


def env_for(detail: dict[str, Any]) -> dict[str, str]:
    """DATABASE_URL, the PG* variables and DEVD_TEST_DATABASE for a recorded resource."""
    host, port = str(detail["host"]), str(detail["port"])
    user, password, dbname = detail["user"], detail["password"], detail["database"]
    return {
        "DATABASE_URL": database_url(host, port, user, password, dbname),
        "PGHOST": host, "PGPORT": port, "PGUSER": user, "PGPASSWORD": password,
        "PGDATABASE": dbname, "DEVD_TEST_DATABASE": test_database_of(detail),
    }


def test_database_of(detail: dict[str, Any]) -> str:
    """Per worktree in every mode: in schema mode the database is shared, so the test
    database is named after the schema, not `test_` + the shared database."""
    if detail.get("mode") == "container":
        return TEST_PREFIX + str(detail["database"])  # its own server: no one to collide with
    return test_database(str(detail["name"]))


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for status output and error messages."""
    # Up to the last @ of the authority (a password may hold an unencoded one); a keyword
    # value may be quoted (with spaces inside) or have spaces around its =.
    masked = re.sub(r"(://[^:/@?#]*:)[^/?#]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&']*)", r"\1***", masked,
                  flags=re.IGNORECASE)
