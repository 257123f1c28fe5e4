"""`devd status` speed (issue 13): the installed CLI and the daemon's own answer, 100 worktrees.

Every figure is a median over many runs, compared with `python3 -c pass` measured in the same
run, interleaved with it (the machine is shared: a load spike hits both sides alike). devd is
a plain (non-editable) `pip install` into a fresh venv, and `devd` is that venv's console
script, so the entry point's own cost counts. The 100 worktrees are real git worktrees,
provisioned over the socket (ports, cache dirs and .env: no Postgres, no deps).

    python bench/bench_status.py [--runs 40] [--venv DIR]   # --venv: reuse an install
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import git, new_repo, start_daemon, timed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKTREES = 100


def install(venv: Path) -> None:
    """A fresh venv with devd installed as a user would: `pip install .`, not editable."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True,
                   cwd=tempfile.gettempdir())


def ask(sock_path: Path, method: str, params: dict[str, object] | None = None) -> object:
    """One raw request as the CLI sends it; the result."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sock_path))
        request = {"v": 1, "method": method, "params": params or {}, "heartbeat": True}
        sock.sendall(json.dumps(request).encode() + b"\n")
        reader = sock.makefile("rb")
        for line in reader:
            message = json.loads(line)
            if "event" not in message:
                if not message.get("ok"):
                    raise SystemExit(f"{method} failed: {message}")
                return message["result"]
    raise SystemExit(f"{method}: the daemon closed without a reply")


def raw_status(sock_path: Path) -> float:
    """Connect, send `status` as the CLI does, until the reply's last byte: the daemon's
    answer (decoding 70 KB of JSON is the client's cost, not the daemon's)."""
    request = json.dumps({"v": 1, "method": "status", "params": {}, "heartbeat": True})
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sock_path))
        sock.sendall(request.encode() + b"\n")
        received = b""
        while not (received.endswith(b"\n") and b'{"ok":' in received):
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise SystemExit("status: the daemon closed without a reply")
            received += chunk
    elapsed = time.perf_counter() - start
    if b'{"ok":true' not in received:
        raise SystemExit(f"status failed: {received[-300:]!r}")
    return elapsed


def register(repo: Path, sock: Path, count: int) -> None:
    for i in range(count):
        path = repo.parent / f"wt-{i:03d}"
        git(repo, "worktree", "add", "-q", "-b", f"wt/{i}", str(path))
        ask(sock, "provision", {"path": str(path)})


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--venv", type=Path, help="an existing venv with devd installed")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="devd-bench-status-"))
    venv = args.venv or work / "venv"
    if args.venv is None:
        install(venv)
    python, devd = venv / "bin" / "python", venv / "bin" / "devd"
    home = work / "h"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEVD_", "PYTHON"))}
    env.update(DEVD_HOME=str(home), DEVD_NO_AUTOSTART="1")
    repo = new_repo(work / "shop", '[ports]\nnames = ["web", "api"]\n', ".env\n")
    daemon = start_daemon(env, home, python, cwd="/")
    try:
        register(repo, home / "run" / "devd.sock", WORKTREES)
        report(measure(python, devd, env, home / "run" / "devd.sock", args.runs), args.runs)
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)


def measure(python: Path, devd: Path, env: dict[str, str], sock: Path, runs: int
            ) -> dict[str, list[float]]:
    commands = {"baseline": [str(python), "-c", "pass"],
                "status --json": [str(devd), "status", "--json"],
                "status": [str(devd), "status"],
                "--version": [str(devd), "--version"],
                "--help": [str(devd), "--help"]}
    times: dict[str, list[float]] = {name: [] for name in [*commands, "raw"]}
    before = load()
    for argv in commands.values():  # warm the page cache and the daemon's snapshot
        timed(argv, env)
    for _ in range(runs):  # interleaved: each round runs every command once
        for name, argv in commands.items():
            times[name].append(timed(argv, env))
        times["raw"] += [raw_status(sock) for _ in range(5)]
    times["load"] = [float(x) for x in (before + " " + load()).replace("/", " ").split()]
    return times


def report(times: dict[str, list[float]], runs: int) -> None:
    med = {name: statistics.median(values) for name, values in times.items() if name != "load"}
    base = med["baseline"]
    print(f"{time.strftime('%a %b %d %H:%M UTC %Y', time.gmtime())} · {os.cpu_count()} cores "
          f"({cpu_model()}), {platform.platform()}, Python {platform.python_version()} · "
          f"load average (1/5 min) {times['load'][0]:.1f}/{times['load'][1]:.1f} before, "
          f"{times['load'][2]:.1f}/{times['load'][3]:.1f} after · medians of {runs} "
          f"interleaved runs ({len(times['raw'])} raw requests)\n")
    print("| measurement | median | ratio to `python3 -c pass` | target |\n|---|---|---|---|")
    rows = [("`python3 -c pass` (baseline)", "baseline", "", ""),
            (f"`devd status --json`, {WORKTREES} worktrees", "status --json", "ratio",
             "≤ 2.5 ×"),
            (f"`devd status` (rows), {WORKTREES} worktrees", "status", "ratio", ""),
            ("`devd --version`", "--version", "ratio", "≤ 1.5 ×"),
            ("`devd --help`", "--help", "ratio", ""),
            (f"raw socket `status` request, {WORKTREES} worktrees", "raw", "", "≤ 5 ms")]
    for label, key, ratio, target in rows:
        shown = f"{med[key] / base:.2f} ×" if ratio else ""
        print(f"| {label} | {med[key] * 1000:.1f} ms | {shown} | {target} |")


if __name__ == "__main__":
    main()
