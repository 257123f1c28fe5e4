"""Postgres per worktree: devd's provisioner against the raw operation, same server, one run.

    python bench/bench_postgres.py [--runs N]

Starts a throwaway Postgres container (image from DEVD_TEST_POSTGRES_IMAGE, default
postgres:16-alpine), seeds a ~50 MB template with `pgbench -i -s 3`, then measures:
schema-mode provision; database-mode clone vs raw CREATE DATABASE ... STRATEGY FILE_COPY;
container mode cold vs `docker run` + first query, and warm (stopped container) to ready;
release with a backup of the 50 MB database. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devd.paths import Paths  # noqa: E402
from devd.postgres import container as pgcontainer  # noqa: E402
from devd.postgres import provisioner as postgres  # noqa: E402
from devd.provisioners.base import Context  # noqa: E402
from devd.registry import Registry  # noqa: E402
from devd.settings import PostgresConfig, RepoConfig, Settings  # noqa: E402

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


def seed_template(url: str) -> tuple[str, int]:
    query(url, "CREATE DATABASE bench_tpl")
    pgbench = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
    tpl = psycopg.conninfo.make_conninfo(url, dbname="bench_tpl")
    subprocess.run([pgbench, "-i", "-q", "-s", "3", tpl], check=True, capture_output=True)
    size = query(url, "SELECT pg_database_size('bench_tpl')")[0][0]
    return "bench_tpl", int(size)


def query(url: str, text: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(text)
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


def bench_clone(bench: Bench, url: str, template: str, runs: int) -> tuple[list[float], ...]:
    ours, raw = [], []
    for i in range(runs):
        name = f"raw_{i}_{uuid.uuid4().hex[:6]}"
        raw.append(timed(lambda n=name: query(  # type: ignore[misc]
            url, f'CREATE DATABASE "{n}" TEMPLATE {template} STRATEGY FILE_COPY')))
        query(url, f'DROP DATABASE "{name}"')
        ctx = bench.context("database", template)
        start = time.perf_counter()
        detail = bench.ensure(ctx)
        ours.append(time.perf_counter() - start)
        bench.drop(ctx, detail)
    return ours, raw


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    dk = docker.from_env()
    server, url = start_server(dk)
    home = Path(tempfile.mkdtemp(prefix="devd-bench-pg-"))
    try:
        bench = Bench(home, url)
        template, size = seed_template(url)
        schema, floor = bench_schema(bench, args.runs * 4)
        ours, raw = bench_clone(bench, url, template, args.runs)
        cold, raw_run, warm = bench_container(bench, dk, max(3, args.runs // 2 + 1))
        release_s, dump_size = bench_release(bench, template)
    finally:
        server.remove(force=True, v=True)
        for container in dk.containers.list(all=True, filters={"label": "devd.owner"}):
            if container.labels["devd.owner"].startswith("bench-"):
                container.remove(force=True, v=True)
        for volume in dk.volumes.list(filters={"label": "devd.owner"}):
            if (volume.attrs.get("Labels") or {})["devd.owner"].startswith("bench-"):
                volume.remove(force=True)
        shutil.rmtree(home, ignore_errors=True)
    ms = 1000.0
    print(f"Image {IMAGE}; template {size / 1e6:.0f} MB (pgbench -s 3); medians.\n")
    print("| measurement | devd | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| schema mode provision ({len(schema)} runs) | {med(schema) * ms:.1f} ms "
          f"| {med(floor) * ms:.1f} ms admin connect + SELECT 1 | {med(schema) / med(floor):.2f} "
          "| ≤ 50 ms |")
    print(f"| database mode, clone of the template ({len(ours)} runs) | {med(ours) * ms:.0f} ms "
          f"| {med(raw) * ms:.0f} ms raw CREATE DATABASE … STRATEGY FILE_COPY "
          f"| {med(ours) / med(raw):.2f} | ≤ 1.3 |")
    print(f"| container mode, cold ({len(cold)} runs) | {med(cold):.2f} s | {med(raw_run):.2f} s "
          f"docker run + first query | {med(cold) / med(raw_run):.2f} | ≤ 1.2 |")
    print(f"| container mode, warm (stopped → ready) | {med(warm):.2f} s | – | – | ≤ 1 s |")
    print(f"| release with backup of the {size / 1e6:.0f} MB database | {release_s:.2f} s "
          f"| dump {dump_size / 1e6:.1f} MB | – | report |")
    _ = pgcontainer  # imported so a broken container module fails the bench early
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
