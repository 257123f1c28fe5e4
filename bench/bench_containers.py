"""A Redis container per worktree: devd's provisioner against `docker run` + first PING.

    pip install .   # a plain install into its own venv: the bench imports the installed devd
    python bench/bench_containers.py [--runs N]

Image from DEVD_TEST_REDIS_IMAGE (default local/redis:7, built by .ci/docker-redis.sh).
Each run measures, in alternating order, (a) the baseline: `docker run -d` of the image with
a port on 127.0.0.1, then PING over that port until +PONG; (b) devd: ContainersProvisioner
.ensure for a fresh worktree ([containers.redis] preset = "redis"): port lease, labelled
volume, container, PING over the leased port. Prints a markdown row.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from devd import instance
from devd.containers import engine
from devd.containers.declared import ContainersProvisioner
from devd.paths import Paths
from devd.provisioners.base import Context
from devd.registry import Registry
from devd.settings import ContainerConfig, RepoConfig, Settings

IMAGE = os.environ.get("DEVD_TEST_REDIS_IMAGE", "local/redis:7")
LABEL = {"devd.bench": "containers"}


def quiet(*_: Any, **__: Any) -> None:
    """Progress sink."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw(dk: Any) -> tuple[float, Any]:
    """docker run, then the first PING answered over the published port."""
    start = time.perf_counter()
    port = free_port()
    container = dk.containers.run(IMAGE, detach=True, labels=LABEL,
                                  ports={"6379/tcp": ("127.0.0.1", port)})
    while not engine.ping(port):
        time.sleep(0.02)
    return time.perf_counter() - start, container


class Bench:
    def __init__(self, home: Path) -> None:
        self.home, self.paths = home, Paths.under(home)
        instance.bind(self.paths.state_dir)
        self.registry = Registry(self.paths.registry)
        self.settings = Settings(port_range="42000-42999")
        self.config = RepoConfig(containers={"redis": ContainerConfig(preset="redis",
                                                                      image=IMAGE)})

    def devd(self) -> tuple[float, Context, dict[str, Any]]:
        wt_id = f"bench-{uuid.uuid4().hex[:8]}"
        wt = self.registry.register(wt_id, self.home / "trees" / wt_id, None,
                                    self.home / "git", self.home, "bench")
        ctx = Context(wt, self.config, self.settings, self.paths, self.registry)
        start = time.perf_counter()
        detail = ContainersProvisioner().ensure(ctx, quiet)
        return time.perf_counter() - start, ctx, detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    dk = docker.from_env()
    dk.images.get(IMAGE)
    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        for run in range(args.runs + 1):  # the first pair warms caches and is not counted
            order = ("raw", "devd") if run % 2 else ("devd", "raw")
            for which in order:
                if which == "raw":
                    seconds, container = raw(dk)
                    container.remove(force=True, v=True)
                    (base if run else []).append(seconds)
                else:
                    seconds, ctx, detail = bench.devd()
                    ctx.backup = False
                    ContainersProvisioner().teardown(ctx, detail)
                    (ours if run else []).append(seconds)
    devd_ms, raw_ms = statistics.median(ours) * 1000, statistics.median(base) * 1000
    print("| measurement | devd | baseline (same run) | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| Redis container per worktree, provision to first PING ({args.runs} runs) "
          f"| {devd_ms:.0f} ms | {raw_ms:.0f} ms `docker run` + first PING "
          f"| {devd_ms / raw_ms:.2f} | ≤ 1.2 |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
