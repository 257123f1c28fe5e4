"""A new user's Django app (tests/fixtures/djangoapp) in a devd repo: files, manage.py, main's DB.

The app reads DATABASE_URL from its .env with python-dotenv, as real settings do, so every
manage.py here runs with a shell environment stripped of the keys devd manages.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from conftest import Repo, run_git
from pgsupport import query

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "djangoapp"
BRANCH_B = FIXTURE / "branch_b"  # what branch B changes: a column and a model, one migration
_SHELL_KEYS = ("DATABASE_URL", "PORT", "PG", "DEVD_", "DJANGO_")


def files(root: Path) -> dict[str, str]:
    """Relative path -> text of every file under root (caches and overlays below it left out)."""
    skip = {BRANCH_B} - {root}
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and not skip & set(p.parents)}


def commit_in(tree: Path, new: dict[str, str], message: str) -> None:
    """Write files into a worktree and commit them on its branch."""
    for rel, text in new.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    run_git(tree, "add", "-A")
    run_git(tree, "commit", "-q", "-m", message)


def add_worktree(repo: Repo, name: str, branch: str, start: str = "main") -> Path:
    """`git worktree add -b BRANCH ../NAME START`."""
    path = repo.main.parent / name
    run_git(repo.main, "worktree", "add", "-q", "-b", branch, str(path), start)
    return path.resolve()


def app_env() -> dict[str, str]:
    """The shell of a user who never exported DATABASE_URL: the app sees only its .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SHELL_KEYS)}
    return env | {"PYTHONDONTWRITEBYTECODE": "1"}


def _command(*args: str) -> list[str]:
    return [sys.executable, "manage.py", *args]


def manage(tree: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run manage.py in a worktree; output merged into stdout for the assertion messages."""
    return subprocess.run(_command(*args), cwd=tree, env=app_env(), text=True, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def manage_ok(tree: Path, *args: str) -> str:
    result = manage(tree, *args)
    assert result.returncode == 0, f"manage.py {' '.join(args)} in {tree}:\n{result.stdout}"
    return result.stdout


def manage_together(trees: list[Path], *args: str, timeout: float = 180) -> list[tuple[int, str]]:
    """The same manage.py command in several worktrees at once: (exit code, output) each."""
    procs = [subprocess.Popen(_command(*args), cwd=tree, env=app_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for tree in trees]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]  # pipes never fill
        return [(proc.returncode, output) for proc, output in zip(procs, outputs, strict=True)]
    finally:
        for proc in procs:  # a hung run must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def with_db(url: str, name: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    return urlunsplit(parts._replace(netloc=f"{netloc}:{port}"))


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_main(repo: Repo, admin_url: str, dbname: str) -> str:
    """Main's own dev database, migrated and loaded through its .env, as its user set it up."""
    query(admin_url, f'CREATE DATABASE "{dbname}"')
    url = with_db(admin_url, dbname)
    (repo.main / ".env").write_text(f"SECRET=from-main\nDATABASE_URL={url}\nPORT=8000\n")
    manage_ok(repo.main, "migrate", "--noinput")
    manage_ok(repo.main, "loaddata", "products")
    return url


def snapshot(url: str) -> dict[str, Any]:
    """What a leak would change in main's database: public's tables, rows, applied migrations."""
    return {
        "tables": query(url, "SELECT table_name FROM information_schema.tables "
                             "WHERE table_schema = 'public' ORDER BY 1"),
        "columns": query(url, "SELECT column_name FROM information_schema.columns "
                              "WHERE table_schema = 'public' AND table_name = 'catalog_product' "
                              "ORDER BY 1"),
        "products": query(url, "SELECT id, title FROM public.catalog_product ORDER BY id"),
        "migrations": query(url, "SELECT app, name FROM public.django_migrations ORDER BY id"),
    }


def active(text: str, key: str) -> list[str]:
    """Values of every uncommented KEY= line in a .env text (what some loader may pick)."""
    pattern = re.compile(rf"^\s*(?:export\s+)?{re.escape(key)}\s*=\s*(.*)$", re.M)
    return [m.group(1).strip().strip("'\"") for m in pattern.finditer(text)]
