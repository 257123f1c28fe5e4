"""templates/ run the way each tool documents it, against a real daemon; `provision --wait`.

direnv is installed here and runs for real. worktrunk, git-worktree-runner, wtp and Conductor
are not installable here: each snippet is parsed as its tool would parse it and its command
runs the way the tool's documentation says it runs (shell, working dir, variables), so what
is checked is our side of the documented contract, not the tool itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, Devd, Repo, devd_shim, run_git

TEMPLATES = ROOT / "templates"
# https://worktrunk.dev/hook/: "Hook Types" and "Template variables".
WT_HOOKS = {f"{when}-{event}" for when in ("pre", "post")
            for event in ("switch", "start", "commit", "merge", "remove")}
WT_VARS = {"branch", "worktree_path", "worktree_name", "commit", "short_commit", "upstream",
           "base", "base_worktree_path", "target", "target_worktree_path", "pr_number",
           "pr_url", "repo", "repo_path", "owner", "primary_worktree_path", "default_branch",
           "remote", "remote_url", "cwd", "hook_type", "hook_name", "args"}
WT_VAR = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
# git-worktree-runner docs/configuration.md "Hooks" (git lowercases the key names).
Hook = Callable[[Repo, Path, str, dict[str, str]], subprocess.CompletedProcess[str]]
GTR_KEYS = {"hooks.postcreate", "hooks.preremove", "hooks.postremove", "hooks.postcd"}


@pytest.fixture
def tool_env(tmp_path: Path, devd_home: Devd) -> dict[str, str]:
    """The tools call plain `devd`: put one that runs this checkout first on PATH."""
    bin_dir = devd_shim(tmp_path / "tool-bin")
    return {**devd_home.env, "PATH": f"{bin_dir}{os.pathsep}{devd_home.env['PATH']}"}


def without_devd(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PATH": "/usr/bin:/bin"}


def run(argv: list[str], cwd: Path, env: dict[str, str], stdin: str = ""
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=300)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def ready(devd: Devd, path: Path) -> dict:
    """Right after a creating hook returns (no polling: `--wait` promised it was done)."""
    wt = devd.worktree(path)
    assert wt["state"] == "ready", wt
    assert set(wt["ports"]) == {"web", "api"}
    assert f"PORT_WEB={wt['ports']['web']}" in (path / ".env").read_text()
    return wt


def released(devd: Devd, path: Path) -> None:
    assert str(path) not in [wt["path"] for wt in devd.status()["worktrees"]]
    dotenv = path / ".env"
    assert not dotenv.exists() or "PORT_WEB" not in dotenv.read_text()


@pytest.fixture
def spaced(repo: Repo) -> Path:
    """A worktree whose path has a space: every snippet must quote it."""
    return repo.worktree("feat a", "feat-a")


# -- devd provision --wait ----------------------------------------------------------


def test_provision_background_wait_returns_ready(devd: Devd, spaced: Path) -> None:
    result = json.loads(devd.run("provision", "--background", "--wait", "--json",
                                 str(spaced)).stdout)
    assert result["state"] == "ready" and result["path"] == str(spaced)
    ready(devd, spaced)


def test_provision_wait_reports_a_failed_background_provision(devd: Devd, spaced: Path
                                                               ) -> None:
    (spaced / "devd.toml").write_text("[ports\n")
    result = devd.run("provision", "--background", "--wait", str(spaced), check=False)
    assert result.returncode == 1, result
    assert "failed" in result.stdout and "devd.toml" in result.stdout
    assert devd.worktree(spaced)["state"] == "failed"


def test_provision_wait_without_background_is_synchronous_as_before(devd: Devd,
                                                                     spaced: Path) -> None:
    assert json.loads(devd.run("provision", "--wait", "--json", str(spaced)).stdout
                      )["state"] == "ready"


# -- worktrunk (.config/wt.toml) -------------------------------------------------------


def worktrunk_hooks() -> dict[str, str]:
    config = tomllib.loads((TEMPLATES / "worktrunk" / "wt.toml").read_text())
    assert set(config) <= WT_HOOKS and {"post-start", "pre-remove"} <= set(config)
    # The string form: worktrunk deprecates the table form for pre-* hooks.
    assert all(isinstance(command, str) for command in config.values())
    return config


def render_worktrunk(command: str, variables: dict[str, str]) -> str:
    """Worktrunk substitutes {{ var }} shell-escaped (its docs: "Variables are shell-escaped
    automatically"); an undefined variable is an error there, so it is one here."""
    assert set(WT_VAR.findall(command)) <= WT_VARS
    return WT_VAR.sub(lambda m: shlex.quote(variables[m[1]]), command)


def worktrunk_vars(repo: Repo, path: Path, hook: str) -> dict[str, str]:
    return {"branch": "feat-a", "worktree_path": str(path), "worktree_name": path.name,
            "repo": repo.main.name, "repo_path": str(repo.main), "cwd": str(path),
            "hook_type": hook, "primary_worktree_path": str(repo.main)}


def run_worktrunk(repo: Repo, path: Path, hook: str, env: dict[str, str]
                  ) -> subprocess.CompletedProcess[str]:
    variables = worktrunk_vars(repo, path, hook)
    command = render_worktrunk(worktrunk_hooks()[hook], variables)
    # Both hooks run in the worktree; the variables also arrive as JSON on stdin.
    return run(["sh", "-c", command], path, env, stdin=json.dumps(variables))


# -- git-worktree-runner (.gtrconfig) ---------------------------------------------------------


def gtr_hooks(repo: Repo, phase: str) -> list[str]:
    """What gtr reads: `git config -f .gtrconfig --get-all hooks.<phase>` (lib/hooks.sh)."""
    config = repo.main / ".gtrconfig"
    shutil.copy(TEMPLATES / "git-worktree-runner" / ".gtrconfig", config)
    keys = run_git(repo.main, "config", "-f", str(config), "--name-only", "--list").split()
    assert set(keys) <= GTR_KEYS and {"hooks.postcreate", "hooks.preremove"} <= set(keys)
    return run_git(repo.main, "config", "-f", str(config), "--get-all",
                   f"hooks.{phase}").splitlines()


def run_gtr(repo: Repo, path: Path, phase: str, env: dict[str, str]
            ) -> subprocess.CompletedProcess[str]:
    """As gtr's run_hooks_in: bash, cwd the worktree, the documented variables exported,
    each hook `eval`ed in its own subshell."""
    exports = [f"REPO_ROOT={repo.main}", f"WORKTREE_PATH={path}", "BRANCH=feat-a"]
    script = 'for kv in "$@"; do export "$kv"; done; eval "$GTR_HOOK"'
    results = [run(["bash", "-c", script, "gtr-hook", *exports], path,
                   {**env, "GTR_HOOK": hook}) for hook in gtr_hooks(repo, phase)]
    assert len(results) == 1
    return results[0]


# -- wtp (.wtp.yml) ------------------------------------------------------------------------


def wtp_command() -> str:
    """PyYAML is no dependency of devd: check the exact shape line by line instead."""
    text = (TEMPLATES / "wtp" / ".wtp.yml").read_text()
    assert "\t" not in text
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[:3] == ["hooks:", "  post_create:", "    - type: command"]
    assert len(lines) == 4
    quoted = re.fullmatch(r"      command: '((?:[^']|'')*)'", lines[3])
    assert quoted, lines[3]
    return quoted[1].replace("''", "'")  # a YAML single-quoted scalar


def test_wtp_post_create_provisions(devd: Devd, repo: Repo, spaced: Path,
                                    tool_env: dict[str, str]) -> None:
    env = {**tool_env, "GIT_WTP_WORKTREE_PATH": str(spaced), "GIT_WTP_REPO_ROOT": str(repo.main)}
    ok(run(["sh", "-c", wtp_command()], spaced, env))  # wtp: `sh -c`, in the new worktree
    ready(devd, spaced)


# -- Conductor-style setup / archive scripts ------------------------------------------------


def conductor_env(repo: Repo, path: Path, env: dict[str, str]) -> dict[str, str]:
    """The variables Conductor documents for setup, run and archive scripts."""
    return {**env, "CONDUCTOR_WORKSPACE_NAME": path.name, "CONDUCTOR_WORKSPACE_PATH": str(path),
            "CONDUCTOR_ROOT_PATH": str(repo.main), "CONDUCTOR_DEFAULT_BRANCH": "main",
            "CONDUCTOR_PORT": "55100"}


def conductor_script(name: str) -> list[str]:
    return ["sh", str(TEMPLATES / "conductor" / name)]


@pytest.mark.parametrize("how", ["argument", "cwd"])
def test_generic_setup_script_without_conductor_variables(
        devd: Devd, repo: Repo, spaced: Path, tool_env: dict[str, str], how: str) -> None:
    argv = conductor_script("setup.sh") + ([str(spaced)] if how == "argument" else [])
    ok(run(argv, spaced if how == "cwd" else repo.main, tool_env))
    ready(devd, spaced)


def test_setup_script_fails_loudly(devd: Devd, repo: Repo, spaced: Path,
                                   tool_env: dict[str, str]) -> None:
    env = conductor_env(repo, spaced, tool_env)
    missing = run(conductor_script("setup.sh"), spaced, without_devd(env))
    assert missing.returncode == 127 and "devd: not found on PATH" in missing.stderr
    (spaced / "devd.toml").write_text("[ports\n")
    broken = run(conductor_script("setup.sh"), spaced, env)
    assert broken.returncode == 1 and "devd.toml" in broken.stdout + broken.stderr


def conductor_scripts(form: str = "conductor.json") -> dict[str, str]:
    """conductor.json (reference/conductor-json) or .conductor/settings.toml [scripts]."""
    text = (TEMPLATES / "conductor" / form).read_text()
    if form == "conductor.json":
        config = json.loads(text)
        assert set(config) <= {"scripts", "runScriptMode", "enterpriseDataPrivacy"}
    else:
        config = tomllib.loads(text)
        assert set(config) <= {"$schema", "scripts", "environment_variables"}
    assert set(config["scripts"]) <= {"setup", "run", "archive", "run_mode"}
    return config["scripts"]


# -- every tool: the creation hook returns ready, the removal hook never fails ----------------


def conductor_config(form: str) -> Hook:
    def hook(repo: Repo, path: Path, phase: str, env: dict[str, str]
             ) -> subprocess.CompletedProcess[str]:
        script = conductor_scripts(form)["setup" if phase == "create" else "archive"]
        return run(["sh", "-c", script], path, conductor_env(repo, path, env))
    return hook


def conductor_sh(repo: Repo, path: Path, phase: str, env: dict[str, str]
                 ) -> subprocess.CompletedProcess[str]:
    script = "setup.sh" if phase == "create" else "archive.sh"
    return run(conductor_script(script), path, conductor_env(repo, path, env))


# Each tool's creation and removal hook, run as that tool documents running it.
HOOKS: dict[str, Hook] = {
    "worktrunk": lambda repo, path, phase, env: run_worktrunk(
        repo, path, "post-start" if phase == "create" else "pre-remove", env),
    "gtr": lambda repo, path, phase, env: run_gtr(
        repo, path, "postCreate" if phase == "create" else "preRemove", env),
    "conductor setup.sh/archive.sh": conductor_sh,
    "conductor.json": conductor_config("conductor.json"),
    ".conductor/settings.toml": conductor_config("settings.toml"),
}


@pytest.mark.parametrize("tool", HOOKS)
def test_creation_hook_returns_ready_and_removal_hook_releases(
        devd: Devd, repo: Repo, spaced: Path, tool_env: dict[str, str], tool: str) -> None:
    ok(HOOKS[tool](repo, spaced, "create", tool_env))
    ready(devd, spaced)
    ok(HOOKS[tool](repo, spaced, "remove", tool_env))
    released(devd, spaced)


@pytest.mark.parametrize("situation", ["daemon down", "devd not installed"])
def test_removal_hooks_always_exit_zero(devd_home: Devd, repo: Repo, spaced: Path,
                                        tool_env: dict[str, str], situation: str) -> None:
    env = tool_env if situation == "daemon down" else without_devd(tool_env)
    for tool, hook in HOOKS.items():
        result = hook(repo, spaced, "remove", env)
        assert result.returncode == 0, (tool, result.stderr)


# -- direnv (.envrc), for real ---------------------------------------------------------------


@pytest.fixture
def direnv(tmp_path: Path, tool_env: dict[str, str]) -> dict[str, str]:
    """tool_env for a real direnv whose allow-list lives in tmp_path."""
    if shutil.which("direnv") is None:
        if os.environ.get("DEVD_REQUIRE_INTEGRATION") == "1":
            pytest.fail("direnv is missing (apt-get install direnv; .ci/run does it)")
        pytest.skip("direnv is not installed (apt-get install direnv)")
    dirs = {var: tmp_path / var.lower() for var in
            ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME")}
    for path in dirs.values():
        path.mkdir()
    return {**tool_env, **{var: str(path) for var, path in dirs.items()}}


def direnv_env(path: Path, env: dict[str, str]) -> tuple[dict[str, str], str]:
    """Allow the template in `path`, load it the way a shell entering `path` would."""
    shutil.copy(TEMPLATES / "direnv" / ".envrc", path / ".envrc")
    ok(run(["direnv", "allow", str(path)], path, env))
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    result = ok(run(["direnv", "exec", str(path), sys.executable, "-c", dump], path, env))
    return json.loads(result.stdout), result.stderr


def test_direnv_loads_the_worktree_environment(devd: Devd, spaced: Path,
                                               direnv: dict[str, str]) -> None:
    wt = json.loads(devd.run("provision", "--json", str(spaced)).stdout)
    env, _ = direnv_env(spaced, direnv)
    assert env["DEVD_WORKTREE"] == str(spaced) and env["DEVD_WORKTREE_ID"] == wt["id"]
    assert env["PORT"] == env["PORT_WEB"] == str(wt["ports"]["web"])
    assert env["PORT_API"] == str(wt["ports"]["api"])
    assert env["DEVD_CACHE_DIR"] == wt["cache_dir"]


def test_direnv_unprovisioned_worktree_says_what_to_do(devd: Devd, spaced: Path,
                                                       direnv: dict[str, str]) -> None:
    env, stderr = direnv_env(spaced, direnv)
    assert "PORT" not in env and "DEVD_WORKTREE" not in env
    assert "devd provision" in stderr


def test_direnv_nested_worktree_never_gets_its_parents_ports(
        devd: Devd, repo: Repo, direnv: dict[str, str]) -> None:
    devd.run("provision", str(repo.main))
    nested = repo.main / ".claude" / "worktrees" / "x"
    run_git(repo.main, "worktree", "add", "-q", "-b", "worktree-x", str(nested))
    env, stderr = direnv_env(nested, direnv)
    assert "PORT" not in env and "DEVD_WORKTREE" not in env
    assert "not provisioned" in stderr and "devd provision" in stderr
