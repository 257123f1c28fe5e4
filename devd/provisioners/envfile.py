"""The worktree's .env: copies of the main worktree's ignored files, plus devd's own block.

devd writes only between its two marker lines; every other line is the user's, except in the
files devd copied from the main worktree, where each line defining a managed key (see
envguard.py) is replaced by a comment: the main worktree's DATABASE_URL or PORT must never be
what a worktree's app reads. Every file devd writes is private to the user (no group or other
permissions): the block and the copies hold secrets.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from devd import dotenv, git
from devd.errors import ConfigError, DevdError, OwnershipConflict
from devd.paths import write_atomic
from devd.provisioners import envguard
from devd.provisioners.base import Context, Health, Progress, Provisioner
from devd.provisioners.envguard import BEGIN, END, inside

_BLOCK = re.compile(rf"^{re.escape(BEGIN)}\n.*?^{re.escape(END)}\n?", re.M | re.S)
INCLUDE_FILE = ".worktreeinclude"
PRIVATE = 0o700  # the permission bits devd keeps on what it writes: the owner's only


class EnvFileProvisioner(Provisioner):
    """The .env block and the copies. An `early` instance runs before Postgres (which can
    take a while) on a first provision, so the copies and a block with placeholders exist
    at once (Claude Code's create hook waits for them); the last instance writes the truth."""

    kind = "envfile"

    def __init__(self, early: bool = False) -> None:
        self.early = early

    def applies(self, ctx: Context) -> bool:
        if not self.early:
            return True
        target = ctx.worktree.path / ctx.config.env.file
        return envguard.has_postgres(ctx) and not _has_block(target)

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        wt, rel = ctx.worktree.path, ctx.config.env.file
        target = inside(wt, rel)
        refuse_tracked(wt, rel, "[env] file")
        placeholders, warning = envguard.postgres_guard(ctx, ctx.env, pending=self.early)
        env = ctx.env | placeholders
        if warning and self.early:  # the database comes next in this same provision
            progress("envfile", "DATABASE_URL and PG* hold placeholders until this "
                     "worktree's database is made")
        elif warning:
            progress("envfile", warning)
        copies = self._copy(ctx, progress, envguard.managed_keys(ctx, env))
        created, refused, block = write_block(target, env)
        # The early pass may have made the file: it stays devd's to remove when emptied.
        created = created or bool(ctx.recorded(self.kind).get("created"))
        detail = {"file": str(target), "created": created, "copies": copies,
                  "ignored": git.is_ignored(wt, rel), "block": block_digests(block)}
        if refused:
            self._refuse(ctx, detail, refused)
        return detail

    def _refuse(self, ctx: Context, detail: dict[str, Any], refused: list[DevdError]
                ) -> NoReturn:
        """Keep the record (teardown needs it), then fail naming each refused key."""
        ctx.registry.set_resource(ctx.worktree.id, self.kind, "pending", detail)
        raise DevdError("; ".join(e.message for e in refused), refused[0].hint,
                        code="env_value")

    def _copy(self, ctx: Context, progress: Progress, managed: Callable[[str], bool]
              ) -> dict[str, Any]:
        """Copy what is missing, then neutralise managed keys in every copy devd made."""
        wt, main = ctx.worktree.path, ctx.worktree.repo_main_path
        # Keep the records of earlier copies: drift is measured against the first copy.
        copies: dict[str, Any] = dict(ctx.recorded(self.kind).get("copies", {}))
        if wt == main:
            return copies
        for rel in files_to_copy(ctx):
            record = copy_if_missing(main / rel, inside(wt, rel))
            if record:
                progress("envfile", f"copied {rel} from the main worktree")
                copies[rel] = record
        urls = envguard.url_keys(ctx)
        for rel in copies:
            removed = neutralise_copy(inside(wt, rel), rel, managed, urls)
            if removed:
                progress("envfile", f"removed the main worktree's {', '.join(removed)} "
                         f"from {rel}: devd's values apply")
        return copies

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        copies = detail.get("copies", {})
        drifted = [rel for rel, record in copies.items()
                   if has_drifted(ctx.worktree.repo_main_path / rel, record)]
        notes = [f"main worktree's copy changed: {', '.join(drifted)}"] if drifted else []
        if detail.get("ignored") is False:
            # An untracked .env makes the worktree dirty: `git worktree remove` then refuses.
            notes.append(f"{Path(detail['file']).name} is not in .gitignore: add it there")
        warning = envguard.postgres_note(ctx)
        if warning:
            notes.append(warning)
        target = Path(detail.get("file", ctx.worktree.path / ctx.config.env.file))
        try:
            text = target.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            text = ""
        edited = _edited(detail.get("block"), text)
        if edited:
            notes.append(f"devd's block in {target.name} was edited by hand "
                         f"({', '.join(edited)}): `devd provision` writes it again")
        files = [*envguard.DEV_FILES, ctx.config.env.file, *copies,
                 *ctx.config.env.copy_files]
        shadowed = envguard.shadowing(ctx, files, target, envguard.block_keys(text))
        if shadowed:
            notes.append(envguard.describe_shadowing(shadowed, ctx.config.env.file))
        return Health(not (shadowed or edited), "; ".join(notes),
                      {"drift": drifted, "shadowed": shadowed})

    def check_teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        self._readable(ctx, detail)

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        found = self._readable(ctx, detail)
        if found is None:
            return
        target, text = found
        remaining = _BLOCK.sub("", text)
        if detail.get("created") and not remaining.strip():
            target.unlink()
        else:
            _write_atomic(target, remaining)

    def _readable(self, ctx: Context, detail: dict[str, Any]) -> tuple[Path, str] | None:
        """The env file and its text if devd has a block to remove there; raises if that
        block is damaged or the file lies outside the worktree."""
        target = Path(detail.get("file", ctx.worktree.path / ctx.config.env.file))
        if target.is_symlink() or not target.is_file():
            return None
        inside(ctx.worktree.path, str(target.relative_to(ctx.worktree.path)))
        text = target.read_text(encoding="utf-8", errors="surrogateescape")
        return target, _check_block(target, text)


def files_to_copy(ctx: Context) -> list[str]:
    """[env] copy entries, plus the main worktree's ignored files matched by .worktreeinclude."""
    main, env = ctx.worktree.repo_main_path, ctx.config.env
    wanted = list(env.copy_files)
    if "copy_files" in env.model_fields_set:  # the defaults may be tracked: git has them
        for rel in wanted:
            refuse_tracked(main, rel, "[env] copy entry")
    if (main / INCLUDE_FILE).is_file():
        wanted += [rel for rel in _included(main) if rel not in wanted]
    return wanted


def _included(main: Path) -> list[str]:
    """Untracked files matching .worktreeinclude that git also ignores (never tracked ones)."""
    def ls(*args: str) -> set[str]:
        out = git.run(main, "ls-files", "-z", "--others", "--ignored", *args)
        return {p for p in out.split("\0") if p}
    return sorted(ls(f"--exclude-from={main / INCLUDE_FILE}") & ls("--exclude-standard"))


def refuse_tracked(worktree: Path, rel: str, what: str) -> None:
    """devd writes only files git ignores: a tracked one would be committed, or break git."""
    if git.run(worktree, "--literal-pathspecs", "ls-files", "-z", "--", rel):
        raise ConfigError(f"{what} {rel!r} is tracked by git in {worktree}; devd will not "
                          "write into a tracked file",
                          "point it at an ignored file in devd.toml, e.g. [env] file = "
                          "\".env.local\" (and add that to .gitignore)")


def copy_if_missing(source: Path, target: Path) -> dict[str, Any] | None:
    """Copy without devd's block (the main worktree's ports must not leak); record the source."""
    if target.exists() or target.is_symlink() or not source.is_file():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    text = strip_block(source.read_bytes())
    _write_atomic(target, text.decode("utf-8", "surrogateescape"), like=source)
    return _fingerprint(source, text)


def neutralise_copy(target: Path, rel: str, managed: Callable[[str], bool],
                    urls: Callable[[str], set[str]] = lambda text: set()) -> list[str]:
    """Replace each definition of a managed key (or of a key `urls` finds in the text) in a
    copied .env-style file by a comment."""
    if not envguard.is_dotenv_name(rel) or target.is_symlink() or not target.is_file():
        return []
    text = target.read_text(encoding="utf-8", errors="surrogateescape")
    found = _BLOCK.search(text)  # the copy may be [env] file: devd's block is not a copy's
    parts = [text[:found.start()], found[0], text[found.end():]] if found else [text]
    removed: list[str] = []
    extra = urls(text)  # devd's block holds only managed keys: its own count for nothing here
    for index in range(0, len(parts), 2):
        parts[index], keys = dotenv.neutralise(
            parts[index], lambda key: managed(key) or key in extra,
            lambda key: _removed_comment(key, managed(key)))
        removed += keys
    if removed:
        _write_atomic(target, "".join(parts))
    return removed


def _removed_comment(key: str, devds: bool = True) -> str:
    if not devds:  # a Postgres URL under another name: devd has no value of its own for it
        return envguard.removed_url_line(key)
    return (f"# {key}: the main worktree's value was removed by devd; this worktree gets "
            "its own (see `devd env`)")


def has_drifted(source: Path, record: dict[str, Any]) -> bool:
    try:
        stat = source.stat()
    except OSError:
        return True
    if [stat.st_mtime_ns, stat.st_size] == [record.get("mtime_ns"), record.get("size")]:
        return False
    return _digest(strip_block(source.read_bytes())) != record.get("sha256")


def strip_block(content: bytes) -> bytes:
    text = content.decode("utf-8", "surrogateescape")
    return _BLOCK.sub("", text).encode("utf-8", "surrogateescape")


def _fingerprint(source: Path, text: bytes) -> dict[str, Any]:
    stat = source.stat()
    return {"sha256": _digest(text), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _has_block(target: Path) -> bool:
    try:
        return BEGIN in target.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return False


def write_block(target: Path, env: dict[str, str]) -> tuple[bool, list[DevdError], str]:
    """Replace (or append) devd's block in `target`; returns whether devd created the file,
    the values it refused to write (each left out of the block, named in a comment) and the
    block."""
    if target.is_symlink():
        raise OwnershipConflict(
            f"{target} is a symlink (to {os.readlink(target)}); devd will not write through it",
            "replace it with a real file, or point [env] file in devd.toml elsewhere",
        )
    created = not target.exists()
    text = "" if created else target.read_text(encoding="utf-8", errors="surrogateescape")
    _check_block(target, text)
    lines, refused = dotenv.render_each(env)
    block = "\n".join([BEGIN, *lines, END]) + "\n"
    if _BLOCK.search(text):
        new = _BLOCK.sub(lambda _: block, text, count=1)
    else:
        new = text + ("\n" if text and not text.endswith("\n") else "") + block
    if new != text or _mode(target) & ~PRIVATE:
        _write_atomic(target, new)
    return created, refused, block


def block_digests(text: str) -> dict[str, str] | None:
    """Per key of devd's block in `text`, a digest of its lines (the values are secrets: the
    record keeps none); None without a block."""
    found = _BLOCK.search(text)
    if found is None:
        return None
    lines = dotenv.split_lines(found.group(0))
    return {key: hashlib.sha256("\n".join(lines[first:last + 1]).encode(
        "utf-8", "surrogateescape")).hexdigest()[:16]
        for key, first, last in dotenv.definitions(found.group(0))}


def _edited(written: dict[str, str] | None, text: str) -> list[str]:
    """The keys of devd's block changed, added or removed since devd wrote it (a PORT or
    DATABASE_URL edited there is a worktree no longer isolated, though nothing else says
    so); ["the whole block"] when it is gone."""
    if written is None:
        return []
    now = block_digests(text)
    if now is None:
        return ["the whole block"]
    return sorted(key for key in written.keys() | now.keys() if written.get(key) != now.get(key))


def _check_block(target: Path, text: str) -> str:
    """A begin marker without its end (a hand edit gone wrong) would make the next rewrite
    swallow the user's lines up to some later marker: refuse instead."""
    if text.count(BEGIN) != text.count(END) or text.count(BEGIN) > 1:
        raise OwnershipConflict(
            f"devd's block in {target} is damaged (its begin and end markers do not pair up)",
            f"restore the line {END!r} after devd's variables, or delete the block; "
            "then provision again",
        )
    return text


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777 if path.exists() else 0o600


def _write_atomic(target: Path, text: str, like: Path | None = None) -> None:
    """paths.write_atomic, keeping only the owner's permission bits (of `like`, else of the
    old file): these files carry secrets."""
    write_atomic(target, text.encode("utf-8", "surrogateescape"), _mode(like or target) & PRIVATE)
