"""The README's newcomer lines, in order, as bash scripts that stop at the first failing
line. Each part runs in a login shell of its own: the README asks for a new login after
`usermod -aG docker`. Part 1: the Quick start's ```sh blocks (install, tests, the
walkthrough in a repo), the first block of "Service and hooks", the Postgres try-out and
the Compose install; part 2 (logged in again): the rest of the Compose try-out and the
Services one. Usage: python3 steps.py README.md OUTDIR  (writes OUTDIR/part1.sh, part2.sh)"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# What a reader fills in, and what the walkthrough gives instead.
SUBSTITUTE = {
    "<devd repository URL>": "/walk/devd.bundle",
    # The whole suite takes ~12 min: collect it (every module imports) unless FULL=1.
    "python -m pytest": "python -m pytest " + os.environ.get("PYTEST_ARGS", "--collect-only -q"),
    # No container registry is reachable here: the same image, built offline (.ci/run).
    "image: redis:7": "image: local/redis:7",
}
# Where each Quick start block runs: apt and the clone in ~, the tests in the clone, the
# rest in the newcomer's own repo (made before its first block: git is installed by then).
QUICK_CWD = ["~", "~", "~/devd"]


def blocks(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [b.strip("\n").splitlines() for b in re.findall(r"```sh\n(.*?)```", section, re.S)]


def steps(block: list[str]) -> list[str]:
    out = []
    for line in block:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for old, new in SUBSTITUTE.items():
            line = line.replace(old, new)
        out.append("step " + "'" + line.replace("'", "'\\''") + "'")
    return out


def script(parts: list[tuple[str, list[str]]], done: str) -> str:
    out = ["set -u", "step() { printf '\\n$ %s\\n' \"$1\"; eval \"$1\" || "
           "{ rc=$?; printf 'WALKTHROUGH FAILED (exit %s) at: %s\\n' \"$rc\" \"$1\"; exit 1; }; }"]
    for cwd, block in parts:
        if cwd == "repo":
            out.append("bash /walk/repo.sh")  # the newcomer's own repo
            cwd = "~/shop"
        out += [f"cd {cwd} || exit 1", *steps(block)]
    out.append(f"echo; echo '{done}'")
    return "\n".join(out) + "\n"


def main() -> None:
    text = Path(sys.argv[1]).read_text(encoding="utf-8")
    quick = blocks(text, "Quick start")
    compose = blocks(text, "Containers and Compose")
    part1 = [(QUICK_CWD[n] if n < len(QUICK_CWD) else "~/shop", b) for n, b in enumerate(quick)]
    part1[len(QUICK_CWD)] = ("repo", part1[len(QUICK_CWD)][1])
    part1 += [("~/shop", blocks(text, "Service and hooks")[0]),
              ("~/shop", blocks(text, "Postgres")[0]), ("~/shop", compose[0])]
    part2 = [("~/shop", compose[1]), ("~/shop", blocks(text, "Services")[0])]
    out = Path(sys.argv[2])
    (out / "part1.sh").write_text(script(part1, "WALKTHROUGH PART 1 OK"), encoding="utf-8")
    (out / "part2.sh").write_text(script(part2, "WALKTHROUGH OK"), encoding="utf-8")


if __name__ == "__main__":
    main()
