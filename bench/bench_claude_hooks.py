"""Hook latency (issue 12): `devd hook claude-create` and the git post-checkout hook, this
checkout against a baseline install measured in the same run, alternating.

Each side is a plain (non-editable) install in its own directory (`pip install --no-deps
--target DIR .`), run with the interpreter that has devd's dependencies, with its own daemon
and DEVD_HOME. claude-create is timed until it prints the path (git worktree add, the copied
files, the provision request); the git hook until the hook script returns.

    python bench/bench_claude_hooks.py --baseline /tmp/devd-base --new /tmp/devd-new [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import new_repo, start_daemon  # noqa: E402

ZEROS = "0" * 40


def side(install: Path, root: Path, name: str) -> dict[str, object]:
    home = root / f"home-{name}"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEVD_", "CLAUDE"))} | {
        "DEVD_HOME": str(home), "PYTHONPATH": str(install), "DEVD_NO_AUTOSTART": "1"}
    bin_dir = root / f"bin-{name}"
    bin_dir.mkdir()
    (bin_dir / "devd").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m devd "$@"\n')
    (bin_dir / "devd").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    repo = new_repo(root / f"repo-{name}", '[ports]\nnames = ["web"]\n', ".env\n")
    subprocess.run([sys.executable, "-m", "devd", "hook", "install", "--git", str(repo)],
                   env=env, check=True, capture_output=True)
    return {"env": env, "repo": repo, "daemon": start_daemon(env, home), "n": 0}


def time_create(s: dict[str, object]) -> float:
    s["n"] = int(s["n"]) + 1  # type: ignore[call-overload]
    payload = json.dumps({"name": f"feat-{s['n']}", "session_id": "b", "cwd": str(s["repo"]),
                          "hook_event_name": "WorktreeCreate"})
    env = s["env"] | {"CLAUDE_PROJECT_DIR": str(s["repo"])}  # type: ignore[operator]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "devd", "hook", "claude-create"], input=payload,
                   text=True, env=env, check=True, capture_output=True, cwd=s["repo"])
    return time.perf_counter() - start


def time_git_hook(s: dict[str, object]) -> float:
    hook = Path(str(s["repo"])) / ".git" / "hooks" / "post-checkout"
    start = time.perf_counter()
    subprocess.run([str(hook), ZEROS, "abc", "1"], cwd=s["repo"], env=s["env"], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"baseline": side(args.baseline, Path(tmp), "base"),
                 "new": side(args.new, Path(tmp), "new")}
        try:
            times: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.runs):
                for label, s in sides.items():  # alternating: both see the same load
                    times.setdefault(("claude-create", label), []).append(time_create(s))
                    times.setdefault(("git hook", label), []).append(time_git_hook(s))
        finally:
            for s in sides.values():
                s["daemon"].terminate()  # type: ignore[attr-defined]
    load = os.getloadavg()[0]
    print(f"\n{time.strftime('%a %b %d %H:%M UTC %Y', time.gmtime())}, {platform.node()}, "
          f"{os.cpu_count()} cores, load {load:.1f}, {args.runs} runs, median (p90)\n")
    print("| hook | baseline | this branch | ratio |\n|---|---|---|---|")
    for hook in ("claude-create", "git hook"):
        base, new = times[(hook, "baseline")], times[(hook, "new")]
        p90 = lambda xs: sorted(xs)[int(len(xs) * 0.9) - 1]  # noqa: E731
        print(f"| {hook} | {statistics.median(base) * 1000:.0f} ms ({p90(base) * 1000:.0f}) | "
              f"{statistics.median(new) * 1000:.0f} ms ({p90(new) * 1000:.0f}) | "
              f"{statistics.median(new) / statistics.median(base):.2f} |")


if __name__ == "__main__":
    main()
