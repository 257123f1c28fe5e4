"""Hook entry points: git's post-checkout; installing Claude Code's hooks (devd/claude.py
runs them); waiting for a worktree.

Contracts (each one a trap when broken):
- git post-checkout: must never fail or hold up git. devd runs detached with every fd on
  /dev/null, only for a new linked worktree's first checkout (see GIT_BLOCK).
- Claude Code's hooks: see devd/claude.py.
Light imports only: these run from hooks, where every millisecond is someone's wait.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from devd.client import Client
from devd.errors import DevdError, NotAWorktree, NotRegistered, OwnershipConflict, UsageError
from devd.git import admin_dir as git_admin_dir
from devd.paths import write_atomic

Say = Callable[[str], None]
BEGIN = "# >>> devd: provision new worktrees (devd hook install --git); edit outside it >>>"
END = "# <<< devd <<<"
_BLOCK = re.compile(rf"^{re.escape(BEGIN)}\n.*?^{re.escape(END)}\n?", re.M | re.S)
# A new worktree's first checkout has an all-zero previous HEAD (40 or 64 zeros); so has a
# checkout that leaves an orphan (unborn) branch, or a clone. Only a linked worktree (`.git`
# is a file, so never the main one) whose HEAD log does not end in a checkout (an orphan's
# does: "checkout: moving from ...") is new. Shell builtins only: every checkout pays for
# this. The git variables are dropped: they would point a daemon this starts elsewhere.
GIT_BLOCK = f"""{BEGIN}
case "$1" in *[!0]*|'') ;; *)
  devd_new=
  if [ -f .git ]; then
    devd_new=1 devd_gd=
    IFS= read -r devd_gd < .git || :
    devd_gd=${{devd_gd#gitdir: }}
    case $devd_gd in /*) ;; *) devd_gd=$PWD/$devd_gd ;; esac
    if [ -f "$devd_gd/logs/HEAD" ]; then
      while IFS= read -r devd_line || [ -n "$devd_line" ]; do
        case $devd_line in *"\tcheckout: moving from "*) devd_new= ;; *) devd_new=1 ;; esac
      done < "$devd_gd/logs/HEAD"
    fi
  fi
  if [ -z "$devd_new" ]; then :
  elif command -v devd >/dev/null 2>&1; then
    (unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_PREFIX
     nohup devd provision --background . </dev/null >/dev/null 2>&1 &) || :
  else
    echo 'devd: not on PATH; this worktree was not provisioned (run: devd provision)' >&2
  fi ;;
esac
{END}
"""
SHELLS = ("sh", "bash", "dash", "zsh", "ksh")
# WorktreeRemove's exit status is Claude's word for "removed" (non-zero: it keeps the
# worktree and shows stderr); SessionStart loads the worktree's env for Bash.
CLAUDE_COMMANDS = {"WorktreeCreate": "devd hook claude-create",
                   "WorktreeRemove": "devd hook claude-remove",
                   "SessionStart": "devd hook claude-env"}
# What older devd installed: replaced in place by `hook install --claude`.
LEGACY_COMMANDS = {"devd hook claude-remove || true": "devd hook claude-remove"}
MAX_INPUT = 1 << 20
POLL = 0.2
# Hooks are someone's wait: git gets this long per command, and claude-remove's release
# this long in all (Claude Code gives a hook 600 s, but a person watches the removal).
GIT_TIMEOUT = 30.0
RELEASE_DEADLINE = 20.0
GIT_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX")


def git(cwd: Path, *args: str, check: bool = True, stdout: int | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run git in cwd, ignoring any GIT_DIR a calling hook exported."""
    env = {k: v for k, v in os.environ.items() if k not in GIT_ENV_DROP}
    try:
        result = subprocess.run(["git", "-C", str(cwd), *args], env=env, text=True,
                                timeout=GIT_TIMEOUT, check=False, stderr=subprocess.PIPE,
                                stdout=stdout if stdout is not None else subprocess.PIPE)
    except subprocess.TimeoutExpired:
        raise DevdError(f"git {args[0]} in {cwd} did not finish within {GIT_TIMEOUT:g} s",
                        "a hook must not hang: see what holds the repository's lock",
                        code="timeout") from None
    if check and result.returncode != 0:
        raise NotAWorktree(f"git {args[0]} in {cwd} failed: {result.stderr.strip()}",
                           "run it inside a git repository")
    return result


def toplevel(path: Path) -> Path:
    if not path.is_dir():
        raise NotAWorktree(f"{path} is not a directory", "pass a path inside a git repository")
    return Path(git(path, "rev-parse", "--show-toplevel").stdout.strip()).resolve()


# -- git -------------------------------------------------------------------------


def install_git_hook(path: Path, say: Say, global_hooks_path: bool = False) -> Path:
    """Add devd's block to the repo's post-checkout hook (core.hooksPath honoured); with
    husky 9, to `.husky/post-checkout`, the file of yours its generated hook runs."""
    hooks = _hooks_dir(path, global_hooks_path)
    husky = hooks.parent if (hooks.name, hooks.parent.name) == ("_", ".husky") else None
    target = (husky or hooks) / "post-checkout"
    if target.is_symlink():
        raise OwnershipConflict(f"{target} is a symlink; devd will not write through it",
                                _manual_hint())
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_keeping_mode(target, "#!/bin/sh\n" + GIT_BLOCK, 0o755)
        say(f"wrote {target}" + (HUSKY_NOTE if husky else ""))
        return target
    text = target.read_text(encoding="utf-8", errors="surrogateescape")
    _refuse_managed(target, text)
    new = _with_block(target, text, executable=husky is None)
    if new == text:
        say(f"{target} already runs devd")
    else:
        _write_keeping_mode(target, new, target.stat().st_mode & 0o7777)
        say(f"added devd to your existing {target} (your lines are unchanged)"
            + (HUSKY_NOTE if husky else ""))
    return target


# husky 9 runs .husky/post-checkout (with `sh -e`) from its generated .husky/_/post-checkout,
# which every `npm install` writes anew: devd's block lives in the file that stays.
HUSKY_NOTE = ("; husky runs it. Commit it: a worktree made from another worktree runs that "
              "worktree's copy")


def _hooks_dir(path: Path, global_ok: bool) -> Path:
    """The repo's hooks dir; one set in the global or system config serves every repository
    on the machine, so it is refused unless asked for."""
    scope = git(path, "config", "--show-scope", "--get", "core.hooksPath", check=False)
    where, _, value = scope.stdout.strip().partition("\t")
    if scope.returncode == 0 and where in ("global", "system") and not global_ok:
        own = git(path, "rev-parse", "--path-format=absolute", "--git-common-dir").stdout.strip()
        raise OwnershipConflict(
            f"core.hooksPath is set in your {where} git config ({value}): a hook there runs "
            "in every repository on this machine",
            "pass --global-hooks-path to install there anyway, or give this repository its "
            f"own hooks: `git -C {shlex.quote(str(path))} config core.hooksPath "
            f"{shlex.quote(own + '/hooks')}`")
    return Path(git(path, "rev-parse", "--path-format=absolute", "--git-path", "hooks")
                .stdout.strip())


# Hook managers that write post-checkout themselves (and write it again on their next
# install, dropping devd's lines): devd is added to their config instead.
LEFTHOOK_HINT = ("add to lefthook.yml:\n  post-checkout:\n    commands:\n      devd:\n"
                 "        run: devd hook post-checkout {0}\nthen run `lefthook install`")
PRE_COMMIT_HINT = (
    "add to .pre-commit-config.yaml:\n  - repo: local\n    hooks:\n      - id: devd\n"
    "        name: devd provision\n        entry: devd hook post-checkout\n"
    "        language: system\n        stages: [post-checkout]\n        always_run: true\n"
    "        pass_filenames: false\nthen run `pre-commit install --hook-type post-checkout`")
MANAGED = {("call_lefthook", '"$LEFTHOOK" = "0"'): ("lefthook", LEFTHOOK_HINT),
           ("File generated by pre-commit",): ("pre-commit", PRE_COMMIT_HINT)}


def _refuse_managed(target: Path, text: str) -> None:
    for markers, (tool, hint) in MANAGED.items():
        if any(marker in text for marker in markers) and not _BLOCK.search(text):
            raise OwnershipConflict(f"{target} is generated by {tool}, which would drop "
                                    "devd's lines on its next install", hint)


def _with_block(target: Path, text: str, executable: bool = True) -> str:
    """The hook with devd's block, right after the shebang, so an `exit` of yours cannot skip it."""
    if _BLOCK.search(text):
        return _BLOCK.sub(lambda _: GIT_BLOCK, text, count=1)
    if executable and not os.access(target, os.X_OK):
        raise OwnershipConflict(f"{target} exists but is not executable, so git ignores it",
                                "make it executable or remove it, then run this again")
    first, newline, rest = text.partition("\n")
    if not first.startswith("#!"):
        return GIT_BLOCK + text  # no shebang: git runs it with sh
    words = first[2:].split()
    interpreter = Path(words[1] if words and Path(words[0]).name == "env" and len(words) > 1
                       else (words or [""])[0]).name
    if interpreter not in SHELLS:
        raise OwnershipConflict(f"{target} is a {interpreter or 'non-shell'} script; devd only "
                                "adds itself to shell hooks", _manual_hint())
    return first + newline + GIT_BLOCK + rest


def _manual_hint() -> str:
    return 'call devd from your hook yourself: `devd hook post-checkout "$@"`'


def post_checkout(args: list[str], environ: dict[str, str], cwd: Path) -> bool:
    """`devd hook post-checkout PREV NEW FLAG` (pre-commit passes them as PRE_COMMIT_*):
    the block's rules in Python, for hook managers that call commands. Starts provisioning
    detached and returns at once; True if it did. Never fails git."""
    prev = args[0] if args else environ.get("PRE_COMMIT_FROM_REF", "")
    if not is_new_worktree(prev, cwd):
        return False
    env = {k: v for k, v in environ.items() if k not in GIT_ENV_DROP}
    subprocess.Popen([sys.executable, "-P", "-m", "devd", "provision", "--background",
                      str(cwd)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, env=env, cwd="/")
    return True


def is_new_worktree(prev: str, top: Path) -> bool:
    """A linked worktree's first checkout: previous HEAD all zeros, `.git` a file, and a
    HEAD log that does not end in a checkout (leaving an orphan branch ends in one)."""
    admin = git_admin_dir(top) if prev and not prev.strip("0") else None
    if admin is None:
        return False
    head_log = admin / "logs" / "HEAD"
    # No reflog (core.logAllRefUpdates off), or no regular file (a FIFO would hold git's
    # hook up: never read), as the shell block sees it: the zeros are all there is.
    if not head_log.is_file():
        return True
    try:
        lines = head_log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    return not lines or "\tcheckout: moving from " not in lines[-1]


def _write_keeping_mode(target: Path, text: str, mode: int) -> None:
    # write_atomic's temp file is new (O_EXCL): a fixed name could be a checked-in symlink
    # that the write would follow out of the repository.
    write_atomic(target, text.encode("utf-8", "surrogateescape"), mode)


# -- Claude Code: settings -----------------------------------------------------------


def install_claude_hooks(path: Path, say: Say) -> Path:
    """Merge devd's hooks (CLAUDE_COMMANDS) into <repo>/.claude/settings.json."""
    target = toplevel(path) / ".claude" / "settings.json"
    settings = _json_object(target)
    hooks = settings.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise UsageError(f"{target}: \"hooks\" is not an object", "fix the file, then retry")
    added = [event for event, command in CLAUDE_COMMANDS.items()
             if _add_command(target, hooks, event, command)]
    if not added:
        say(f"{target} already calls devd")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_keeping_mode(target, json.dumps(settings, indent=2, ensure_ascii=False) + "\n",
                        target.stat().st_mode & 0o777 if target.exists() else 0o644)
    say(f"added {', '.join(added)} to {target} (other settings unchanged)")
    return target


def _json_object(target: Path) -> dict[str, Any]:
    if not target.exists():
        return {}
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UsageError(f"{target} is not valid JSON ({exc}); devd will not rewrite it",
                         "fix the file, then run this again") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{target} is not a JSON object", "fix the file, then run this again")
    return data


def _add_command(target: Path, hooks: dict[str, Any], event: str, command: str) -> bool:
    groups = hooks.setdefault(event, [])
    if not isinstance(groups, list):
        raise UsageError(f"{target}: hooks.{event} is not a list", "fix the file, then retry")
    entries = [hook for group in groups if isinstance(group, dict)
               for hook in group.get("hooks", []) if isinstance(hook, dict)]
    for hook in entries:
        if LEGACY_COMMANDS.get(hook.get("command", "")) == command:
            hook["command"] = command
            return True
    present = [hook.get("command") for hook in entries]
    if command in present:
        return False
    if event == "WorktreeCreate" and present:
        # Two create hooks would make two worktrees for one agent: the user must choose.
        raise OwnershipConflict(f"{target} already has a WorktreeCreate hook ({present[0]!r})",
                                f"remove it, or call `{command}` from it")
    groups.append({"hooks": [{"type": "command", "command": command}]})
    return True


# -- Claude Code: hook input ------------------------------------------------------------


def read_hook_input(stream: IO[str]) -> dict[str, Any]:
    """The hook's JSON object from stdin, or a UsageError saying what is wrong with it."""
    raw = stream.read(MAX_INPUT + 1)
    if len(raw) > MAX_INPUT:
        raise UsageError("hook input is larger than 1 MiB", "Claude Code sends a small object")
    if not raw.strip():
        raise UsageError("hook input is empty", "expected a JSON object on stdin")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"hook input is not JSON ({exc})", "expected a JSON object") from exc
    if not isinstance(data, dict):
        raise UsageError("hook input is not a JSON object", 'expected {"name": ...}')
    return data


def claude_config(repo: Path) -> dict[str, Any]:
    """The [claude] section of the repo's devd.toml (the daemon validates the whole file)."""
    try:
        with open(repo / "devd.toml", "rb") as handle:
            section = tomllib.load(handle).get("claude", {})
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DevdError(f"{repo / 'devd.toml'}: {exc}", "fix the file", code="config") from exc
    return section if isinstance(section, dict) else {}


# -- waiting ---------------------------------------------------------------------------


def finished(wt: dict[str, Any]) -> bool:
    return bool(wt["state"] != "provisioning")


def wait_until(client: Client, path: Path, timeout: float,
               done: Callable[[dict[str, Any]], bool] = finished,
               register_grace: float = 10.0) -> dict[str, Any]:
    """Poll the worktree at `path` until `done`; a hook may still be registering it."""
    start = time.monotonic()
    while True:
        wt = _registered(client, path)
        if wt is not None and done(wt):
            return wt
        waited = time.monotonic() - start
        if wt is None and waited > min(register_grace, timeout):
            raise NotRegistered(f"{path} is not registered with devd",
                                f"run `devd provision {path}`, or install the git hook")
        if waited > timeout:
            raise DevdError(f"{path} is still {wt['state'] if wt else 'unregistered'} after "
                            f"{timeout:g} s", "see `devd status`", code="timeout")
        time.sleep(POLL)


def _registered(client: Client, path: Path) -> dict[str, Any] | None:
    """The worktree registered at exactly `path` (not a registered worktree around it)."""
    try:
        found = client.call("status", {"path": str(path)})["worktrees"]
    except NotRegistered:
        return None
    exact = [wt for wt in found if Path(wt["path"]) == path.resolve()]
    return exact[0] if exact else None


def is_worktree_root(path: Path) -> bool:
    """True if `path` is the top directory of a git worktree."""
    result = git(path, "rev-parse", "--show-toplevel", check=False)
    return result.returncode == 0 and Path(result.stdout.strip()).resolve() == path.resolve()
