"""git hook latency (issue 12): devd's post-checkout block against an empty hook and against
the block of a baseline git ref, all in the same run (these machines are shared and noisy).

Three paths: an ordinary checkout (previous HEAD not zeros: what every `git checkout`
pays), a new linked worktree's first checkout (starts `devd provision` detached; `devd` is
a stub here, so this is the hook's own cost), and a checkout leaving an orphan branch
(previous HEAD zeros, not a new worktree). Wall time of `sh post-checkout ARGS`, median.

    python bench/bench_hooks.py [--runs 200] [--baseline main]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZEROS = "0" * 40


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True, env={**os.environ, "GIT_AUTHOR_NAME": "b",
                                          "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
                                          "GIT_COMMITTER_EMAIL": "b@b"}).stdout


def block_at(ref: str | None) -> str:
    """GIT_BLOCK of devd/hooks.py at `ref` (None: this checkout)."""
    if ref is None:
        from devd.hooks import GIT_BLOCK
        return GIT_BLOCK
    source = git(ROOT, "show", f"{ref}:devd/hooks.py")
    start = source.index('GIT_BLOCK = f"""')
    text = source[start:source.index('"""\n', start + 16) + 4]
    scope = {"BEGIN": "# >>> devd >>>", "END": "# <<< devd <<<"}
    exec(text, scope)  # noqa: S102 - our own source at a ref the caller named
    return str(scope["GIT_BLOCK"])


def timed(hook: Path, cwd: Path, args: list[str], env: dict[str, str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(["sh", str(hook), *args], cwd=cwd, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--baseline", default="main", help="git ref of the block to compare")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = work / "repo"
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        git(repo, "commit", "-q", "--allow-empty", "-m", "i")
        head = git(repo, "rev-parse", "HEAD").strip()
        new = work / "new"
        git(repo, "worktree", "add", "-q", "-b", "new", str(new))
        orphan = work / "orphan"
        git(repo, "worktree", "add", "-q", "-b", "orphan", str(orphan))
        git(orphan, "checkout", "-q", "--orphan", "unborn")
        git(orphan, "checkout", "-q", "orphan")
        stub = work / "bin"
        stub.mkdir()
        (stub / "devd").write_text("#!/bin/sh\nexit 0\n")
        (stub / "devd").chmod(0o755)
        env = {"PATH": f"{stub}:/usr/bin:/bin", "HOME": tmp}
        hooks = {"empty hook": "#!/bin/sh\n",
                 f"devd at {options.baseline}": "#!/bin/sh\n" + block_at(options.baseline),
                 "devd (this change)": "#!/bin/sh\n" + block_at(None)}
        cases = {"ordinary checkout": (new, [head, head, "1"]),
                 "new worktree": (new, [ZEROS, head, "1"]),
                 "leaving an orphan branch": (orphan, [ZEROS, head, "1"])}
        rows = []
        for label, text in hooks.items():
            hook = work / f"hook-{len(rows)}"
            hook.write_text(text)
            rows.append((label, [timed(hook, cwd, args, env, options.runs)
                                 for cwd, args in cases.values()]))
    print(f"{time.strftime('%a %b %d %H:%M UTC %Y', time.gmtime())}, {platform.node()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, median of "
          f"{options.runs} runs, sh = {os.path.realpath('/bin/sh')}\n")
    print("| hook | " + " | ".join(cases) + " |")
    print("|---|" + "---|" * len(cases))
    for label, values in rows:
        print(f"| {label} | " + " | ".join(f"{v:.1f} ms" for v in values) + " |")


if __name__ == "__main__":
    sys.exit(main())
