"""Dumps before drops: pg_dump -Fc into the state dir, verified, kept for 7 days."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devd.errors import DevdError
from devd.paths import Paths, ensure_private_dir

KEEP_SECONDS = 7 * 86400
DUMP_TIMEOUT = 1800
SUFFIX = ".dump"


def dumps_dir(paths: Paths) -> Path:
    target = paths.state_dir / "dumps"
    ensure_private_dir(target)
    return target


def new_dump_path(paths: Paths, wt_id: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return dumps_dir(paths) / f"{wt_id}-{stamp}{SUFFIX}"


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
    """A conninfo for argv without the password, which goes in PGPASSWORD (argv is public)."""
    params = {k: v for k, v in conninfo_to_dict(url).items() if v is not None}
    password = params.pop("password", None)
    params["dbname"] = dbname
    env = {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}
    return make_conninfo("", **params), env


def dump_local(url: str, dbname: str, target: Path, schema: str | None = None) -> Path:
    """pg_dump -Fc of a database (or one schema of it) on the host, then verified."""
    conninfo, env = libpq_args(url, dbname)
    argv = [binary("pg_dump"), "-Fc", "--no-password", "-f", str(target)]
    argv += ["-n", schema] if schema else []
    _run(argv + ["--dbname", conninfo], env, f"pg_dump of {dbname}", target)
    return verify(target)


def restore_local(url: str, dbname: str, source: Path, skip_schema: str | None = None) -> None:
    """pg_restore into an existing database as the worktree's own role (so it owns the objects).

    In schema mode the role cannot create its own schema (it exists already), so that entry
    is left out of the restore list.
    """
    conninfo, env = libpq_args(url, dbname)
    argv = [binary("pg_restore"), "--no-owner", "--no-acl", "--clean", "--if-exists",
            "--exit-on-error", "--no-password"]
    if skip_schema:
        argv += ["-L", str(_list_without_schema(source, skip_schema))]
    _run(argv + ["--dbname", conninfo, str(source)], env, f"pg_restore into {dbname}", None)


def _list_without_schema(source: Path, schema: str) -> Path:
    listing = subprocess.run([binary("pg_restore"), "-l", str(source)], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    kept = [line for line in listing.splitlines()
            if not re.search(rf"\b(SCHEMA|COMMENT) - (SCHEMA )?{re.escape(schema)}\b", line)]
    path = source.with_suffix(".list")
    path.write_text("\n".join(kept) + "\n")
    return path


def verify(target: Path) -> Path:
    """A dump counts only if it is non-empty and pg_restore can read its table of contents."""
    if not target.is_file() or target.stat().st_size == 0:
        raise DevdError(f"dump {target} is empty; nothing was dropped",
                        "check the server log and disk space", code="backup_failed")
    listing = subprocess.run([binary("pg_restore"), "-l", str(target)], capture_output=True,
                             text=True, timeout=120, check=False)
    if listing.returncode != 0:
        raise DevdError(f"dump {target} is unreadable: {listing.stderr.strip()}; nothing dropped",
                        "check disk space, then release again", code="backup_failed")
    return target


def _run(argv: list[str], env: dict[str, str], what: str, partial: Path | None) -> None:
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=DUMP_TIMEOUT, check=False)
        error = done.stderr.strip() if done.returncode != 0 else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    if error or done.returncode != 0:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise DevdError(f"{what} failed: {error or 'exit ' + str(done.returncode)}; "
                        "nothing was dropped",
                        "fix the cause and release again, or pass --no-backup to skip the dump",
                        code="backup_failed")
