"""Core benchmarks (issue 2): status with 100 worktrees, one provision, 20 concurrent provisions.

Every figure is compared with a baseline measured in the same run (these machines are shared
and noisy), and printed as a markdown table for docs/benchmarks.md.

    python bench/bench_core.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the installed console script does: import the CLI and call main().
CLI = [sys.executable, "-c", "import sys; from devd.cli import main; sys.exit(main())"]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})


def new_repo(repo: Path, toml: str, gitignore: str | None = None) -> Path:
    """A git repo at `repo` whose first commit holds `devd.toml` (and a `.gitignore`)."""
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "devd.toml").write_text(toml)
    if gitignore is not None:
        (repo / ".gitignore").write_text(gitignore)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    return repo


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def start_daemon(env: dict[str, str], home: Path, python: Path | str = sys.executable,
                 cwd: str | None = None) -> subprocess.Popen[bytes]:
    """`python -m devd daemon`, once its socket takes connections (`cwd="/"`: no devd
    source tree in the current directory shadows the installed one)."""
    log = open(home / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen([str(python), "-m", "devd", "daemon"], env=env, stderr=log,
                            cwd=cwd)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sock = home / "run" / "devd.sock"
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("daemon did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    runs = parser.parse_args().runs
    # An installed package has bytecode; a source tree under PYTHONDONTWRITEBYTECODE would
    # compile every module on every call and measure the compiler, not devd.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "devd")], check=True)
    work = Path(tempfile.mkdtemp(prefix="devd-bench-"))
    home = work / "h"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")}
    env.update(DEVD_HOME=str(home), DEVD_NO_AUTOSTART="1", PYTHONPATH=str(ROOT))
    repo = new_repo(work / "shop", '[ports]\nnames = ["web", "api"]\n')
    daemon = start_daemon(env, home)
    try:
        rows = run_benchmarks(work, repo, env, runs)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
    print_report(rows, runs)


def new_worktrees(repo: Path, prefix: str, count: int) -> list[Path]:
    trees = []
    for i in range(count):
        path = repo.parent / f"{prefix}-{i:03d}"
        git(repo, "worktree", "add", "-q", "-b", f"{prefix}/{i}", str(path))
        trees.append(path)
    return trees


def run_benchmarks(work: Path, repo: Path, env: dict[str, str], runs: int) -> list[tuple]:
    baseline = [timed([sys.executable, "-c", "pass"], env) for _ in range(runs)]
    # 1. one provision of a new worktree, CLI start included
    singles = []
    for tree in new_worktrees(repo, "single", runs):
        singles.append(timed([*CLI, "provision", str(tree)], env))
    # 2. twenty concurrent provisions of different new worktrees, and as a floor twenty
    #    concurrent bare interpreter starts (on 2 cores the starts alone take most of it)
    batch = new_worktrees(repo, "batch", 20)
    floor, _ = concurrently([[sys.executable, "-c", "pass"]] * 20, env)
    concurrent, procs = concurrently([[*CLI, "provision", str(t), "--json"] for t in batch], env)
    failed = sum(p.returncode != 0 for p, _ in procs)
    ports = [port for _, out in procs if out for port in json.loads(out)["ports"].values()]
    # 3. status with 100 registered worktrees (fill up to 100)
    registered = runs + 20
    for tree in new_worktrees(repo, "fill", max(0, 100 - registered)):
        timed([*CLI, "provision", str(tree)], env)
    status, base2 = [], []
    for _ in range(runs):  # interleaved, so load spikes hit both sides alike
        base2.append(timed([sys.executable, "-c", "pass"], env))
        status.append(timed([*CLI, "status", "--json"], env))
    med = statistics.median
    return [
        ("`python3 -c pass` (baseline)", med(baseline + base2), "", ""),
        ("`devd status --json`, 100 worktrees", med(status),
         f"{med(status) / med(base2):.2f} × baseline", "≤ 2.5 × baseline"),
        ("`devd provision` of a new worktree", med(singles), "", "≤ 150 ms"),
        ("20 concurrent `python3 -c pass` (floor)", floor, "", ""),
        ("20 concurrent `devd provision` (wall)", concurrent,
         f"{concurrent / med(singles):.2f} × one provision, {concurrent / floor:.2f} × floor; "
         f"{failed} failed; {len(ports)} ports, {len(ports) - len(set(ports))} duplicates",
         "≤ 4 × one provision, 0 duplicates"),
    ]


def concurrently(commands: list[list[str]], env: dict[str, str]
                 ) -> tuple[float, list[tuple[subprocess.Popen[bytes], bytes]]]:
    start = time.perf_counter()
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in commands]
    results = [(p, p.communicate()[0]) for p in procs]
    return time.perf_counter() - start, results


def print_report(rows: list[tuple], runs: int) -> None:
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
          f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; "
          f"median of {runs} runs\n")
    print("| measurement | median | ratio | target |\n|---|---|---|---|")
    for name, seconds, ratio, target in rows:
        print(f"| {name} | {seconds * 1000:.1f} ms | {ratio} | {target} |")


if __name__ == "__main__":
    main()
