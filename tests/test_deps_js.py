"""pnpm, yarn (classic and berry) and bun per worktree, for real, against the npm registry.

The package managers are npm packages themselves: the session installs them with npm into a
prefix of its own (nothing on the machine changes) and puts its bin dir on the daemon's PATH.
bun's binary comes from the registry too (@oven/bun-<platform>, an optional dependency).
Every download cache and store (npm, pnpm, yarn, bun) lives in one dir per session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Devd, Repo, run_git
from test_deps import (
    IGNORE,
    LONG,
    _unavailable,
    assert_real_tree,
    deps_of,
    provision,
)

# Majors these tests were written against; `@yarnpkg/cli-dist` is yarn berry's bundle.
TOOLS = ["pnpm@12", "yarn@1", "bun@1"]
BERRY_PACKAGE = "@yarnpkg/cli-dist@4"
PACKAGE = {"name": "front", "version": "1.0.0", "private": True,
           "dependencies": {"is-number": "7.0.0"}}
BERRY = ".yarn/releases/yarn-berry.cjs"
# What each flavour runs, as devd logs it, and the lockfile that selects it.
FLAVOURS = {
    "pnpm": ("pnpm-lock.yaml", "pnpm install --frozen-lockfile"),
    "yarn": ("yarn.lock", "yarn install --frozen-lockfile"),
    "yarn-berry": ("yarn.lock", "yarn install --immutable"),
    "bun": ("bun.lock", "bun install --frozen-lockfile"),
}


@pytest.fixture(scope="session")
def js_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caches and stores of every package manager, shared by the whole session."""
    if not shutil.which("npm"):
        _unavailable("npm is not installed (it installs pnpm, yarn and bun for these tests)")
    return tmp_path_factory.mktemp("js-home")


def js_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """Variables that aim every package manager's cache and store into `home`."""
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "npm_config_cache": str(home / "npm"), "npm_config_update_notifier": "false",
        # pnpm 11+ reads pnpm_config_*, older ones npm_config_*.
        "pnpm_config_store_dir": str(home / "pnpm-store"),
        "npm_config_store_dir": str(home / "pnpm-store"),
        "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_STATE_HOME": str(home / "state"), "XDG_CONFIG_HOME": str(home / "config"),
        "YARN_CACHE_FOLDER": str(home / "yarn-cache"),
        "YARN_GLOBAL_FOLDER": str(home / "yarn-berry"),
        "YARN_ENABLE_TELEMETRY": "0",
        "BUN_INSTALL_CACHE_DIR": str(home / "bun-cache"),
    }


@pytest.fixture(scope="session")
def js_tools(js_home: Path) -> dict[str, str]:
    """pnpm, yarn and bun installed with npm into a prefix of this session, yarn berry's
    bundle into another (both declare a `yarn` bin); the variables that put them to use."""
    tools = js_home / "tools"
    env = js_env(js_home, tools / "node_modules" / ".bin")
    for prefix, packages in ((tools, TOOLS), (js_home / "berry", [BERRY_PACKAGE])):
        # Install scripts run: pnpm's and bun's link their binary from an optional dependency.
        done = subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit",
                               "--no-fund", "--no-save", *packages], capture_output=True,
                              text=True, env={**os.environ, **env}, timeout=LONG)
        if done.returncode != 0:
            _unavailable(f"npm could not install {' '.join(packages)}: {done.stderr[-2000:]}")
    return env


def full_env(js_vars: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **js_vars}


@pytest.fixture(scope="session")
def js_locks(js_tools: dict[str, str], js_home: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Each flavour's committed files (package.json, lockfile, berry's config and release),
    made once per session by the package manager itself."""
    made = {}
    for flavour in FLAVOURS:
        root = tmp_path_factory.mktemp(f"lock-{flavour}")
        (root / "package.json").write_text(json.dumps(PACKAGE, indent=2) + "\n")
        files = ["package.json", FLAVOURS[flavour][0]]
        if flavour == "yarn-berry":
            files += _berry_setup(root, js_home)
        subprocess.run(_lock_command(flavour), cwd=root, check=True, capture_output=True,
                       env=full_env(js_tools), timeout=LONG)
        made[flavour] = {name: (root / name).read_bytes() for name in files}
    # Berry's default linker (Plug'n'Play): the same lockfile, no node_modules at all.
    made["yarn-berry-pnp"] = {**made["yarn-berry"], ".yarnrc.yml": f"yarnPath: {BERRY}\n".encode()}
    return made


def _lock_command(flavour: str) -> list[str]:
    return {"pnpm": ["pnpm", "install", "--lockfile-only"],
            "yarn": ["yarn", "install", "--non-interactive", "--no-progress", "--ignore-scripts"],
            "yarn-berry": ["yarn", "install", "--mode=update-lockfile"],
            "bun": ["bun", "install", "--lockfile-only"]}[flavour]


def _berry_setup(root: Path, home: Path) -> list[str]:
    """A berry project as they are committed: the release in .yarn/releases and a
    .yarnrc.yml naming it (the `yarn` on PATH, classic, hands over to it)."""
    bundle = home / "berry" / "node_modules" / "@yarnpkg" / "cli-dist" / "bin" / "yarn.js"
    (root / BERRY).parent.mkdir(parents=True)
    shutil.copyfile(bundle, root / BERRY)
    (root / ".yarnrc.yml").write_text(f"yarnPath: {BERRY}\nnodeLinker: node-modules\n")
    (root / "yarn.lock").write_text("")  # marks root as a project of its own
    return [".yarnrc.yml", BERRY]


@pytest.fixture
def jsdevd(devd_home: Devd, js_tools: dict[str, str]) -> Iterator[Devd]:
    """A daemon whose PATH has the session's pnpm, yarn and bun."""
    devd_home.env.update(js_tools)
    devd_home.start()
    yield devd_home
    if devd_home.proc is not None:
        assert devd_home.stop() == 0, devd_home.log()


def commit_project(repo: Repo, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (repo.main / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo.main / rel).write_bytes(data)
    ignore = IGNORE + ".yarn/*\n!.yarn/releases\n.pnp.*\n"
    repo.commit({".gitignore": ignore, "devd.toml": "[deps]\n"}, "project")


def assert_own_tree(worktree: Path, env: dict[str, str]) -> None:
    """node_modules is a real dir and `is-number` resolves to a file inside this worktree
    (pnpm's top-level entries are links into the worktree's own node_modules/.pnpm)."""
    tree = worktree / "node_modules"
    assert_real_tree(tree)
    entry = tree / "is-number"
    if entry.is_symlink():
        assert (tree / ".pnpm") in Path(os.path.realpath(entry)).parents, os.readlink(entry)
    resolved = subprocess.run(["node", "-p", "require.resolve('is-number')"], cwd=worktree,
                              capture_output=True, text=True, check=True, env=env).stdout
    real = Path(os.path.realpath(resolved.strip()))
    assert worktree.resolve() in real.parents, f"is-number resolved outside: {real}"
    subprocess.run(["node", "-e", "if (!require('is-number')(7)) process.exit(1)"],
                   cwd=worktree, check=True, env=env)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_js_package_manager_per_worktree(flavour: str, jsdevd: Devd, make_repo,
                                         js_locks: dict[str, dict[str, bytes]],
                                         js_tools: dict[str, str]) -> None:
    repo: Repo = make_repo(devd_toml=None)
    commit_project(repo, js_locks[flavour])
    tool = flavour.split("-")[0]
    trees = [repo.worktree(f"front-{n}", f"feat/{n}") for n in ("a", "b")]
    for path in trees:
        result = provision(jsdevd, path)
        assert f"deps: node: ready ({tool}, install" in result.stderr, result.stderr
    for path in trees:
        assert_own_tree(path, full_env(js_tools))
        node = deps_of(jsdevd, path)["node"]
        assert (node["tool"], node["state"], node["strategy"]) == (tool, "ready", "install")
        log = Path(node["log"]).read_text()
        assert f"$ {FLAVOURS[flavour][1]}" in log, log
        for name, data in js_locks[flavour].items():  # frozen: the lockfile stays as committed
            assert (path / name).read_bytes() == data, f"{name} changed in {path}"
    assert not (repo.main / "node_modules").exists()
    # A second provision finds nothing to do; a changed lockfile shows as stale.
    assert FLAVOURS[flavour][1] not in provision(jsdevd, trees[0]).stderr
    lock = trees[1] / FLAVOURS[flavour][0]
    lock.write_bytes(lock.read_bytes() + b"\n")
    assert deps_of(jsdevd, trees[1])["node"]["state"] == "stale"
    assert deps_of(jsdevd, trees[0])["node"]["state"] == "ready"


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_js_reflink_clone_is_verified_by_its_package_manager(
        flavour: str, jsdevd: Devd, xfs_mount: Path,
        js_locks: dict[str, dict[str, bytes]], js_tools: dict[str, str]) -> None:
    main = xfs_mount / "src" / f"front-{flavour}"
    main.mkdir(parents=True)
    run_git(main, "init", "-q", "-b", "main")
    repo = Repo(main)
    commit_project(repo, js_locks[flavour])
    provision(jsdevd, main)
    wt = repo.worktree(f"front-{flavour}-b", f"feat/{flavour}")
    result = provision(jsdevd, wt)
    assert "cloning the main worktree's node_modules (reflink)" in result.stderr, result.stderr
    node = deps_of(jsdevd, wt)["node"]
    assert (node["strategy"], node["state"]) == ("reflink", "ready"), Path(node["log"]).read_text()
    assert_own_tree(wt, full_env(js_tools))
    for name, data in js_locks[flavour].items():
        assert (wt / name).read_bytes() == data, f"{name} changed by the verify"
    assert_own_tree(main, full_env(js_tools))


def test_yarn_berry_plug_n_play_is_ready_without_node_modules(
        jsdevd: Devd, make_repo, js_locks: dict[str, dict[str, bytes]],
        js_tools: dict[str, str]) -> None:
    repo: Repo = make_repo(devd_toml=None)
    commit_project(repo, js_locks["yarn-berry-pnp"])
    wt = repo.worktree("front-pnp", "feat/pnp")
    assert "yarn install --immutable" in provision(jsdevd, wt).stderr
    assert not (wt / "node_modules").exists() and (wt / ".pnp.cjs").is_file()
    resolved = subprocess.run(["yarn", "node", "-p", "require.resolve('is-number')"], cwd=wt,
                              capture_output=True, text=True, check=True,
                              env=full_env(js_tools)).stdout
    assert "is-number" in resolved
    node = deps_of(jsdevd, wt)["node"]
    assert (node["tool"], node["state"]) == ("yarn", "ready"), node
    assert jsdevd.worktree(wt)["state"] == "ready"
    assert "yarn install" not in provision(jsdevd, wt).stderr  # nothing to do the second time
