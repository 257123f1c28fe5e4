"""Claude Code's hooks: WorktreeCreate/WorktreeRemove make and remove worktrees exactly as
Claude Code does without a hook (observed with its CLI, see tests/test_claude_code.py), and
SessionStart gives its Bash tool the environment of the worktree each command runs in.

Contracts (each one a trap when broken):
- WorktreeCreate *replaces* Claude's own creation: stdout carries exactly one line, the
  worktree's absolute path; anything else goes to stderr; non-zero fails the spawn, so input
  is checked before any side effect and a failed create leaves nothing behind.
- WorktreeRemove: exit 0 means "removed"; non-zero makes Claude keep the worktree and show
  our stderr, so it is non-zero exactly when the worktree is still there.
- SessionStart: never fail a session; stdout goes to the model as context. (CwdChanged is
  not used: Claude does not fire it in `-p` mode, and the script below covers it.)
Every hook gets 600 s from Claude; devd's own bounds are far shorter.
Light imports only: these run from hooks, where every millisecond is someone's wait.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path
from typing import IO, Any

from devd.client import Client, caller_overrides
from devd.errors import DevdError, NotAWorktree, NotRegistered, UsageError
from devd.git import admin_dir
from devd.hooks import (
    RELEASE_DEADLINE,
    Say,
    claude_config,
    finished,
    git,
    is_worktree_root,
    read_hook_input,
    toplevel,
    wait_until,
)
from devd.paths import current_dir

# Claude's own rules for a worktree name (validateWorktreeSlug in its CLI).
NAME_MAX = 64
SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
# `claude -w '#123'` (or a PR URL) reaches the hook as the name pr-123.
PR_NAME = re.compile(r"pr-([0-9]+)")
# Subagents with `isolation: "worktree"` get agent-<agent id>; Claude never removes a hook
# made one, so the daemon does (devd/agents.py) when it is unchanged.
AGENT_NAME = re.compile(r"agent-a[0-9a-f]{16}")
# In the worktree's git dir: what claude-create made (the daemon's agent policy reads it).
MARK = "devd-claude.json"
FILES_TIMEOUT = 30.0
ENV_TIMEOUT = 30.0
ENV_IDLE = 2.0  # `devd env` from the env script, per Bash command


def worktree_slug(data: dict[str, Any]) -> str:
    """The directory and branch suffix for `name`: '/' becomes '+', as Claude does."""
    name = data.get("name", data.get("worktree_name"))
    if not isinstance(name, str) or not name:
        raise UsageError("hook input has no \"name\"", 'expected {"name": "my-feature", ...}')
    hint = ("at most 64 characters; '/'-separated segments of letters, digits, '.', '_' and "
            "'-' (no '.', '..' or '.git' segment), as Claude Code allows")
    shown = repr(name[:120])
    if len(name) > NAME_MAX:
        raise UsageError(f"worktree name {shown} is longer than {NAME_MAX} characters", hint)
    for segment in name.split("/"):
        if not SEGMENT.fullmatch(segment) or segment in (".", "..") \
                or segment.lower().rstrip(".") == ".git":
            raise UsageError(f"worktree name {shown} is not allowed", hint)
    slug = name.replace("/", "+")
    if ".." in slug or slug.endswith((".", ".lock")) or slug.startswith("."):
        raise UsageError(f"worktree name {shown} makes no valid branch name", hint)
    return slug


def main_root(start: Path) -> tuple[Path, Path]:
    """The main worktree's root and the repo's common git dir, even from a linked worktree:
    Claude puts every worktree (sessions' and agents') under the main repo."""
    if not start.is_dir():
        raise NotAWorktree(f"{start} is not a directory", "pass a path inside a git repository")
    top, common = (Path(line).resolve() for line in git(
        start, "rev-parse", "--path-format=absolute", "--show-toplevel", "--git-common-dir")
        .stdout.splitlines()[:2])
    return (common.parent if common.name == ".git" else top), common


# -- create ------------------------------------------------------------------------------


def claude_create(stream: IO[str], environ: dict[str, str], client: Client, say: Say) -> Path:
    """WorktreeCreate: resume the worktree of that name, or make it as Claude would; start
    provisioning; return its absolute path."""
    data = read_hook_input(stream)
    slug = worktree_slug(data)
    repo, common = main_root(Path(environ.get("CLAUDE_PROJECT_DIR") or current_dir()).absolute())
    place = Path(str(claude_config(repo).get("worktree_dir", ".claude/worktrees")))
    path = Path(os.path.normpath(repo / place.expanduser() / slug))
    if _linked_worktree(path, common):
        say(f"resuming worktree {path}")
    elif path.exists() or path.is_symlink():
        raise UsageError(f"{path} exists but is not a worktree of this repository",
                         "remove it (`git worktree remove` or `rm -rf`), or choose another name")
    else:
        _forget_missing(repo, path, say)
        _make(repo, path, slug, data, environ, say)
    _start_provisioning(client, path, say)
    return path


def _forget_missing(repo: Path, path: Path, say: Say) -> None:
    """A worktree deleted by hand (`rm -rf`) stays registered with git, which then refuses
    its name ("already checked out"); its files are gone, so only git's record goes."""
    listed = git(repo, "worktree", "list", "--porcelain", check=False).stdout.splitlines()
    if f"worktree {path}" in listed and \
            git(repo, "worktree", "remove", str(path), check=False).returncode == 0:
        say(f"forgot the deleted worktree {path} (git still listed it)")


def _make(repo: Path, path: Path, slug: str, data: dict[str, Any], environ: dict[str, str],
          say: Say) -> None:
    branch = f"worktree-{slug}"
    base = base_ref(repo, slug, environ)
    made = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    # -B, as Claude: a name used before (its branch left behind) starts afresh from the base.
    result = git(repo, "worktree", "add", "--no-track", "-B", branch, str(path), base,
                 check=False, stdout=2)
    if result.returncode != 0:
        for directory in reversed(made):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise DevdError(f"git worktree add {path} failed: {result.stderr.strip()}",
                        "see git's message above", code="git_failed")
    say(f"created worktree {path} on branch {branch} from {base}")
    try:  # the worktree exists: what follows must not fail the create
        _copy_local_settings(repo, path, say)
    except OSError as exc:
        say(f"warning: could not copy .claude/settings.local.json: {exc}")
    _mark(path, {"name": slug, "agent": bool(AGENT_NAME.fullmatch(slug)),
                 "base": git(path, "rev-parse", "HEAD").stdout.strip(), "created": time.time(),
                 "session_id": data.get("session_id"),
                 "transcript_path": data.get("transcript_path")})


def base_ref(repo: Path, slug: str, environ: dict[str, str]) -> str:
    """What Claude bases a new worktree on: `pull/N/head` for pr-N; HEAD with its
    `worktree.baseRef = "head"`; else origin/<default branch> (fetched if missing), else
    HEAD."""
    if pr := PR_NAME.fullmatch(slug):
        fetched = _fetch(repo, f"pull/{pr[1]}/head")
        if fetched.returncode != 0:
            raise DevdError(f"Failed to fetch PR #{pr[1]}: {fetched.stderr.strip()}",
                            "the PR may not exist, or the repo has no remote named origin; "
                            "pick another name for a worktree that is not a PR",
                            code="git_failed")
        return "FETCH_HEAD"
    if _claude_setting(repo, environ, "worktree", "baseRef") == "head":
        return "HEAD"
    remotes = git(repo, "for-each-ref", "--format=%(refname) %(symref)",
                  "refs/remotes/origin/").stdout.split("\n")
    refs = dict((line.split(" ") + [""])[:2] for line in remotes if line)
    pointed = refs.get("refs/remotes/origin/HEAD", "").removeprefix("refs/remotes/origin/")
    default = next((b for b in (pointed, "main", "master")
                    if b and f"refs/remotes/origin/{b}" in refs), "main")
    if f"refs/remotes/origin/{default}" in refs:
        return f"origin/{default}"
    has_origin = git(repo, "config", "--get", "remote.origin.url", check=False)
    if has_origin.returncode == 0 and _fetch(repo, default).returncode == 0:
        return f"origin/{default}"
    return "HEAD"


def _fetch(repo: Path, ref: str) -> Any:
    """`git fetch origin REF`, never waiting for a password nobody can type in a hook."""
    os.environ.setdefault("GIT_TERMINAL_PROMPT", "0")
    return git(repo, "-c", "credential.interactive=never", "fetch", "--quiet", "origin", ref,
               check=False)


def _claude_setting(repo: Path, environ: dict[str, str], *keys: str) -> Any:
    """A Claude Code setting, as it merges them: local over project over user."""
    config = Path(environ.get("CLAUDE_CONFIG_DIR") or os.path.expanduser("~/.claude"))
    for source in (repo / ".claude" / "settings.local.json",
                   repo / ".claude" / "settings.json", config / "settings.json"):
        try:
            value: Any = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _copy_local_settings(repo: Path, path: Path, say: Say) -> None:
    """.claude/settings.local.json, copied as Claude does: never a symlink, never through a
    checked-in link that leads out of the worktree."""
    source = repo / ".claude" / "settings.local.json"
    target = path / ".claude" / "settings.local.json"
    if not source.is_file() or source.is_symlink() or target.exists() or target.is_symlink():
        return
    target.parent.mkdir(exist_ok=True)
    if not target.parent.resolve().is_relative_to(path.resolve()):
        say(f"warning: not copying {source.name}: {target.parent} leads out of the worktree")
        return
    shutil.copyfile(source, target)
    say(f"copied {source} to {target}")


def _git_dir(path: Path) -> Path | None:
    """The linked worktree's own git dir, if its `.git` file points to one that is there."""
    admin = admin_dir(path)
    found = admin.resolve() if admin is not None else None
    return found if found is not None and found.is_dir() else None


def _linked_worktree(path: Path, common: Path) -> bool:
    """A live linked worktree of this repo at `path` (what `claude -w NAME` resumes)."""
    gitdir = _git_dir(path)
    return gitdir is not None and gitdir.parent == common / "worktrees" \
        and (gitdir / "HEAD").is_file()


def _mark(path: Path, record: dict[str, Any]) -> None:
    """Record what claude-create made; without it the daemon never takes it for an agent's."""
    gitdir = _git_dir(path)
    try:
        if gitdir is not None:
            (gitdir / MARK).write_text(json.dumps(record) + "\n", encoding="utf-8")
    except OSError:
        pass


def read_mark(path: Path) -> dict[str, Any] | None:
    """What claude-create recorded for the worktree at `path`, if it made it."""
    gitdir = _git_dir(path)
    try:
        data = json.loads((gitdir / MARK).read_text(encoding="utf-8")) if gitdir else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _start_provisioning(client: Client, path: Path, say: Say) -> None:
    """Register and provision in the background; wait only for the copied files (.env,
    .worktreeinclude), which the agent may read at once. devd writes them, with its block,
    before a Postgres step (whose values are placeholders that fail until it is ready), so
    this wait never includes a database clone. A daemon problem never fails the create:
    the worktree exists, and `devd provision` can finish the job."""
    try:
        client.call("provision", {"path": str(path), "background": True} | caller_overrides())
        wait_until(client, path, FILES_TIMEOUT, _files_copied)
    except DevdError as exc:
        say(f"warning: {path} is not provisioned yet: {exc.message}")
        say(f"hint: run `devd provision {path}`")
        return
    say(f"provisioning {path} in the background (`devd wait {path}` blocks until ready)")


def _files_copied(wt: dict[str, Any]) -> bool:
    envfile = [r for r in wt.get("resources", []) if r.get("kind") == "envfile"]
    return wt["state"] != "provisioning" or any(r["state"] != "pending" for r in envfile)


# -- remove ------------------------------------------------------------------------------


def claude_remove(stream: IO[str], environ: dict[str, str], client: Client, say: Say) -> int:
    """WorktreeRemove: release the worktree's resources (data kept unless configured),
    remove it and the branch claude-create made for it, as Claude does. 0 once it is gone;
    1 while it is still there (Claude then keeps it and shows why)."""
    data = read_hook_input(stream)
    raw = data.get("worktree_path")
    if not isinstance(raw, str) or not os.path.isabs(raw):
        raise UsageError("hook input has no absolute \"worktree_path\"")
    path = Path(raw)
    if not path.exists():
        say(f"{path} is already gone")
        return 0
    why = _not_removable(path, environ)
    if why:
        say(f"devd: {path} {why}; left in place")
        return 1
    common = Path(git(path, "rev-parse", "--path-format=absolute", "--git-common-dir")
                  .stdout.strip())
    branch = git(path, "branch", "--show-current", check=False).stdout.strip()
    release_data = bool(claude_config(path).get("release_data", False))
    # From the common dir: git refuses to remove the worktree it runs in, and it never
    # removes the main worktree, so a wrong path cannot take the repository with it. Git
    # first, release after (as gc does for a gone worktree): a worktree git keeps (locked,
    # a submodule) keeps its ports and database too.
    result = git(common, "worktree", "remove", "--force", str(path), check=False)
    if result.returncode != 0:
        say(f"devd: git could not remove {path}: {result.stderr.strip()}")
        return 1
    say(f"removed worktree {path}")
    if branch == f"worktree-{path.name}":  # the branch claude-create made for it
        deleted = git(common, "branch", "-D", branch, check=False)
        say(f"deleted branch {branch}" if deleted.returncode == 0
            else f"warning: could not delete branch {branch}: {deleted.stderr.strip()}")
    _release(client, path, release_data, say)
    return 0


def _not_removable(path: Path, environ: dict[str, str]) -> str | None:
    """Why `path` is no worktree of this session's repo to remove, checked before anything
    is released: the main worktree, another repository's, a directory inside a worktree (it
    would take the whole enclosing one) and a plain directory are never Claude's."""
    if not is_worktree_root(path):
        return "is not the root of a git worktree"
    _, common = main_root(path)
    if not _linked_worktree(path, common):
        return "is the main worktree of its repository, not one Claude made"
    project = environ.get("CLAUDE_PROJECT_DIR")
    try:
        mine = main_root(Path(project))[1] if project and os.path.isabs(project) else common
    except NotAWorktree:
        mine = common
    if mine != common:
        return f"belongs to another repository than this session's ({project})"
    return None


def _release(client: Client, path: Path, yes: bool, say: Say) -> None:
    """Free devd's resources; a failure here never keeps the worktree (gc frees them)."""
    try:
        client.call("release", {"path": str(path), "yes": yes},
                    deadline=time.monotonic() + RELEASE_DEADLINE)
        say(f"released devd's resources for {path}")
    except NotRegistered:
        say(f"{path} was not registered with devd; nothing to release")
    except UsageError as exc:  # data-bearing resources and release_data off: keep them
        say(f"kept {path}'s resources: {exc.message}; `devd gc` frees them after the grace")
    except DevdError as exc:
        say(f"devd could not release {path}: {exc.message}")


# -- session environment ----------------------------------------------------------------


def claude_env(stream: IO[str], environ: dict[str, str], client: Client, say: Say) -> str:
    """SessionStart: append to $CLAUDE_ENV_FILE (which Claude sources before each Bash
    command) a script giving each command the environment of the worktree it runs in: the
    session's worktree's exports inline, and, for a worktree Claude makes later under the
    worktree dir (EnterWorktree, a subagent's), `devd env` at that moment (about 0.1 s).
    Returns a line for the model (stdout is its context); never fails the session."""
    data = read_hook_input(stream)
    where = data.get("cwd") or environ.get("CLAUDE_PROJECT_DIR")
    target = environ.get("CLAUDE_ENV_FILE")
    if not isinstance(where, str) or not os.path.isabs(where) or not target:
        raise UsageError("need an absolute cwd in the hook input and CLAUDE_ENV_FILE set",
                         "install it with `devd hook install --claude` (SessionStart)")
    try:
        repo, _ = main_root(Path(where))
        here = toplevel(Path(where))  # a session started in a subdirectory: its worktree
    except NotAWorktree:
        return ""  # a session outside any git repo: nothing of devd's
    place = Path(str(claude_config(repo).get("worktree_dir", ".claude/worktrees")))
    later = Path(os.path.normpath(repo / place.expanduser()))
    # Before every Bash command there: a daemon that is down costs nothing, a stuck one
    # ENV_IDLE seconds (not the CLI's 5), and no daemon is ever started from here.
    ask = f'eval "$(DEVD_NO_AUTOSTART=1 DEVD_TIMEOUT={ENV_IDLE:g} devd env 2>/dev/null)"'
    cases = [(later, ask)]
    note = ""
    try:
        wt = wait_until(client, here, ENV_TIMEOUT, _ports_settled, register_grace=0.0)
        env = client.call("env", {"path": str(wt["path"])})["env"]
    except NotRegistered:
        env = {}  # not a worktree devd knows (yet): only later ones get theirs
    except DevdError as exc:
        say(f"devd: {exc.message}")
        env, note = {}, (f"devd could not load this worktree's environment ({exc.message}); "
                         "PORT and DATABASE_URL are not set for Bash: run `devd provision`")
    if env:
        exports = "; ".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
        # Still provisioning (a database on its way): inline values would pin its failing
        # placeholders for the whole session, so each command asks, as in later worktrees.
        settled = finished(wt)
        mine = (Path(wt["path"]), own_checkout_only(Path(wt["path"]), exports, ask)
                if settled else ask)
        # The more specific directory first: a worktree under the worktree dir, or the
        # worktree dir inside the (main) worktree.
        cases.insert(1 if later.is_relative_to(mine[0]) else 0, mine)
        shown = ", ".join(f"{k}={env[k]}" for k in ("PORT", "DEVD_WORKTREE") if k in env)
        note = (f"devd: Bash commands here get this worktree's environment ({shown}"
                f"{', DATABASE_URL' if 'DATABASE_URL' in env else ''}"
                f"{'' if settled else ', the rest once provisioned'}); see `devd status`")
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(env_script(cases))
    return note


def own_checkout_only(root: Path, exports: str, elsewhere: str) -> str:
    """`exports` where $PWD's nearest checkout is `root` itself; `elsewhere` in a checkout
    nested in it (a worktree kept inside the main one, a submodule): never root's PORT."""
    top = shlex.quote(str(root))
    return (f'_devd_d=$PWD; while [ -n "$_devd_d" ] && [ "$_devd_d" != {top} ] && '
            f'[ ! -e "$_devd_d/.git" ]; do _devd_d=${{_devd_d%/*}}; done; '
            f'if [ "$_devd_d" = {top} ]; then {exports}; else {elsewhere}; fi; unset _devd_d')


def env_script(cases: list[tuple[Path, str]]) -> str:
    """A `case` on $PWD: the first directory containing it gives its commands."""
    arms = "".join(f"  {shlex.quote(str(path) + '/')}*) {command};;\n"
                   for path, command in cases)
    return f'# devd: the environment of the worktree each command runs in\ncase "$PWD/" in\n' \
           f"{arms}esac\n"


def _ports_settled(wt: dict[str, Any]) -> bool:
    ports = [r for r in wt.get("resources", []) if r.get("kind") == "ports"]
    return wt["state"] != "provisioning" or any(r["state"] != "pending" for r in ports)
