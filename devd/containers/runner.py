"""The real Compose CLI: `docker compose` (v2) where the plugin answers, else `docker-compose`.

Both take the same global options (--project-name, --project-directory, -f) and print the
project's model with `config`; both label what they make com.docker.compose.project=<name>.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from devd.errors import DevdError

PROJECT_LABEL = "com.docker.compose.project"
VOLUME_LABEL = "com.docker.compose.volume"
TIMEOUT = 600.0  # an `up` may pull or build


@functools.cache
def binary() -> tuple[str, ...]:
    """The Compose command, v2 preferred; an error naming both when neither runs."""
    if shutil.which("docker") and _answers("docker", "compose", "version"):
        return ("docker", "compose")
    if shutil.which("docker-compose"):  # not asked: 1.x takes seconds to start (Python)
        return ("docker-compose",)
    raise DevdError("no Docker Compose found (neither `docker compose` nor `docker-compose` "
                    "runs)", "install the Compose plugin, or your distribution's "
                    "docker-compose package", code="compose_missing")


def _answers(*argv: str) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Project:
    """One worktree's Compose project: its name, directory and files."""

    def __init__(self, name: str, directory: Path, files: list[Path],
                 env: dict[str, str]) -> None:
        self.name, self.directory, self.files = name, directory, files
        # The daemon's own COMPOSE_* must not steer the worktree's project; devd's values
        # (ports, DATABASE_URL) are there for the files' ${...} to refer to.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")} | env

    def run(self, *args: str, timeout: float = TIMEOUT) -> str:
        # A removed worktree (gc) has no directory: the resolved file's paths are absolute.
        where = self.directory if self.directory.is_dir() else self.files[0].parent
        argv = [*binary(), "--project-name", self.name, "--project-directory", str(where),
                *(part for f in self.files for part in ("-f", str(f))),
                *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                                  cwd=where, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DevdError(f"`{' '.join(argv[:len(binary())])} {args[0]}` did not finish "
                            f"in {timeout:.0f} s", "see `docker ps -a` and the images it "
                            "pulls or builds", code="compose_error") from exc
        if done.returncode != 0:
            raise DevdError(f"compose {args[0]} of project {self.name} failed: "
                            f"{done.stderr.strip() or done.stdout.strip()}",
                            f"fix what Compose says about {', '.join(map(str, self.files))}",
                            code="compose_error")
        return done.stdout

    def model(self) -> dict[str, Any]:
        """The project's model as Compose itself resolves it (never our own YAML reading)."""
        import yaml

        found = yaml.safe_load(self.run("config"))
        if not isinstance(found, dict) or not isinstance(found.get("services"), dict):
            raise DevdError(f"compose config of {self.name} printed no services",
                            "check the compose files", code="compose_error")
        return found
