"""The README's newcomer lines, in order, as a bash script that stops at the first failing
line: the Quick start's ```sh blocks (install, tests, the walkthrough in a repo) and the
first block of "Service and hooks". Usage: python3 steps.py README.md > steps.sh"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# What a reader fills in, and what the walkthrough gives instead.
SUBSTITUTE = {
    "<devd repository URL>": "/walk/devd.bundle",
    # The whole suite takes ~12 min: collect it (every module imports) unless FULL=1.
    "python -m pytest": "python -m pytest ${PYTEST_ARGS---collect-only -q}",
}
# Where each block runs: apt and the clone in ~, the tests in the clone, the rest in the
# newcomer's own repo.
CWD = ["~", "~", "~/devd", "~/shop", "~/shop"]


def blocks(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [b.strip("\n").splitlines() for b in re.findall(r"```sh\n(.*?)```", section, re.S)]


def main() -> None:
    text = Path(sys.argv[1]).read_text(encoding="utf-8")
    chosen = blocks(text, "Quick start") + blocks(text, "Service and hooks")[:1]
    out = ["set -u", "step() { printf '\\n$ %s\\n' \"$1\"; eval \"$1\" || "
           "{ rc=$?; printf 'WALKTHROUGH FAILED (exit %s) at: %s\\n' \"$rc\" \"$1\"; exit 1; }; }"]
    for n, block in enumerate(chosen):
        if CWD[min(n, len(CWD) - 1)] == "~/shop" and "~/shop" not in CWD[:n]:
            out.append("bash /walk/repo.sh")  # the newcomer's own repo (git is there now)
        out.append(f"cd {CWD[min(n, len(CWD) - 1)]} || exit 1")
        for line in block:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for old, new in SUBSTITUTE.items():
                line = line.replace(old, new)
            out.append("step " + "'" + line.replace("'", "'\\''") + "'")
    out.append("echo; echo 'WALKTHROUGH OK'")
    print("\n".join(out))


if __name__ == "__main__":
    main()
