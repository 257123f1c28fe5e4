"""Which keys are devd's, and what keeps them devd's: placeholders for a Postgres that is not
ready, and the definitions of devd's keys that files outside its block still hold.

Next.js and Vite give `.env.local` (and `.env.development[.local]`) priority over `.env`, and
some loaders take a key's first definition: so devd's block is only the truth when it is the
only definition in the worktree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from devd import dotenv
from devd.errors import OwnershipConflict
from devd.provisioners.base import Context

DB_KEYS = ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE")
# The files frameworks load in development besides [env] file and the copies (dotenv-flow,
# Next.js, Vite; direnv's .envrc): a definition of devd's key in any of them can win over
# devd's block.
DEV_FILES = (".env", ".env.local", ".env.development", ".env.development.local",
             ".env.test", ".env.test.local", ".envrc")
_NOT_DOTENV = (".json", ".yml", ".yaml", ".toml", ".js", ".cjs", ".mjs", ".ts", ".gpg",
               ".enc", ".age", ".example", ".sample", ".template")
# postgres://, postgresql://, SQLAlchemy's postgresql+psycopg://, jdbc:postgresql://
_POSTGRES_URL = re.compile(r"postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)
_REMOVED_WORD = "devd-removed-main-url"
REMOVED_URL = (f"postgresql://{_REMOVED_WORD}@{_REMOVED_WORD}-see-devd-status.invalid:5432/"
               f"{_REMOVED_WORD}")
_REMOVED = re.compile(re.escape(_REMOVED_WORD))
MAX_SCAN = 1 << 20  # bytes; bigger files are not .env files
BEGIN = "# >>> devd: managed block, rewritten by `devd provision`; edit outside it >>>"
END = "# <<< devd <<<"


def inside(root: Path, rel: str) -> Path:
    """root/rel, refusing a path that a symlinked directory leads out of root."""
    path = root / rel
    real_root = root.resolve()
    if path.parent.resolve() != real_root and real_root not in path.parent.resolve().parents:
        raise OwnershipConflict(
            f"{path} leads outside {root} through a symlinked directory",
            "devd writes only inside the worktree: replace the symlink with a real directory",
        )
    return path


def has_postgres(ctx: Context, keys: Iterable[str] = ()) -> bool:
    """[postgres] is configured (even if its step failed, or devd.toml no longer parses and a
    database was recorded), or devd exports a database."""
    recorded = ctx.recorded("postgres").get("mode", "none")
    return ctx.config.postgres.mode != "none" or recorded != "none" or "DATABASE_URL" in keys


def devd_keys(ctx: Context, keys: Iterable[str]) -> Callable[[str], bool]:
    """Keys devd itself defines: its block's, plus DATABASE_URL and every PG* under
    [postgres] (PGHOSTADDR or PGSERVICE alone would lead libpq elsewhere)."""
    exact = {key.upper() for key in keys}
    pg = has_postgres(ctx, exact)
    # Any case: pydantic-settings (and Windows) read `database_url` as DATABASE_URL.
    return lambda key: (key.upper() in exact
                        or (pg and (key.upper() in DB_KEYS or key.upper().startswith("PG"))))


def managed_keys(ctx: Context, keys: Iterable[str]) -> Callable[[str], bool]:
    """Keys whose main-worktree value must not reach a worktree: devd's own, PORT, PORT_*,
    DEVD_*, the cache variables and [env] managed (NAME or PREFIX*)."""
    ours = devd_keys(ctx, keys)
    exact = {"PORT", *(name.upper() for name in ctx.config.cache.env)}
    prefixes = ["PORT_", "DEVD_"]
    for name in ctx.config.env.managed:
        (prefixes.append(name[:-1].upper()) if name.endswith("*") else exact.add(name.upper()))
    starts = tuple(prefixes)
    return lambda key: ours(key) or key.upper() in exact or key.upper().startswith(starts)


def url_keys(ctx: Context) -> Callable[[str], set[str]]:
    """Under [postgres], the keys of a copy's text whose value is a Postgres URL (Prisma's
    DIRECT_URL, Vercel's POSTGRES_PRISMA_URL, ...): main's database by another name. Those
    devd already replaced by REMOVED_URL are left as they are."""
    if not has_postgres(ctx):
        return lambda text: set()
    return lambda text: (dotenv.keys_with(text, _POSTGRES_URL)
                         - dotenv.keys_with(text, _REMOVED))


def removed_url_line(key: str) -> str:
    """What replaces a copy's Postgres URL under another name: a comment and a URL that
    fails at once, so the app does not fall back to another URL (say, the dev database for
    its tests) but names devd."""
    return (f"# {key}: the main worktree's Postgres URL was removed by devd; set it to this "
            f"worktree's (`devd env` shows DATABASE_URL), or map it in [env]\n"
            f"{key}={REMOVED_URL}")


def is_dotenv_name(rel: str) -> bool:
    """Whether a copied file is .env-style (its lines may be neutralised) by its name."""
    name = Path(rel).name
    # direnv's .envrc is shell: an `export KEY=...` line in it reads like a dotenv line.
    styled = name in (".env", ".envrc") or name.startswith(".env.") or name.endswith(".env")
    return styled and not name.endswith(_NOT_DOTENV)


# -- Postgres placeholders --------------------------------------------------------------


def postgres_guard(ctx: Context, env: dict[str, str], pending: bool = False
                   ) -> tuple[dict[str, str], str]:
    """Placeholders for DATABASE_URL and PG* when [postgres] is configured but `env` has no
    database, and the one-line warning saying why; ({}, "") otherwise. The host is under
    .invalid (RFC 6761: it never resolves), so every client fails at once, naming devd,
    instead of falling back to a default that may be the main worktree's database."""
    if "DATABASE_URL" in env or not has_postgres(ctx):
        return {}, ""
    state, why = ("pending", "") if pending else postgres_state(ctx)
    word = f"devd-postgres-{state}"
    host = f"{word}-see-devd-status.invalid"
    values = {"DATABASE_URL": f"postgresql://{word}@{host}:5432/{word}", "PGHOST": host,
              "PGPORT": "5432", "PGUSER": word, "PGPASSWORD": word, "PGDATABASE": word}
    warning = (f"this worktree's Postgres is {state}{why}; DATABASE_URL and PG* point at "
               f"{host}, which never resolves: fix the cause and run `devd provision "
               f"{ctx.worktree.path}`")
    return values, warning


def postgres_note(ctx: Context) -> str:
    """The guard's warning when [postgres] is configured but no database is ready, else ''."""
    if not has_postgres(ctx) or postgres_state(ctx)[0] == "ready":
        return ""
    return postgres_guard(ctx, {})[1]


def postgres_state(ctx: Context) -> tuple[str, str]:
    """('ready' | 'pending' | 'failed' | 'not-provisioned', ' (the error)') of this
    worktree's database."""
    found = [r for r in ctx.registry.resources(ctx.worktree.id) if r.kind == "postgres"]
    if not found:
        return "not-provisioned", ""
    resource = found[0]
    if resource.state == "ready":
        # Ready without a password: mode none was recorded, then devd.toml gained [postgres].
        return ("ready" if "password" in resource.detail else "not-provisioned"), ""
    error = resource.detail.get("error", "")
    return resource.state, f" ({error})" if error else ""


# -- definitions outside devd's block ----------------------------------------------------


def shadowing(ctx: Context, files: Iterable[str], target: Path, block_keys: list[str]
              ) -> list[dict[str, Any]]:
    """Every definition of a key devd defines outside its block: {key, file, line}."""
    ours = devd_keys(ctx, block_keys)
    found = []
    for rel in sorted(set(files)):
        try:
            path = inside(ctx.worktree.path, rel)
        except OwnershipConflict:
            continue  # a symlinked directory out of the worktree: not the worktree's file
        for key, line in _defined(path, skip_block=path == target):
            if ours(key):
                found.append({"key": key, "file": rel, "line": line})
    return found


def _defined(path: Path, skip_block: bool) -> list[tuple[str, int]]:
    """(key, 1-based line) of each definition in a regular file; devd's block left out."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_SCAN:
            return []
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return []
    inside = _block_lines(text) if skip_block else range(0)
    return [(key, first + 1) for key, first, _ in dotenv.definitions(text)
            if first not in inside]


def _block_lines(text: str) -> range:
    lines = dotenv.split_lines(text)
    if BEGIN not in lines or END not in lines:
        return range(0)
    return range(lines.index(BEGIN), lines.index(END) + 1)


def block_keys(text: str) -> list[str]:
    """The keys inside devd's block of a file's text."""
    lines = dotenv.split_lines(text)
    span = _block_lines(text)
    return [key for key, _, _ in dotenv.definitions("\n".join(lines[span.start:span.stop]))]


def describe_shadowing(found: list[dict[str, Any]], target: str) -> str:
    """One sentence for status: where each key is defined, and the fix."""
    by_key: dict[str, list[str]] = {}
    for item in found:
        by_key.setdefault(item["key"], []).append(f"{item['file']}:{item['line']}")
    where = "; ".join(f"{key} at {', '.join(spots)}" for key, spots in by_key.items())
    return (f"defined outside devd's block: {where}. Loaders that prefer those (Next.js and "
            f"Vite read .env.local first; some take the first definition) would not use "
            f"devd's value: delete those lines (devd sets them in {target}), or start the "
            "app with `devd run`, whose values win over every file")
