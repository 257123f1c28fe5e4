"""Dependency benchmarks (issue 4): a second worktree's node_modules via devd vs plain `npm ci`.

Two real projects (a few small packages; a Vite + React app's tree), on the plain
filesystem of this machine and, when root can make one, on a reflink-capable XFS loop mount.
Per run, one new worktree gets `npm ci` by hand (the baseline) and another gets
`devd provision`, alternately, so both see the same machine load. The ratio compares devd's
recorded install time for the tree with the baseline's wall time; the end-to-end time of
`devd provision` (CLI, ports, dirs, .env too) is shown beside it.

    python bench/bench_deps.py [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = {
    "small (2 packages + 1 dep)": {"is-number": "7.0.0", "is-odd": "3.0.1"},
    "vite + react app": {"vite": "^7.0.0", "@vitejs/plugin-react": "^5.0.0", "react": "^19.0.0",
                         "react-dom": "^19.0.0"},
}
NPM_CI = ["npm", "ci", "--prefer-offline", "--no-audit", "--no-fund"]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})


def timed(argv: list[str], cwd: Path | None, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.perf_counter() - start


@contextlib.contextmanager
def daemon(env: dict[str, str], home: Path) -> Iterator[None]:
    with open(home / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "devd", "daemon"], env=env, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(home / "run" / "devd.sock"))
                break
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextlib.contextmanager
def xfs(base: Path) -> Iterator[Path | None]:
    """A reflink XFS loop mount, or None (with the reason printed) where none can be made."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        print("no reflink filesystem: needs root and mkfs.xfs", file=sys.stderr)
        yield None
        return
    image, mount = base / "xfs.img", base / "xfs"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(1 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mount)]).returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def make_repo(where: Path, deps: dict[str, str], env: dict[str, str]) -> Path:
    main = where / "app"
    main.mkdir(parents=True)
    manifest = {"name": "app", "version": "1.0.0", "private": True, "dependencies": deps}
    (main / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (main / ".gitignore").write_text("node_modules/\n.env\n")
    subprocess.run(["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"],
                   cwd=main, env=env, check=True, capture_output=True)
    git(main, "init", "-q", "-b", "main")
    git(main, "add", "-A")
    git(main, "commit", "-q", "-m", "init")
    return main


def bench_one(where: Path, deps: dict[str, str], env: dict[str, str], runs: int
              ) -> dict[str, float]:
    main = make_repo(where, deps, env)
    cli = [sys.executable, "-m", "devd", "provision"]
    timed([*cli, str(main)], None, env)  # main's tree: what later worktrees may clone
    timed(NPM_CI, main, env)  # warm the cache for both sides
    base, devd, e2e, strategy = [], [], [], ""
    for i in range(runs):
        git(main, "worktree", "add", "-q", "--detach", str(where / f"plain-{i}"))
        base.append(timed(NPM_CI, where / f"plain-{i}", env))
        wt = where / f"devd-{i}"
        git(main, "worktree", "add", "-q", "--detach", str(wt))
        e2e.append(timed([*cli, str(wt)], None, env))
        status = subprocess.run([sys.executable, "-m", "devd", "status", str(wt), "--json"],
                                env=env, check=True, capture_output=True, text=True).stdout
        node = json.loads(status)["worktrees"][0]["deps"]["node"]
        assert node["state"] == "ready" and not (wt / "node_modules").is_symlink()
        devd.append(node["seconds"])
        strategy = node["strategy"]
    return {"npm ci": statistics.median(base), "devd": statistics.median(devd),
            "e2e": statistics.median(e2e), "strategy": strategy}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    rows = []
    with tempfile.TemporaryDirectory(prefix="devd-bench-deps-") as tmp:
        base = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")}
        env.update(DEVD_HOME=str(base / "home"), DEVD_NO_AUTOSTART="1",
                   PYTHONPATH=str(ROOT), npm_config_cache=str(base / "npm-cache"),
                   npm_config_update_notifier="false")
        (base / "home").mkdir()
        with daemon(env, base / "home"), xfs(base) as mount:
            places = [("ext4 (no reflink)", base / "plain")]
            if mount is not None:
                places.append(("XFS reflink=1", mount))
            for fs_name, place in places:
                for n, (name, deps) in enumerate(PROJECTS.items()):
                    result = bench_one(place / f"p{n}", deps, env, runs)
                    rows.append((name, fs_name, result))
    print(f"\n{runs} runs each, medians; devd = its recorded install time for the tree\n")
    print("| project | filesystem | plain `npm ci` | devd (strategy) | ratio | "
          "`devd provision` end to end |")
    print("|---|---|---|---|---|---|")
    for name, fs_name, r in rows:
        print(f"| {name} | {fs_name} | {r['npm ci']:.2f} s | {r['devd']:.2f} s "
              f"({r['strategy']}) | {r['devd'] / r['npm ci']:.2f}x | {r['e2e']:.2f} s |")


if __name__ == "__main__":
    main()
