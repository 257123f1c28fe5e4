"""devd's Claude Code hooks against the real `claude` CLI (tests/claudecode.py): the same
outcomes as Claude Code without a hook, and the worktree's env in its Bash tool.

What Claude Code 2.1.197 does natively, observed with these scenarios (no hook):
- `claude -w NAME` makes <main repo>/.claude/worktrees/NAME on branch worktree-NAME, based on
  origin/<default branch> (not the local HEAD) when origin has it, else HEAD; it copies
  .claude/settings.local.json and the ignored files .worktreeinclude names.
- `-w NAME` again resumes that worktree (its files kept); after `git worktree remove` the
  name is reused (`git worktree add -B`: the left-over branch starts afresh from the base).
- '/' in a name becomes '+' (a/b → .claude/worktrees/a+b, branch worktree-a+b); names over
  64 characters are refused before any hook runs.
- `-w '#7'` fetches origin's pull/7/head (a hook sees the name pr-7).
- From a session inside a linked worktree, `-w` and subagent worktrees go under the main repo.
- EnterWorktree + ExitWorktree(remove) deletes the worktree and its branch.
- A subagent with `isolation: "worktree"` gets agent-<id>; unchanged, it is removed with its
  branch when it ends; with a change, kept. With a WorktreeCreate hook Claude keeps every
  one and never fires WorktreeRemove: devd's reconcile loop removes the unchanged ones.
- With a hook, ExitWorktree(remove) cannot verify the worktree is clean and asks for
  `discard_changes: true` (Claude's limit, not the hook's), so the scenario passes it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgsupport import env_of, query, start_server
from psycopg import sql

from devd import naming
from devd.postgres import names as pgnames
from tests.claudecode import Claude, claude_binary, claude_cli, stand_in, tool_use
from tests.conftest import Devd, devd_shim, run_git, wait_for

__all__ = ["claude_binary", "claude_cli", "stand_in"]  # fixtures, used by name

NATIVE_SETTINGS = {"permissions": {"allow": []}}
PORTS_ONLY = '[ports]\nnames = ["web"]\n'


@pytest.fixture
def devd_path(tmp_path: Path, devd_home: Devd) -> dict[str, str]:
    """What Claude's hooks need: a `devd` on PATH running this checkout, and DEVD_HOME."""
    bin_dir = devd_shim(tmp_path / "bin")
    return {k: v for k, v in devd_home.env.items() if k.startswith("DEVD_")} | {
        "PATH": f"{bin_dir}:{devd_home.env['PATH']}", "PYTHONPATH": devd_home.env["PYTHONPATH"]}


def make_project(base: Path, settings: dict[str, object], devd_toml: str = PORTS_ONLY
                 ) -> tuple[Path, dict[str, str]]:
    """A repo whose origin (a local bare repo) is one commit ahead and has pull/7/head, with
    the given .claude/settings.json and devd.toml committed; returns it and commit ids by
    name."""
    origin, main, other = base / "origin.git", base / "shop", base / "other"
    run_git(base, "init", "-q", "--bare", "-b", "main", str(origin))
    main.mkdir()
    run_git(main, "init", "-q", "-b", "main")
    files = {".gitignore": ".env\nsecrets.json\n.claude/settings.local.json\n",
             ".worktreeinclude": "secrets.json\n", "devd.toml": devd_toml,
             ".claude/settings.json": json.dumps(settings, indent=2)}
    for rel, text in files.items():
        (main / rel).parent.mkdir(parents=True, exist_ok=True)
        (main / rel).write_text(text)
    run_git(main, "add", "-A")
    run_git(main, "commit", "-qm", "c1")
    run_git(main, "remote", "add", "origin", str(origin))
    run_git(main, "push", "-q", "origin", "main")
    run_git(base, "clone", "-q", str(origin), str(other))
    for name, ref in (("c2", "main"), ("pr7", "refs/pull/7/head")):
        (other / f"{name}.txt").write_text(name)
        run_git(other, "add", "-A")
        run_git(other, "commit", "-qm", name)
        run_git(other, "push", "-q", "origin", f"HEAD:{ref}")
    run_git(main, "fetch", "-q", "origin")
    (main / "secrets.json").write_text("{}")
    (main / ".claude" / "settings.local.json").write_text('{"env": {}}')
    names = {run_git(main, "rev-parse", "main").strip(): "c1",
             run_git(main, "rev-parse", "origin/main").strip(): "c2",
             run_git(other, "rev-parse", "HEAD").strip(): "pr7"}
    return main, names


def hook_settings(devd_home: Devd, tmp_path: Path) -> dict[str, object]:
    """The .claude/settings.json `devd hook install --claude` writes (into a scratch repo)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    run_git(probe, "init", "-q")
    devd_home.run("hook", "install", "--claude", str(probe))
    return dict(json.loads((probe / ".claude" / "settings.json").read_text()))


def outcome(base: Path, main: Path, names: dict[str, str]) -> dict[str, object]:
    """Worktrees (path, branch, base commit, files) and branches, with agent ids and
    absolute paths taken out, so a native run and a devd run compare equal."""
    def norm(text: str) -> str:
        return re.sub(r"agent-[0-9a-f]+", "agent-*", text.replace(str(base), "BASE"))

    listed = run_git(main, "worktree", "list", "--porcelain").split("\n\n")
    trees = []
    for entry in filter(None, (e.strip() for e in listed)):
        fields = dict((line.split(" ", 1) + [""])[:2] for line in entry.splitlines())
        path = Path(fields["worktree"])
        files = sorted(rel for p in path.rglob("*") if p.is_file() and ".git" not in p.parts
                       and p.name != ".env" and not (rel := str(p.relative_to(path)))
                       .startswith(".claude/worktrees/"))
        trees.append([norm(str(path)), norm(fields.get("branch", "")),
                      names.get(fields["HEAD"], "new"), files])
    branches = run_git(main, "branch", "--format=%(refname:short)").split()
    return {"worktrees": sorted(trees), "branches": sorted(norm(b) for b in branches)}


def scenario(claude: Claude, base: Path, main: Path, names: dict[str, str],
             env: dict[str, str]) -> list[tuple[str, int, dict[str, object]]]:
    """The same steps for both runs; each step's exit status and the outcome after it."""
    steps: list[tuple[str, int, dict[str, object]]] = []
    feat = main / ".claude" / "worktrees" / "feat-a"

    def step(label: str, *args: str, cwd: Path = main, play: tuple = ()) -> None:
        claude.stand_in.play(*play)
        done = claude.run(cwd, *args, env=env)
        assert done.returncode == 0, (label, done.stderr)
        steps.append((label, done.returncode, outcome(base, main, names)))

    step("create", "-w", "feat-a")
    (feat / "note.txt").write_text("mine")
    step("resume", "-w", "feat-a")
    run_git(main, "worktree", "remove", "--force", str(feat))
    step("reuse", "-w", "feat-a")
    # '/' in names: tests/test_hooks.py (a/b → a+b, as observed natively).
    step("pr", "-w", "#7")
    linked = base / "linked"
    run_git(main, "worktree", "add", "-q", "-b", "linked", str(linked))
    done = [{"type": "text", "text": "done"}]  # a subagent's last turn
    step("agents, enter, exit", cwd=linked, play=(
        [tool_use("Agent", {"description": "edit", "prompt": "edit", "isolation": "worktree"})],
        [tool_use("Bash", {"command": "echo hi > new.txt"})], done,
        [tool_use("Agent", {"description": "look", "prompt": "look", "isolation": "worktree"})],
        [tool_use("Bash", {"command": "git status --short"})], done,
        [tool_use("EnterWorktree", {"name": "ew"})],
        [tool_use("ExitWorktree", {"action": "remove", "discard_changes": True})]))
    results = list(claude.stand_in.tool_results().values())
    assert sum("agentId:" in r for r in results) == 2, results  # both subagents ran
    assert any(r.startswith("Exited and removed worktree") for r in results), results
    return steps


def test_devd_hooks_give_claudes_native_outcomes(claude_cli: Claude, devd_home: Devd,
                                                 devd_path: dict[str, str],
                                                 tmp_path: Path) -> None:
    native_base, hooked_base = tmp_path / "native", tmp_path / "hooked"
    native_base.mkdir()
    hooked_base.mkdir()
    main, names = make_project(native_base, NATIVE_SETTINGS)
    native = scenario(claude_cli, native_base, main, names, {})

    main, names = make_project(hooked_base, NATIVE_SETTINGS | hook_settings(devd_home, tmp_path))
    devd_home.start()
    hooked = scenario(claude_cli, hooked_base, main, names, devd_path)
    # Claude keeps the hook-made agent worktrees: the daemon's policy removes the unchanged
    # one (a grace of 0, so a daemon started now sweeps at once), and only that one.
    devd_home.stop()
    devd_home.env["DEVD_CLAUDE_AGENT_GRACE"] = "0"
    devd_home.start()
    before = len(hooked[-1][2]["worktrees"])  # type: ignore[arg-type]

    def removed() -> bool:  # the worktree, then its branch
        now = outcome(hooked_base, main, names)
        return len(now["worktrees"]) < before and \
            now["branches"].count("worktree-agent-*") == 1  # type: ignore[arg-type,attr-defined]
    wait_for(removed, timeout=60, what="the daemon to remove the unchanged agent worktree")
    hooked[-1] = (hooked[-1][0], hooked[-1][1], outcome(hooked_base, main, names))
    for (label, code, seen), (_, hooked_code, hooked_seen) in zip(native, hooked, strict=True):
        assert [label, hooked_code, *json.dumps(hooked_seen, indent=1).splitlines()] == \
            [label, code, *json.dumps(seen, indent=1).splitlines()]
    kept = [tree for tree in hooked[-1][2]["worktrees"] if "agent-" in tree[0]]  # type: ignore[union-attr]
    assert [tree[3] for tree in kept] == [[*kept[0][3]]] and "new.txt" in kept[0][3]
    status = devd_home.status()["worktrees"]
    assert not any("agent-" in w["path"] and w["state"] != "ready" for w in status)
    devd_home.stop()


def test_bash_tool_sees_the_worktrees_env(claude_cli: Claude, devd_home: Devd,
                                          devd_path: dict[str, str], tmp_path: Path) -> None:
    """SessionStart gives Claude's Bash tool the PORT and DEVD_WORKTREE of the worktree each
    command runs in: the session's (`-w`), one entered later, a subagent's; none in the
    main checkout devd does not manage here."""
    base = tmp_path / "env"
    base.mkdir()
    main, _ = make_project(base, NATIVE_SETTINGS | hook_settings(devd_home, tmp_path))
    assert "wrote" in devd_home.run("skill", "install", str(main)).stdout
    devd_home.start()
    echo = "echo \"PORT=$PORT WT=$DEVD_WORKTREE\""
    claude_cli.stand_in.play([tool_use("Bash", {"command": echo}, "first")])
    done = claude_cli.run(main, "-w", "envy", env=devd_path)
    assert done.returncode == 0, done.stderr
    results = claude_cli.stand_in.tool_results()
    claude_cli.stand_in.play([tool_use("Bash", {"command": echo}, "main")],
                             [tool_use("EnterWorktree", {"name": "second"}, "enter")],
                             [tool_use("Bash", {"command": echo}, "second")],
                             [tool_use("ExitWorktree", {"action": "keep"}, "exit")],
                             [tool_use("Bash", {"command": echo}, "back")],
                             [tool_use("Agent", {"description": "a", "prompt": "a",
                                                 "isolation": "worktree"}, "agent")],
                             [tool_use("Bash", {"command": echo}, "sub")])
    done = claude_cli.run(main, env=devd_path)
    assert done.returncode == 0, done.stderr
    results |= claude_cli.stand_in.tool_results()
    # Claude offers the model the devd skill (from .claude/skills/devd/SKILL.md).
    assert "tests and databases in this git worktree" in json.dumps(claude_cli.stand_in.requests)
    agent = re.search(r"worktreePath: (\S+)", results["agent"])
    assert agent is not None, results["agent"]
    for ident, path in (("first", main / ".claude" / "worktrees" / "envy"),
                        ("second", main / ".claude" / "worktrees" / "second"),
                        ("sub", Path(agent[1]))):
        wt = devd_home.worktree(path)
        assert results[ident].strip() == f"PORT={wt['ports']['web']} WT={wt['path']}"
    # The main worktree is not devd's here: nothing set there, before and after.
    assert results["main"].strip() == results["back"].strip() == "PORT= WT="
    devd_home.stop()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    yield from start_server()


@pytest.mark.postgres
def test_bash_tool_sees_the_worktrees_database(claude_cli: Claude, devd_home: Devd,
                                               devd_path: dict[str, str], tmp_path: Path,
                                               pg_url: str) -> None:
    """With `[postgres] mode = "schema"`, the Bash tool of a `claude -w` session gets its
    worktree's DATABASE_URL: its own role and schema, not the main worktree's, and it
    connects; Postgres still provisioning when the session starts (an open transaction here
    holds the role's name) gives the failing placeholder only until it is ready."""
    base = tmp_path / "pg"
    base.mkdir()
    main, _ = make_project(base, NATIVE_SETTINGS | hook_settings(devd_home, tmp_path),
                           PORTS_ONLY + '\n[postgres]\nmode = "schema"\n')
    devd_home.env["DEVD_POSTGRES_URL"] = pg_url
    devd_home.start()
    devd_home.run("provision", str(main))
    tree = main / ".claude" / "worktrees" / "pg"
    name = pgnames.identifier(naming.worktree_id(main, tree))
    with psycopg.connect(pg_url, connect_timeout=10) as blocker:
        blocker.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(name)))
        # The model's first command lets devd's CREATE ROLE go on, then waits for it.
        release = threading.Thread(target=rollback_when, args=(blocker, tree / "go"))
        release.start()
        claude_cli.stand_in.play(
            [tool_use("Bash", {"command": 'touch go; devd wait >/dev/null; echo "$DATABASE_URL"'},
                      "pending")],
            [tool_use("Bash", {"command": 'echo "$DATABASE_URL"'}, "url")])
        done = claude_cli.run(main, "-w", "pg", env=devd_path)
        release.join()
    assert done.returncode == 0, done.stderr
    results = claude_cli.stand_in.tool_results()
    assert "devd-postgres-pending" in results["pending"], results
    url = results["url"].strip()
    assert url == env_of(devd_home, tree)["DATABASE_URL"] != env_of(devd_home, main)["DATABASE_URL"]
    assert query(url, "SELECT current_user, current_schema()") == [(name, name)]
    devd_home.stop()


def rollback_when(conn: psycopg.Connection[Any], flag: Path) -> None:
    try:
        wait_for(flag.exists, timeout=120, what=f"{flag} (the model's first command)")
    finally:
        conn.rollback()
