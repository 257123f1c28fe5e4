"""Postgres per worktree: devd's provisioner against the raw operation, same server, one run.

    pip install .   # a plain install into its own venv: the bench imports the installed devd
    python bench/bench_postgres.py [--runs N] [--big-scale S] [--only clones]

Starts a throwaway Postgres container (image from DEVD_TEST_POSTGRES_IMAGE, default
postgres:16-alpine), seeds templates (pgbench -s 3, ~50 MB; a wide one: 1,500 tables, 300
views, 200 sequences, functions and types; pgbench -s 27, ~400 MB), then measures:
schema-mode provision; database-mode clone including the ownership hand-over vs raw
CREATE DATABASE ... STRATEGY FILE_COPY of the same template, alternating which goes first;
container mode cold vs `docker run` + first query, and warm (stopped container) to ready;
release with a backup of the 50 MB database. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import psycopg

from devd import instance
from devd.paths import Paths
from devd.postgres import container as pgcontainer
from devd.postgres import provisioner as postgres
from devd.provisioners.base import Context
from devd.registry import Registry
from devd.settings import PostgresConfig, RepoConfig, Settings

IMAGE = os.environ.get("DEVD_TEST_POSTGRES_IMAGE", "postgres:16-alpine")
LABEL = {"devd.bench": "postgres"}
PASSWORD = "bench-pw"


def quiet(*_: Any, **__: Any) -> None:
    """Progress sink."""


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def wait_query(url: str, deadline: float = 90.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            with psycopg.connect(url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw_docker_run(dk: Any) -> Any:
    """The baseline: docker run of the same image, then the first successful query."""
    port = free_port()
    container = dk.containers.run(IMAGE, detach=True, labels=LABEL,
                                  environment={"POSTGRES_PASSWORD": PASSWORD},
                                  ports={"5432/tcp": ("127.0.0.1", port)},
                                  command=["postgres", "-c", "listen_addresses=*"])
    wait_query(f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres")
    return container


class Bench:
    """A scratch DEVD_HOME with a real registry, and contexts for fake worktrees in it."""

    def __init__(self, home: Path, admin_url: str) -> None:
        self.home, self.paths = home, Paths.under(home)
        instance.bind(self.paths.state_dir)  # markers name the devd instance
        self.registry = Registry(self.paths.registry)
        self.settings = Settings(postgres_url=admin_url, port_range="41000-41999")

    def context(self, mode: str, template: str = "") -> Context:
        wt_id = f"bench-{uuid.uuid4().hex[:8]}"
        path = self.home / "trees" / wt_id
        wt = self.registry.register(wt_id, path, None, self.home / "git", self.home, "bench")
        config = RepoConfig(postgres=PostgresConfig(mode=mode, template=template, image=IMAGE))
        return Context(wt, config, self.settings, self.paths, self.registry)

    def ensure(self, ctx: Context) -> dict[str, Any]:
        detail = postgres.PostgresProvisioner().ensure(ctx, quiet)
        self.registry.set_resource(ctx.worktree.id, "postgres", "ready", detail)
        return detail

    def drop(self, ctx: Context, detail: dict[str, Any], backup: bool = False) -> None:
        ctx.backup = backup
        postgres.PostgresProvisioner().teardown(ctx, detail)


def start_server(dk: Any) -> tuple[Any, str]:
    container = raw_docker_run(dk)
    container.reload()
    port = container.attrs["NetworkSettings"]["Ports"]["5432/tcp"][0]["HostPort"]
    return container, f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"


def seed_template(url: str, scale: int = 3) -> tuple[str, int]:
    name = f"bench_tpl_{scale}"
    query(url, f"CREATE DATABASE {name}")
    pgbench = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
    tpl = psycopg.conninfo.make_conninfo(url, dbname=name)
    subprocess.run([pgbench, "-i", "-q", "-s", str(scale), tpl], check=True, capture_output=True)
    return name, size_of(url, name)


def size_of(url: str, name: str) -> int:
    return int(query(url, f"SELECT pg_database_size('{name}')")[0][0])


def wide_sql(tables: int = 1500, views: int = 300, sequences: int = 200) -> str:
    """A wide schema: what makes a hand-over long is the number of objects, not the bytes."""
    out = [f"CREATE TABLE t{i} (id serial PRIMARY KEY, name text, at timestamptz DEFAULT now())"
           for i in range(tables)]
    out += [f"CREATE VIEW v{i} AS SELECT id, name FROM t{i}" for i in range(views)]
    out += [f"CREATE SEQUENCE s{i}" for i in range(sequences)]
    out += [f"CREATE FUNCTION f{i}(int) RETURNS int LANGUAGE sql AS 'SELECT $1 + {i}'"
            for i in range(50)]
    out += [f"CREATE TYPE e{i} AS ENUM ('a', 'b')" for i in range(20)]
    out += [f"CREATE DOMAIN d{i} AS int CHECK (VALUE > {i})" for i in range(10)]
    out += [f"CREATE TYPE c{i} AS (a int, b text)" for i in range(10)]
    return "; ".join(out)


def seed_wide(url: str) -> tuple[str, int]:
    query(url, "CREATE DATABASE bench_wide")
    query(psycopg.conninfo.make_conninfo(url, dbname="bench_wide"), wide_sql())
    return "bench_wide", size_of(url, "bench_wide")


def query(url: str, text: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(text.encode())
        return cur.fetchall() if cur.description else []


def bench_schema(bench: Bench, runs: int) -> tuple[list[float], list[float]]:
    """devd's schema provision, and the floor under it: one admin connect plus SELECT 1."""
    times, floor = [], []
    for _ in range(runs):
        floor.append(timed(lambda: query(bench.settings.postgres_url, "SELECT 1")))
        ctx = bench.context("schema")
        start = time.perf_counter()
        detail = bench.ensure(ctx)
        times.append(time.perf_counter() - start)
        bench.drop(ctx, detail)
    return times, floor


def bench_clone(bench: Bench, url: str, template: str, runs: int) -> dict[str, list[float]]:
    """devd's clone (role, clone, hand-over, marker), its phases, and the raw clone,
    alternating which goes first."""
    found: dict[str, list[float]] = {"devd": [], "before": [], "clone": [], "handover": [],
                                     "raw": []}
    raw_clone(url, template)  # warm-up: the first clone after seeding also flushes the seed
    for i in range(runs):
        steps = [lambda: found["raw"].append(raw_clone(url, template)),
                 lambda: devd_clone(bench, template, found)]
        for step in steps if i % 2 == 0 else steps[::-1]:
            step()
    return found


def raw_clone(url: str, template: str) -> float:
    name = f"raw_{uuid.uuid4().hex[:8]}"
    query(url, "CHECKPOINT")  # both start clean: a clone's own checkpoint then costs the same
    seconds = timed(lambda: query(
        url, f'CREATE DATABASE "{name}" TEMPLATE {template} STRATEGY FILE_COPY'))
    query(url, f'DROP DATABASE "{name}"')
    return seconds


def devd_clone(bench: Bench, template: str, found: dict[str, list[float]]) -> None:
    """One provision, split at its progress events: before the clone (connect, role,
    registry), the clone, and the hand-over with the marker."""
    ctx = bench.context("database", template)
    query(bench.settings.postgres_url, "CHECKPOINT")
    marks: dict[str, float] = {}

    def progress(phase: str, message: str, **extra: Any) -> None:
        for key in ("creating", "handing"):
            if message.startswith(key):
                marks[key] = time.perf_counter()

    start = time.perf_counter()
    detail = postgres.PostgresProvisioner().ensure(ctx, progress)
    end = time.perf_counter()
    found["devd"].append(end - start)
    found["before"].append(marks["creating"] - start)
    found["clone"].append(marks["handing"] - marks["creating"])  # includes the plan query
    found["handover"].append(end - marks["handing"])
    bench.registry.set_resource(ctx.worktree.id, "postgres", "ready", detail)
    bench.drop(ctx, detail)


def bench_container(bench: Bench, dk: Any, runs: int) -> tuple[list[float], ...]:
    cold, raw, warm = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        baseline = raw_docker_run(dk)
        raw.append(time.perf_counter() - start)
        baseline.remove(force=True, v=True)
        ctx = bench.context("container")
        start = time.perf_counter()
        detail = bench.ensure(ctx)
        cold.append(time.perf_counter() - start)
        dk.containers.get(detail["container"]).stop(timeout=10)
        warm.append(timed(lambda c=ctx: bench.ensure(c)))  # type: ignore[misc]
        bench.drop(ctx, detail)
    return cold, raw, warm


def bench_release(bench: Bench, template: str) -> tuple[float, int]:
    ctx = bench.context("database", template)
    detail = bench.ensure(ctx)
    seconds = timed(lambda: bench.drop(ctx, detail, backup=True))
    dump = Path(ctx.outputs["dumps"][0])
    return seconds, dump.stat().st_size


def med(values: list[float]) -> float:
    return statistics.median(values)


def clone_row(label: str, found: dict[str, list[float]]) -> str:
    ms = {key: med(values) * 1000 for key, values in found.items()}
    return (f"| database mode, clone of the {label} ({len(found['devd'])} runs) "
            f"| {ms['devd']:.0f} ms (before the clone {ms['before']:.0f}, clone "
            f"{ms['clone']:.0f}, hand-over + marker {ms['handover']:.0f}) "
            f"| {ms['raw']:.0f} ms raw CREATE DATABASE … STRATEGY FILE_COPY "
            f"| {ms['devd'] / ms['raw']:.2f} | ≤ 1.15 |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--big-scale", type=int, default=27, help="pgbench scale, ~15 MB each")
    parser.add_argument("--only", choices=["all", "clones"], default="all")
    args = parser.parse_args()
    dk = docker.from_env()
    server, url = start_server(dk)
    home = Path(tempfile.mkdtemp(prefix="devd-bench-pg-"))
    rows = []
    try:
        bench = Bench(home, url)
        template, size = seed_template(url)
        wide, _ = seed_wide(url)
        big, big_size = seed_template(url, args.big_scale)
        for name, label in ((template, f"{size / 1e6:.0f} MB template"),
                            (wide, "wide template (1,500 tables, 300 views, 200 sequences, "
                             "50 functions, 40 types)"),
                            (big, f"{big_size / 1e6:.0f} MB template")):
            rows.append(clone_row(label, bench_clone(bench, url, name, args.runs)))
        if args.only == "all":
            rows += other_rows(bench, dk, template, size, args.runs)
    finally:
        cleanup(dk, server, home)
    print(f"Image {IMAGE}; medians.\n")
    print("| measurement | devd | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    _ = pgcontainer  # imported so a broken container module fails the bench early
    return 0


def other_rows(bench: Bench, dk: Any, template: str, size: int, runs: int) -> list[str]:
    schema, floor = bench_schema(bench, runs * 4)
    cold, raw_run, warm = bench_container(bench, dk, max(3, runs // 2 + 1))
    release_s, dump_size = bench_release(bench, template)
    ms = 1000.0
    return [
        f"| schema mode provision ({len(schema)} runs) | {med(schema) * ms:.1f} ms "
        f"| {med(floor) * ms:.1f} ms admin connect + SELECT 1 | {med(schema) / med(floor):.2f} "
        "| ≤ 50 ms |",
        f"| container mode, cold ({len(cold)} runs) | {med(cold):.2f} s | {med(raw_run):.2f} s "
        f"docker run + first query | {med(cold) / med(raw_run):.2f} | ≤ 1.2 |",
        f"| container mode, warm (stopped → ready) | {med(warm):.2f} s | – | – | ≤ 1 s |",
        f"| release with backup of the {size / 1e6:.0f} MB database | {release_s:.2f} s "
        f"| dump {dump_size / 1e6:.1f} MB | – | report |"]


def cleanup(dk: Any, server: Any, home: Path) -> None:
    server.remove(force=True, v=True)
    for container in dk.containers.list(all=True, filters={"label": "devd.owner"}):
        if container.labels["devd.owner"].startswith("bench-"):
            container.remove(force=True, v=True)
    for volume in dk.volumes.list(filters={"label": "devd.owner"}):
        if (volume.attrs.get("Labels") or {})["devd.owner"].startswith("bench-"):
            volume.remove(force=True)
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
