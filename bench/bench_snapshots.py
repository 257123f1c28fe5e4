"""Copy-on-write Postgres clones (issue 15): clone and reset time at 0.5 GB and 5 GB against
CREATE DATABASE ... STRATEGY FILE_COPY of the same data, in one run.

    python3 -m venv /tmp/venv-bench && /tmp/venv-bench/bin/pip install .  # plain install
    cd /tmp && DEVD_TEST_POSTGRES_IMAGE=local/postgres:15 /tmp/venv-bench/bin/python \
        ~/devd/bench/bench_snapshots.py --xfs /mnt/xfs [--scales 35,350] [--keep-sources]

Needs root (loop mounts), Docker and an image (DEVD_TEST_POSTGRES_IMAGE, default
postgres:16-alpine). `--xfs DIR`: a reflink XFS to put everything on (made on a 40 GB sparse
loop file in a temp dir if absent). For each pgbench scale it makes (or, with
--keep-sources, reuses) a source server whose data dir is on the XFS, then through the real
daemon and CLI: `devd db snapshot --from URL` while a session holds a transaction open;
`devd provision` of three new worktrees with [postgres] snapshot, each ready to query;
`devd db reset` of one after writes; and, as the baseline on the source server (same
filesystem), CREATE DATABASE ... TEMPLATE bench STRATEGY FILE_COPY after a CHECKPOINT.
Prints a markdown table (load average with each row: the machine may be shared) and
appends it to docs/benchmarks.md (--no-append: only print).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import start_daemon  # noqa: E402

IMAGE = os.environ.get("DEVD_TEST_POSTGRES_IMAGE", "postgres:16-alpine")
LABEL = {"devd.bench": "snapshots"}
PASSWORD = "bench"
CLI = [sys.executable, "-m", "devd"]


def sh(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def make_xfs(work: Path) -> Path:
    image, mount = work / "xfs.img", work / "mnt"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(40 << 30)
    sh(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)])
    sh(["mount", "-o", "loop", str(image), str(mount)])
    return mount


def source(dk: Any, xfs: Path, scale: int, keep: bool) -> str:
    """A server with `pgbench -i -s scale` in database `bench`, its data on the XFS, and
    replication allowed from the host (pg_basebackup over its published port)."""
    name, port = f"snapbench-src{scale}", 15400 + scale % 100
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    try:
        found = dk.containers.get(name)
        if keep and found.labels.get("devd.bench") == "snapshots":
            if found.status != "running":
                found.start()
            wait_query(url)
            return allow_replication(found, url)
        found.remove(force=True)
    except docker.errors.NotFound:
        pass
    data = xfs / f"src{scale}"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    container = dk.containers.run(
        IMAGE, ["postgres", "-c", "listen_addresses=*"], name=name, detach=True, labels=LABEL,
        environment={"POSTGRES_PASSWORD": PASSWORD}, ports={"5432/tcp": ("127.0.0.1", port)},
        volumes={str(data): {"bind": "/var/lib/postgresql/data", "mode": "rw"}})
    wait_query(url)
    query(url, "CREATE DATABASE bench")
    started = time.monotonic()
    sh(["pgbench", "-i", "-q", "-s", str(scale), in_bench(url)])
    print(f"made scale {scale} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return allow_replication(container, url)


def allow_replication(container: Any, url: str) -> str:
    line = "host replication all all scram-sha-256"
    container.exec_run(["sh", "-c", f'grep -q "^{line}" "$PGDATA/pg_hba.conf" || '
                        f'echo "{line}" >> "$PGDATA/pg_hba.conf"'], user="postgres")
    query(url, "SELECT pg_reload_conf()")
    return url


def wait_query(url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            query(url, "SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def query(url: str, text: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(text.encode())
        return cur.fetchall() if cur.description else []


def in_bench(url: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname="bench")


def file_copy(url: str) -> float:
    """The baseline: a byte copy of the same data on the same server and filesystem."""
    query(url, "CHECKPOINT")
    start = time.perf_counter()
    query(url, "CREATE DATABASE bench_copy TEMPLATE bench STRATEGY FILE_COPY")
    seconds = time.perf_counter() - start
    query(url, "DROP DATABASE bench_copy")
    return seconds


def git(cwd: Path, *args: str) -> None:
    sh(["git", "-C", str(cwd), *args], env={**os.environ, "GIT_AUTHOR_NAME": "b",
       "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})


def devd(env: dict[str, str], *args: str, cwd: Path | None = None) -> tuple[float, Any]:
    start = time.perf_counter()
    done = sh([*CLI, *args, "--json"], env=env, cwd=cwd, timeout=3600)
    return time.perf_counter() - start, json.loads(done.stdout)


def bench_scale(env: dict[str, str], work: Path, url: str, scale: int) -> dict[str, Any]:
    name = f"bench{scale}"
    load_before = os.getloadavg()[0]
    size = int(query(in_bench(url),
                     "SELECT pg_database_size('bench')")[0][0])
    repo = work / f"shop{scale}"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "devd.toml").write_text(f'[postgres]\nmode = "container"\nimage = "{IMAGE}"\n'
                                    f'snapshot = "{name}"\n')
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    with psycopg.connect(in_bench(url)) as held:  # a session stays open
        held.execute("SELECT count(*) FROM pgbench_branches")
        snap_s, snap = devd(env, "db", "snapshot", "--from", url, name, cwd=repo)
        held.execute("SELECT 1")
        held.rollback()
    clones, phases, trees = [], [], []
    for index in range(3):
        tree = work / f"shop{scale}-{index}"
        git(repo, "worktree", "add", "-q", "-b", f"b{index}", str(tree))
        seconds, described, phase = provision(env, tree)
        pg = described["postgres"]
        assert pg["strategy"] == "reflink", pg
        rows = query(f"postgresql://postgres:{pg_password(env, tree)}@127.0.0.1:{pg['port']}"
                     "/bench", "SELECT count(*) FROM pgbench_accounts")
        assert rows[0][0] == scale * 100_000, rows
        clones.append(seconds)
        phases.append(phase)
        trees.append((tree, pg))
    tree, pg = trees[0]
    own_url = f"postgresql://postgres:{pg_password(env, tree)}@127.0.0.1:{pg['port']}/bench"
    query(own_url, "UPDATE pgbench_accounts SET abalance = 1 WHERE aid < 100000")
    resets = [devd(env, "db", "reset", str(tree))[0] for tree, _ in trees]
    status = devd(env, "status", str(trees[0][0]))[1]["worktrees"][0]["postgres"]["disk"]
    baseline = [file_copy(url) for _ in range(3)]
    for tree, _ in trees:
        devd(env, "release", str(tree), "--yes", "--no-backup")
    devd(env, "db", "drop-snapshot", name)
    return {"scale": scale, "size": size, "snapshot": snap_s, "snap_bytes": snap["bytes"],
            "clones": clones, "phases": phases, "resets": resets, "file_copy": baseline,
            "disk": status, "load": load_before, "load_after": os.getloadavg()[0]}


# Progress messages that start each step of a clone's provision, in order.
STEPS = (("clone", "cloning snapshot"), ("container", "starting container"),
         ("ready", "waiting for the server"), ("rest", "postgres: ready"))


def provision(env: dict[str, str], tree: Path) -> tuple[float, dict[str, Any], dict[str, float]]:
    """One provision request through the client (the CLI's own start, ~0.2 s, left out),
    with when each step of the Postgres clone began."""
    from devd.client import Client
    from devd.paths import Paths

    marks: dict[str, float] = {}

    def seen(event: dict[str, Any]) -> None:
        text = f"{event.get('phase')}: {event.get('message')}"
        for step, start in STEPS:
            if start in text and step not in marks:
                marks[step] = time.perf_counter()

    client = Client(Paths.resolve(env), autostart=False, timeout=600)
    start = time.perf_counter()
    described = client.call("provision", {"path": str(tree)}, seen)
    end = time.perf_counter()
    steps = [name for name, _ in STEPS] + ["end"]
    marks["end"] = end
    phase = {name: marks[nxt] - marks[name] for name, nxt in zip(steps, steps[1:], strict=False)
             if name in marks and nxt in marks}
    phase["postgres"] = marks.get("rest", end) - marks.get("clone", start)
    return end - start, described, phase


def pg_password(env: dict[str, str], tree: Path) -> str:
    done = sh([*CLI, "env", str(tree), "--format", "json"], env=env)
    return str(json.loads(done.stdout)["PGPASSWORD"])


def report(results: list[dict[str, Any]]) -> str:
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()} "
             f"({os.cpu_count()} cores, {platform.system()} {platform.release()}), image "
             f"{IMAGE}\n",
             "| data (pgbench -s) | load avg (1 min) before / after | snapshot (sessions open) "
             "| provision 1 · 2 · 3 (request, ready to query) | of which Postgres: clone + "
             "container start + ready | reset 1 · 2 · 3 (CLI) | FILE_COPY (median of 3) | "
             "FILE_COPY / provision |",
             "|---|---|---|---|---|---|---|---|"]
    for found in results:
        clone = statistics.median(found["clones"])
        raw = statistics.median(found["file_copy"])
        parts = " · ".join(f"{p['postgres']:.2f} ({p.get('clone', 0):.2f} + "
                           f"{p.get('container', 0):.2f} + {p.get('ready', 0):.2f})"
                           for p in found["phases"])
        lines.append(
            f"| {found['size'] / 1e9:.2f} GB (-s {found['scale']}) | {found['load']:.1f} / "
            f"{found['load_after']:.1f} | {found['snapshot']:.1f} s"
            f" | {' · '.join(f'{s:.2f}' for s in found['clones'])} s | {parts} s"
            f" | {' · '.join(f'{s:.2f}' for s in found['resets'])} s | {raw:.2f} s"
            f" | {raw / clone:.1f} |")
    if len(results) == 2:
        small, big = results

        def ratio(key: str) -> float:
            return statistics.median(big[key]) / statistics.median(small[key])

        lines.append(f"\nfrom {small['size'] / 1e9:.1f} to {big['size'] / 1e9:.1f} GB: provision "
                     f"{ratio('clones'):.2f}x, reset {ratio('resets'):.2f}x, FILE_COPY "
                     f"{ratio('file_copy'):.1f}x")
    for found in results:
        lines.append(f"disk after reset, -s {found['scale']}: {json.dumps(found['disk'])}")
    return "\n".join(lines) + "\n"


def append(text: str) -> None:
    """The run's table at the end of docs/benchmarks.md, under a heading of its own."""
    target = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    with open(target, "a") as out:
        out.write(f"\n## Snapshot clones (issue 15): a `bench/bench_snapshots.py` run\n\n{text}")
    print(f"appended to {target}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--xfs", type=Path, help="a reflink XFS mount to work on")
    parser.add_argument("--scales", default="35,350")
    parser.add_argument("--keep-sources", action="store_true",
                        help="reuse (and keep) this bench's source servers: 5 GB takes minutes")
    parser.add_argument("--no-append", action="store_true",
                        help="print the table only, without appending it to docs/benchmarks.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="devd-bench-snap-"))
    xfs = args.xfs or make_xfs(work)
    dk = docker.from_env(timeout=600)
    scales = [int(s) for s in args.scales.split(",")]
    urls = {scale: source(dk, xfs, scale, args.keep_sources) for scale in scales}
    home = xfs / f"devd-home-{os.getpid()}"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")}
    env.update(DEVD_HOME=str(home), DEVD_NO_AUTOSTART="1")
    trees = work / "trees"
    trees.mkdir()
    daemon = start_daemon(env, home)
    try:
        results = [bench_scale(env, trees, urls[scale], scale) for scale in scales]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        if not args.keep_sources:
            for scale in scales:
                dk.containers.get(f"snapbench-src{scale}").remove(force=True)
        shutil.rmtree(home, ignore_errors=True)
    text = report(results)
    print(text)
    if not args.no_append:
        append(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
