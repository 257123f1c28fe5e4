"""Dumps before drops: pg_dump -Fc into the state dir, verified, kept for 7 days."""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devd.errors import DevdError, UsageError
from devd.paths import Paths, ensure_private_dir


class Failure(NamedTuple):
    """What a failed dump or restore left undone, what to do, and the error code."""

    consequence: str
    hint: str
    code: str


DROP_FAILURE = Failure("nothing was dropped", "fix the cause and release again, or pass "
                       "--no-backup to skip the dump", "backup_failed")
RESTORE_FAILURE = Failure("nothing was changed", "fix the cause named, then `devd restore` "
                          "again", "restore_failed")
KEEP_SECONDS = 7 * 86400
DUMP_TIMEOUT = 1800
SUFFIX = ".dump"


def dumps_dir(paths: Paths) -> Path:
    target = paths.state_dir / "dumps"
    ensure_private_dir(target)
    return target


def new_dump_path(paths: Paths, wt_id: str, note: str = "") -> Path:
    """A noted dump (e.g. "before-restore") is kept and pruned, but never the `latest`.
    Never a path that exists: a second dump in the same second (a restore, then a release)
    would overwrite the first, which a refused release then deletes as its own partial
    one (teardown._discard_backups); the next second's name is waited for instead."""
    while True:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = dumps_dir(paths) / f"{wt_id}-{stamp}{'-' + note if note else ''}{SUFFIX}"
        if not target.exists():
            return target
        time.sleep(1.001 - time.time() % 1)


def latest(paths: Paths, wt_id: str) -> Path | None:
    """The newest dump of a worktree (timestamps in the name sort in time order)."""
    pattern = re.compile(re.escape(wt_id) + r"-\d{8}T\d{6}Z" + re.escape(SUFFIX) + "$")
    found = sorted(p for p in dumps_dir(paths).iterdir() if pattern.match(p.name))
    return found[-1] if found else None


def prune(paths: Paths, now: float | None = None) -> list[Path]:
    """Remove dumps older than 7 days; returns what was removed."""
    cutoff = (now or time.time()) - KEEP_SECONDS
    old = [p for p in dumps_dir(paths).glob(f"*{SUFFIX}") if p.stat().st_mtime < cutoff]
    for path in old:
        path.unlink()
    return old


def binary(name: str) -> str:
    """pg_dump / pg_restore: on PATH, else the newest Debian/Ubuntu postgresql-N install."""
    found = shutil.which(name)
    if found:
        return found
    installed = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if not installed:
        raise DevdError(f"{name} not found: devd needs it to keep a dump before dropping",
                        "install the PostgreSQL client (e.g. apt install postgresql-client), "
                        "or pass --no-backup to drop without a dump", code="backup_failed")
    return max(installed, key=lambda p: int(re.sub(r"\D", "", p.split("/")[4]) or 0))


def libpq_args(url: str, dbname: str) -> tuple[str, dict[str, str]]:
    """A conninfo for argv without the password, which goes in PGPASSWORD (argv is public).
    A URL libpq cannot parse is a UsageError whose message has the password masked: libpq's
    own quotes the whole URL, and an internal error would put it in the daemon's log."""
    from psycopg import ProgrammingError

    from devd.postgres.names import mask_url

    try:
        params = {k: v for k, v in conninfo_to_dict(url).items() if v is not None}
    except ProgrammingError as exc:
        raise UsageError(f"not a Postgres URL: {mask_url(str(exc))}",
                         "postgres://USER:PASSWORD@HOST:PORT/DB, or key=value conninfo"
                         ) from None
    password = params.pop("password", None)
    params["dbname"] = dbname
    env = {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}
    return make_conninfo("", **params), env


def dump_local(url: str, dbname: str, target: Path, schema: str | None = None,
               failure: Failure = DROP_FAILURE) -> Path:
    """pg_dump -Fc of a database (or one schema of it) on the host, then verified."""
    conninfo, env = libpq_args(url, dbname)
    argv = [binary("pg_dump"), "-Fc", "--no-password", "-f", str(target)]
    argv += ["-n", schema] if schema else []
    _run(argv + ["--dbname", conninfo], env, f"pg_dump of {dbname}", target, failure)
    return verify(target, failure)


def restore_script(source: Path, target: Path, skip_schema: str | None = None) -> Path:
    """pg_restore's SQL for `source` (no owners, no grants: the restoring role owns it all).

    Left out: in schema mode the schema itself (devd makes it), and comments on extensions
    (CREATE EXTENSION sets them; only the extension's owner may change them)."""
    listing = _list_without(source, skip_schema)
    # --single-transaction: else large objects come in their own BEGIN/COMMIT, whose COMMIT
    # would end psql's one transaction half-way (the drops committed, the rest not).
    # --restrict-key: the script starts with psql's \restrict, so a backslash in a crafted
    # entry (\! a shell command, \connect as someone else) is refused, not run; a
    # pg_restore without it (before 13.22, 14.19, 15.14, 16.10, 17.6) fails here, loudly.
    argv = [binary("pg_restore"), "--single-transaction", "--no-owner", "--no-acl", "-L",
            str(listing), f"--restrict-key={secrets.token_hex(16)}", "-f", str(target),
            str(source)]
    try:
        _run(argv, dict(os.environ), f"reading {source}", target, RESTORE_FAILURE)
    except DevdError as exc:
        if "restrict-key" not in exc.message:
            raise
        raise DevdError(exc.message, "this pg_restore cannot fence a dump's psql "
                        "meta-commands (\\restrict): upgrade the PostgreSQL client to "
                        "13.22, 14.19, 15.14, 16.10, 17.6 or later", code=exc.code) from None
    finally:
        listing.unlink(missing_ok=True)
    return target


def refuse_other_schemas(source: Path, schema: str) -> None:
    """Schema mode loads into the worktree's own schema only, and pg_restore cannot rename
    one: a dump of another schema is refused before anything changes. (public may appear in
    a whole-database dump; what is in it fails on the role's privileges, loudly.)"""
    others = [name for name in _SCHEMA_ENTRY.findall(_listing(source))
              if name not in (schema, "public")]
    if others:
        raise DevdError(f"{source} holds schema {', '.join(others)}, not this worktree's "
                        f"{schema}; nothing was changed", "pg_restore cannot rename a "
                        "schema: restore a dump of this worktree's schema (made by `devd "
                        f"release`, or pg_dump -n {schema})", code=RESTORE_FAILURE.code)


def run_psql(url: str, dbname: str, files: list[Path]) -> None:
    """The files through psql in ONE transaction that stops at the first error."""
    conninfo, env = libpq_args(url, dbname)
    argv = [binary("psql"), "-X", "-q", "--no-password", "--single-transaction",
            "-v", "ON_ERROR_STOP=1", "--dbname", conninfo]
    for path in files:
        argv += ["-f", str(path)]
    _run(argv, env | {"PGAPPNAME": "devd-restore"}, f"restore into {dbname}", None,
         Failure("the transaction was rolled back: the data is exactly as before",
                 RESTORE_FAILURE.hint, RESTORE_FAILURE.code))


# A schema's entry in `pg_restore -l`: "5; 2615 16385 SCHEMA - name owner".
_SCHEMA_ENTRY = re.compile(r"^\d+; \d+ \d+ SCHEMA - (.+) \S+$", re.MULTILINE)


def _listing(source: Path) -> str:
    return subprocess.run([binary("pg_restore"), "-l", str(source)], capture_output=True,
                          text=True, check=True, timeout=60).stdout


def _list_without(source: Path, schema: str | None) -> Path:
    listing = _listing(source)
    skip = [r"\bCOMMENT - EXTENSION\b"]
    if schema:
        skip.append(rf"\b(SCHEMA|COMMENT) - (SCHEMA )?{re.escape(schema)}\b")
    kept = [line for line in listing.splitlines()
            if not any(re.search(pattern, line) for pattern in skip)]
    path = Path(str(source) + ".list")
    path.write_text("\n".join(kept) + "\n")
    return path


def verify(target: Path, failure: Failure = DROP_FAILURE) -> Path:
    """A dump counts only if it exists, is non-empty and pg_restore can read its table of
    contents; the error says which, and what was (not) done because of it."""
    if not target.is_file():
        problem, hint = "not found", "check the path and the dumps dir"
    elif target.stat().st_size == 0:
        problem, hint = "is empty", "check the server log and disk space"
    else:
        listing = subprocess.run([binary("pg_restore"), "-l", str(target)], capture_output=True,
                                 text=True, timeout=120, check=False)
        if listing.returncode == 0:
            return target
        problem = f"is unreadable: {listing.stderr.strip()}"
        hint = "check that it is a pg_dump -Fc file and the disk is healthy"
    raise DevdError(f"dump {target} {problem}; {failure.consequence}", hint, code=failure.code)


def _run(argv: list[str], env: dict[str, str], what: str, partial: Path | None,
         failure: Failure = DROP_FAILURE) -> None:
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=DUMP_TIMEOUT, check=False)
        error = done.stderr.strip() if done.returncode != 0 else ""
        error = error or ("" if done.returncode == 0 else f"exit {done.returncode}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    if error:
        if partial is not None:
            partial.unlink(missing_ok=True)
        tail = " / ".join(error.splitlines()[-4:])  # psql may print a page; the end says why
        raise DevdError(f"{what} failed: {tail}; {failure.consequence}", failure.hint,
                        code=failure.code)
