"""Schema-mode `devd restore` against the path it replaced, same server, same dump, one run.

    pip install .   # a plain install into its own venv: the bench imports the installed devd
    python bench/bench_restore.py [--runs N] [--tables N] [--rows N]

Starts a throwaway Postgres container (image from DEVD_TEST_POSTGRES_IMAGE), provisions one
schema-mode worktree and dumps two states of its schema: a wide one (--tables tables, a fifth
as many views and sequences, 50 functions, 40 types: the clear is per object now) and a long
one (one table of --rows rows). Each is restored alternately by devd (over the role's login:
the role drops its schema's objects one by one, devd keeps the schema) and by the previous
path (admin login: DROP SCHEMA ... CASCADE, CREATE SCHEMA, marker, SET ROLE), both with the
"before" dump and the same pg_restore script. Prints a markdown table. One transaction drops
and loads every object (~12 locks a table each way, either path), so the default
max_locks_per_transaction (64 x 100 connections) holds ~250 tables.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import psycopg
from bench_postgres import Bench, cleanup, start_server, wide_sql
from psycopg import sql

from devd.postgres import dump, server
from devd.postgres.restore import BEFORE, CLEAR_SCHEMA, LOCK_TIMEOUT, restore_sql
from devd.provisioners.base import Context


def previous_restore(ctx: Context, detail: dict[str, Any], source: Path) -> None:
    """What schema mode did before: the same steps, loaded as the admin under SET ROLE."""
    url, name, dbname = detail["admin_url"], detail["name"], detail["database"]
    dump.dump_local(url, dbname, dump.new_dump_path(ctx.paths, ctx.worktree.id, BEFORE),
                    schema=name, failure=dump.RESTORE_FAILURE)
    ident = sql.Identifier(name).as_string(None)
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as scratch:
        script = dump.restore_script(source, Path(scratch) / "restore.sql", skip_schema=name)
        prologue = Path(scratch) / "prologue.sql"
        prologue.write_text(f"{LOCK_TIMEOUT}\nDROP SCHEMA {ident} CASCADE; CREATE SCHEMA "
                            f"{ident} AUTHORIZATION {ident}; "
                            + server.mark("schema", name, ctx.worktree.id).as_string(None)
                            + f";\nSET ROLE {ident};\n")
        dump.run_psql(url, dbname, [prologue, script])


def as_role(detail: dict[str, Any], text: str) -> None:
    url = psycopg.conninfo.make_conninfo(detail["admin_url"], user=detail["name"],
                                         password=detail["password"])
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(text.encode())


def state(ctx: Context, detail: dict[str, Any], statements: str) -> Path:
    """The worktree's schema holding just `statements`, dumped as devd dumps it."""
    as_role(detail, CLEAR_SCHEMA + statements)
    target = dump.new_dump_path(ctx.paths, ctx.worktree.id)
    return dump.dump_local(detail["admin_url"], detail["database"], target,
                           schema=detail["name"])


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def compare(ctx: Context, detail: dict[str, Any], source: Path, runs: int
            ) -> tuple[list[float], list[float]]:
    """devd's restore and the previous one of `source`, alternating which goes first."""
    ours: list[float] = []
    previous: list[float] = []
    for i in range(runs):
        steps = [lambda: ours.append(timed(lambda: restore_sql(ctx, detail, source))),
                 lambda: previous.append(timed(lambda: previous_restore(ctx, detail, source)))]
        for step in steps if i % 2 == 0 else steps[::-1]:
            step()
    return ours, previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tables", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    dk = docker.from_env()
    container, url = start_server(dk)
    home = Path(tempfile.mkdtemp(prefix="devd-bench-restore-"))
    rows = []
    try:
        bench = Bench(home, url)
        ctx = bench.context("schema")
        detail = bench.ensure(ctx)
        for label, statements in (
                (f"wide: {args.tables} tables, {args.tables // 5} views and sequences, 50 "
                 "functions, 40 types", wide_sql(args.tables, args.tables // 5, args.tables // 5)),
                (f"long: one table of {args.rows:,} rows",
                 "CREATE TABLE big (id int PRIMARY KEY, v text); INSERT INTO big SELECT g, "
                 f"md5(g::text) FROM generate_series(1, {args.rows}) g")):
            source = state(ctx, detail, statements)
            ours, previous = compare(ctx, detail, source, args.runs)
            mine, old = statistics.median(ours), statistics.median(previous)
            rows.append(f"| {label}; dump {source.stat().st_size / 1e6:.1f} MB ({args.runs} "
                        f"runs each) | {mine:.2f} s | {old:.2f} s admin + SET ROLE, DROP "
                        f"SCHEMA … CASCADE | {mine / old:.2f} |")
    finally:
        cleanup(dk, container, home)
    print("| schema-mode restore | devd (role's login) | previous path, same run | ratio |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
