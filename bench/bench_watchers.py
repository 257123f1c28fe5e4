"""Watcher budget benchmarks (issue 5), printed as markdown tables.

1. Full pass with 1k, 50k and 150k inotify watches held by helper processes: devd's scan
   (walk /proc, classify every fd, count and sample fdinfo, cwd/exe/limits of holders)
   against a bare loop that only reads the same fdinfo files, in the same run.
2. Daemon idle with 50 registered worktrees: CPU over 60 s and RSS.

Run: python bench/bench_watchers.py [--sizes 1000,50000,150000] [--idle 60]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devd.watchers.linux import INOTIFY_LINK, LinuxSampler, read_bytes  # noqa: E402

PER_HELPER = 50_000
HOLD = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
from devd.watchers.linux import Inotify
ino = Inotify(); base = sys.argv[1]
for name in sorted(os.listdir(base))[: int(sys.argv[2])]:
    ino.add_watch(os.path.join(base, name), 0x2)
print("ok", flush=True); time.sleep(3600)
"""


def hold(n: int, work: Path) -> list[subprocess.Popen[str]]:
    """Helper processes holding `n` watches in total (one file per watch)."""
    helpers = []
    for h in range(math.ceil(n / PER_HELPER)):
        count = min(PER_HELPER, n - h * PER_HELPER)
        folder = work / f"h{h}"
        folder.mkdir(exist_ok=True)
        for i in range(len(os.listdir(folder)), count):
            (folder / str(i)).touch()
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(count),
                                 str(ROOT)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout and proc.stdout.readline().strip() == "ok"
        helpers.append(proc)
    return helpers


def inotify_fdinfos() -> list[str]:
    """Every inotify fdinfo path of this user, found once (the bare loop's input)."""
    paths = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == INOTIFY_LINK:
                    paths.append(f"/proc/{pid}/fdinfo/{fd}")
        except OSError:
            continue
    return paths


def bare_read(paths: list[str]) -> None:
    """The floor: read each fdinfo whole, nothing else (a fd others close is skipped)."""
    for path in paths:
        try:
            read_bytes(path)
        except OSError:
            continue


def timed(fn, repeat: int = 7) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bench_scan(sizes: list[int]) -> list[str]:
    rows = ["| watches held | bare fdinfo read | devd full pass (warm) | devd full pass (cold) "
            "| ratio warm | ratio cold | devd counted |", "|---|---|---|---|---|---|---|"]
    work = Path(tempfile.mkdtemp(prefix="devd-bench-"))
    try:
        for n in sizes:
            helpers = hold(n, work)
            try:
                paths = inotify_fdinfos()
                bare = timed(lambda paths=paths: bare_read(paths))
                warm_sampler = LinuxSampler()
                warm_sampler.sample(full=True)
                warm = timed(lambda s=warm_sampler: s.sample(full=True))
                cold = timed(lambda: LinuxSampler().sample(full=True))
                sample = warm_sampler.sample(full=True)
                counted = sum(c.watches or 0 for c in sample.consumers
                              if c.pid in {h.pid for h in helpers})
                rows.append(f"| {n:,} | {bare * 1e3:.1f} ms | {warm * 1e3:.1f} ms | "
                            f"{cold * 1e3:.1f} ms | {warm / bare:.2f} | {cold / bare:.2f} | "
                            f"{counted:,} |")
            finally:
                for h in helpers:
                    h.kill()
                    h.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_idle(seconds: float, worktrees: int = 50) -> list[str]:
    home = Path(tempfile.mkdtemp(prefix="devd-bench-home-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")}
    env.update({"DEVD_HOME": str(home / "h"), "DEVD_NO_AUTOSTART": "1",
                "DEVD_WATCHERS_NOTIFY": "0", "PYTHONPATH": str(ROOT)})
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@example.com"]
    main = home / "repo"
    main.mkdir()
    subprocess.run([*git, "init", "-q", "-b", "main", str(main)], check=True)
    (main / "README.md").write_text("x\n")
    subprocess.run([*git, "-C", str(main), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(main), "commit", "-qm", "init"], check=True)
    daemon = subprocess.Popen([sys.executable, "-m", "devd", "daemon"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        devd = [sys.executable, "-m", "devd"]
        while subprocess.run([*devd, "status"], env=env, capture_output=True).returncode:
            time.sleep(0.1)
        for n in range(worktrees):
            tree = home / f"wt{n}"
            subprocess.run([*git, "-C", str(main), "worktree", "add", "-q", "-b", f"b{n}",
                            str(tree)], check=True)
            subprocess.run([*devd, "provision", str(tree)], env=env, check=True,
                           capture_output=True)
        proc = psutil.Process(daemon.pid)
        time.sleep(5)  # let provisioning's threads finish
        before, start = proc.cpu_times(), time.monotonic()
        time.sleep(seconds)
        after, wall = proc.cpu_times(), time.monotonic() - start
        cpu = (after.user + after.system - before.user - before.system) / wall
        rss = proc.memory_info().rss / 2**20
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
    return ["| worktrees | window | daemon CPU (share of one core) | daemon RSS |",
            "|---|---|---|---|",
            f"| {worktrees} | {wall:.0f} s | {cpu:.2%} | {rss:.1f} MB |"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,50000,150000")
    parser.add_argument("--idle", type=float, default=60.0)
    args = parser.parse_args()
    limit = read_bytes("/proc/sys/fs/inotify/max_user_watches").decode().strip()
    print(f"max_user_watches on this machine: {limit}\n")
    print("\n".join(bench_scan([int(s) for s in args.sizes.split(",")])))
    print()
    print("\n".join(bench_idle(args.idle)))


if __name__ == "__main__":
    main()
