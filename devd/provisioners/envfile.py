"""The worktree's .env: copies of the main worktree's ignored files, plus devd's own block.

devd writes only between its two marker lines; every other line is the user's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from devd import dotenv, git
from devd.errors import OwnershipConflict
from devd.provisioners.base import Context, Health, Progress, Provisioner

BEGIN = "# >>> devd: managed block, rewritten by `devd provision`; edit outside it >>>"
END = "# <<< devd <<<"
_BLOCK = re.compile(rf"^{re.escape(BEGIN)}\n.*?^{re.escape(END)}\n?", re.M | re.S)
INCLUDE_FILE = ".worktreeinclude"


class EnvFileProvisioner(Provisioner):
    kind = "envfile"

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        wt, main = ctx.worktree.path, ctx.worktree.repo_main_path
        # Keep the records of earlier copies: drift is measured against the first copy.
        copies: dict[str, Any] = dict(ctx.recorded(self.kind).get("copies", {}))
        if wt != main:
            for rel in files_to_copy(ctx):
                record = copy_if_missing(main / rel, inside(wt, rel))
                if record:
                    progress("envfile", f"copied {rel} from the main worktree")
                    copies[rel] = record
        target = inside(wt, ctx.config.env.file)
        created = write_block(target, ctx.env)
        ignored = git.is_ignored(wt, ctx.config.env.file)
        return {"file": str(target), "created": created, "copies": copies, "ignored": ignored}

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        drifted = [rel for rel, record in detail.get("copies", {}).items()
                   if has_drifted(ctx.worktree.repo_main_path / rel, record)]
        notes = [f"main worktree's copy changed: {', '.join(drifted)}"] if drifted else []
        if detail.get("ignored") is False:
            # An untracked .env makes the worktree dirty: `git worktree remove` then refuses.
            notes.append(f"{Path(detail['file']).name} is not in .gitignore: add it there")
        return Health(True, "; ".join(notes), {"drift": drifted})

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
    wanted = list(ctx.config.env.copy_files)
    main = ctx.worktree.repo_main_path
    if (main / INCLUDE_FILE).is_file():
        wanted += [rel for rel in _included(main) if rel not in wanted]
    return wanted


def _included(main: Path) -> list[str]:
    """Untracked files matching .worktreeinclude that git also ignores (never tracked ones)."""
    def ls(*args: str) -> set[str]:
        out = git.run(main, "ls-files", "-z", "--others", "--ignored", *args)
        return {p for p in out.split("\0") if p}
    return sorted(ls(f"--exclude-from={main / INCLUDE_FILE}") & ls("--exclude-standard"))


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


def copy_if_missing(source: Path, target: Path) -> dict[str, Any] | None:
    """Copy without devd's block (the main worktree's ports must not leak); record the source."""
    if target.exists() or target.is_symlink() or not source.is_file():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    text = strip_block(source.read_bytes())
    _write_atomic(target, text.decode("utf-8", "surrogateescape"), like=source)
    return _fingerprint(source, text)


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


def write_block(target: Path, env: dict[str, str]) -> bool:
    """Replace (or append) devd's block in `target`; True if devd created the file."""
    if target.is_symlink():
        raise OwnershipConflict(
            f"{target} is a symlink (to {os.readlink(target)}); devd will not write through it",
            "replace it with a real file, or point [env] file in devd.toml elsewhere",
        )
    created = not target.exists()
    text = "" if created else target.read_text(encoding="utf-8", errors="surrogateescape")
    _check_block(target, text)
    block = render_block(env)
    if _BLOCK.search(text):
        new = _BLOCK.sub(lambda _: block, text, count=1)
    else:
        new = text + ("\n" if text and not text.endswith("\n") else "") + block
    if new != text:
        _write_atomic(target, new)
    return created


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


def render_block(env: dict[str, str]) -> str:
    return "\n".join([BEGIN, *dotenv.render(env), END]) + "\n"


def _write_atomic(target: Path, text: str, like: Path | None = None) -> None:
    """Write via a temp file and rename, so a crash or full disk never leaves half a file."""
    mode = (like or target).stat().st_mode & 0o777 if (like or target).exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".devd-tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
