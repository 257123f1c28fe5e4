"""Dependencies per worktree, against real npm, pip and uv and the real registries.

Lockfiles are made once per session with `npm install --package-lock-only`; one npm cache
dir is shared by the whole session so repeated installs are fast.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Devd, Repo, run_git, wait_for

from devd.jobs import JobRunner
from devd.progressbar import ProgressPrinter, render_counters

REQUIRED = os.environ.get("DEVD_REQUIRE_INTEGRATION") == "1"
SMALL = {"is-number": "7.0.0", "is-odd": "3.0.1"}
VITE = {"vite": "^7.0.0"}
IGNORE = "node_modules/\n.venv/\n.env\n.env.local\n"
LONG = 300  # seconds a provision may take on a loaded 2-core machine


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (DEVD_REQUIRE_INTEGRATION=1: these tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def npm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("npm"):
        _unavailable("npm is not installed")
    return tmp_path_factory.mktemp("npm-cache")


@pytest.fixture(scope="session")
def locks(tmp_path_factory: pytest.TempPathFactory, npm_cache: Path) -> dict[str, dict]:
    """package.json and package-lock.json texts for a small project and a Vite front end."""
    made = {}
    for name, deps in (("small", SMALL), ("vite", VITE)):
        root = tmp_path_factory.mktemp(f"lock-{name}")
        manifest = {"name": name, "version": "1.0.0", "private": True, "dependencies": deps}
        (root / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        subprocess.run(["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"],
                       cwd=root, check=True, capture_output=True, timeout=LONG,
                       env={**os.environ, "npm_config_cache": str(npm_cache)})
        made[name] = {f: (root / f).read_text() for f in ("package.json", "package-lock.json")}
    return made


@pytest.fixture
def ddevd(devd_home: Devd, npm_cache: Path) -> Iterator[Devd]:
    """A daemon whose package managers share the session's npm cache."""
    devd_home.env.update(npm_config_cache=str(npm_cache), npm_config_update_notifier="false")
    devd_home.start()
    yield devd_home
    if devd_home.proc is not None:
        assert devd_home.stop() == 0, devd_home.log()


def project(locks: dict[str, dict], node: str | None = "small", python: str | None = None,
            deps_toml: str = "", root: str = "") -> dict[str, str]:
    files = {".gitignore": IGNORE, "devd.toml": f"[deps]\n{deps_toml}"}
    if node:
        files.update({f"{root}{name}": text for name, text in locks[node].items()})
    if python:
        files[f"{root}requirements.txt"] = f"{python}\n"
    return files


def deps_of(devd: Devd, path: Path) -> dict[str, Any]:
    return devd.worktree(path)["deps"]


def provision(devd: Devd, path: Path, *args: str, check: bool = True
              ) -> subprocess.CompletedProcess[str]:
    return devd.run("provision", str(path), *args, check=check, timeout=LONG)


def assert_real_tree(tree: Path) -> None:
    assert tree.is_dir() and not tree.is_symlink(), f"{tree} is not a real directory"


# -- the plain path: npm ci and python -m venv + pip ------------------------------------


def test_npm_and_pip_install_per_worktree_and_stale_after_lock_change(
        ddevd: Devd, make_repo, locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(project(locks, python="iniconfig", deps_toml='python = "pip"\n'))
    wt = repo.worktree("shop-a", "feat/a")
    result = provision(ddevd, wt)
    assert "deps: node: ready (npm, install" in result.stderr
    assert_real_tree(wt / "node_modules")
    subprocess.run(["node", "-e", "require('is-odd')"], cwd=wt, check=True)
    subprocess.run([wt / ".venv/bin/python", "-c", "import iniconfig"], check=True)
    assert not (repo.main / "node_modules").exists() and not (repo.main / ".venv").exists()
    deps = deps_of(ddevd, wt)
    assert deps["node"]["tool"] == "npm" and deps["node"]["state"] == "ready"
    assert deps["node"]["strategy"] == "install" and deps["node"]["seconds"] > 0
    assert deps["python"]["tool"] == "pip" and deps["python"]["strategy"] == "fresh"
    assert len(deps["node"]["lock_hash"]) == 16
    status_text = ddevd.run("status", str(wt)).stdout
    assert "node: npm ready (install" in status_text and "python: pip ready" in status_text

    # A `git pull` that brings a new lockfile: stale, and only that tree is reinstalled.
    lock = wt / "package-lock.json"
    lock.write_text(lock.read_text().replace('"lockfileVersion": 3', '"lockfileVersion":  3'))
    assert deps_of(ddevd, wt)["node"]["state"] == "stale"
    assert deps_of(ddevd, wt)["python"]["state"] == "ready"
    result = provision(ddevd, wt)
    assert "node: npm ci" in result.stderr and "pip install" not in result.stderr
    assert deps_of(ddevd, wt)["node"]["state"] == "ready"
    # Nothing stale: a provision is a no-op for the trees.
    assert "npm ci" not in provision(ddevd, wt).stderr


def test_repo_without_lockfiles_gets_no_deps(ddevd: Devd, repo: Repo) -> None:
    provision(ddevd, repo.main)
    found = ddevd.worktree(repo.main)
    assert found["deps"] == {}
    assert "deps" not in [r["kind"] for r in found["resources"]]
    assert not (repo.main / "node_modules").exists()


# -- done when: a Vite front end and a Python back end, three worktrees -------------------


def test_vite_and_python_three_worktrees(ddevd: Devd, make_repo, locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    files = project(locks, node="vite", deps_toml='dirs = ["frontend", "backend"]\n',
                    root="frontend/")
    files["backend/requirements.txt"] = "iniconfig\n"
    repo.commit(files)
    provision(ddevd, repo.main)
    trees = [repo.worktree(f"shop-{n}", f"feat/{n}") for n in ("a", "b", "c")]
    procs = [subprocess.Popen([sys.executable, "-m", "devd", "provision", str(path)],
                              env=ddevd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for path in trees]
    for proc in procs:
        out, err = proc.communicate(timeout=LONG)
        assert proc.returncode == 0, err
    python_tool = "uv" if shutil.which("uv") or Path(sys.executable).with_name("uv").exists() \
        else "pip"
    for path in trees:
        front, back = path / "frontend", path / "backend"
        assert_real_tree(front / "node_modules")
        assert_real_tree(back / ".venv")
        version = subprocess.run(["npx", "--no-install", "vite", "--version"], cwd=front,
                                 capture_output=True, text=True, check=True, timeout=120)
        assert version.stdout.startswith("vite/7")
        subprocess.run([back / ".venv/bin/python", "-c", "import iniconfig"], check=True)
        deps = deps_of(ddevd, path)
        assert deps["node"]["tool"] == "npm" and deps["node"]["dir"] == "frontend"
        assert deps["python"]["tool"] == python_tool and deps["python"]["dir"] == "backend"
        for entry in deps.values():
            assert entry["state"] == "ready" and entry["strategy"] and entry["seconds"] > 0
    # A changed lockfile in one worktree shows as stale there only.
    (trees[0] / "backend/requirements.txt").write_text("iniconfig\nsix\n")
    assert deps_of(ddevd, trees[0])["python"]["state"] == "stale"
    assert deps_of(ddevd, trees[1])["python"]["state"] == "ready"


def test_uv_lock_is_synced_frozen(ddevd: Devd, make_repo) -> None:
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not os.access(uv, os.X_OK):
        _unavailable("uv is not installed (pip install uv)")
    repo: Repo = make_repo(devd_toml=None)
    repo.commit({".gitignore": IGNORE, "pyproject.toml": (
        '[project]\nname = "back"\nversion = "0.1.0"\nrequires-python = ">=3.11"\n'
        'dependencies = ["iniconfig"]\n\n[tool.uv]\npackage = false\n')})
    subprocess.run([uv, "lock", "-q"], cwd=repo.main, check=True, timeout=LONG)
    repo.commit({})
    wt = repo.worktree("shop-uv", "feat/uv")
    result = provision(ddevd, wt)
    assert "uv sync --frozen" in result.stderr
    subprocess.run([wt / ".venv/bin/python", "-c", "import iniconfig"], check=True)
    assert deps_of(ddevd, wt)["python"] | {"tool": "uv", "state": "ready"} == \
        deps_of(ddevd, wt)["python"]


# -- the symlink trap ------------------------------------------------------------------


def test_symlinked_node_modules_is_reported_and_fixed(ddevd: Devd, make_repo, locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(project(locks))
    provision(ddevd, repo.main)
    wt = repo.worktree("shop-link", "feat/link")
    (wt / "node_modules").symlink_to(repo.main / "node_modules")
    result = provision(ddevd, wt, check=False)
    assert result.returncode == 1
    assert "is a symlink" in result.stderr and "--fix-deps" in result.stderr
    assert (repo.main / "node_modules" / "is-odd").is_dir(), "main's tree must be untouched"
    node = deps_of(ddevd, wt)["node"]
    assert node["state"] == "symlinked" and "--fix-deps" in node["note"]
    assert (wt / ".env").is_file(), "other resources stay usable"

    provision(ddevd, wt, "--fix-deps")
    assert_real_tree(wt / "node_modules")
    assert (repo.main / "node_modules" / "is-odd").is_dir()
    assert deps_of(ddevd, wt)["node"]["state"] == "ready"


def test_top_level_links_into_another_worktree_are_reported(ddevd: Devd, make_repo,
                                                            locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(project(locks))
    wt = repo.worktree("shop-mixed", "feat/mixed")
    provision(ddevd, repo.main)
    provision(ddevd, wt)
    package = wt / "node_modules" / "is-odd"
    shutil.rmtree(package)
    package.symlink_to(repo.main / "node_modules" / "is-odd")
    node = deps_of(ddevd, wt)["node"]
    assert node["state"] == "symlinked" and "links into another worktree" in node["note"]
    provision(ddevd, wt, "--fix-deps")
    assert not package.is_symlink() and package.is_dir()


def test_copied_venv_is_reported(ddevd: Devd, make_repo, locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(project(locks, node=None, python="iniconfig"))
    provision(ddevd, repo.main)
    wt = repo.worktree("shop-venv", "feat/venv")
    shutil.copytree(repo.main / ".venv", wt / ".venv", symlinks=True)
    assert provision(ddevd, wt, check=False).returncode == 1
    python = deps_of(ddevd, wt)["python"]
    assert python["state"] == "symlinked" and "copied from" in python["note"]
    provision(ddevd, wt, "--fix-deps")
    subprocess.run([wt / ".venv/bin/python", "-c", "import iniconfig"], check=True)
    assert deps_of(ddevd, wt)["python"]["state"] == "ready"


# -- one job per worktree -----------------------------------------------------------------


def test_two_concurrent_provisions_of_one_worktree_install_once(ddevd: Devd, make_repo,
                                                                 locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(project(locks, node="vite"))
    wt = repo.worktree("shop-twice", "feat/twice")
    procs = [subprocess.Popen([sys.executable, "-m", "devd", "provision", str(wt)],
                              env=ddevd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for proc in procs:
        assert proc.communicate(timeout=LONG)[0] is not None
        assert proc.returncode == 0
    log = Path(deps_of(ddevd, wt)["node"]["log"]).read_text()
    assert log.count("$ npm ci") == 1, log
    subprocess.run(["npx", "--no-install", "vite", "--version"], cwd=wt, check=True,
                   capture_output=True, timeout=120)


def test_job_runner_serialises_one_key_and_limits_across_keys(tmp_path: Path) -> None:
    def hold(runner: JobRunner, key: str, events: list[str], waits: list[str]) -> None:
        with runner.job(key, lambda: True, waits.append) as job:
            events.append(f"start {key}")
            assert job.run(["sleep", "0.3"], tmp_path, dict(os.environ), 60) == 0
            events.append(f"end {key}")

    for keys, limit in ((["a", "a"], 4), (["a", "b"], 1)):
        runner, events, waits = JobRunner(tmp_path / f"jobs-{limit}", limit), [], []
        threads = [threading.Thread(target=hold, args=(runner, k, events, waits)) for k in keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        starts_and_ends = [e.split()[0] for e in events]
        assert starts_and_ends == ["start", "end", "start", "end"], events
        assert waits, "the second job said it was waiting"


# -- bad input ----------------------------------------------------------------------------


def test_lockfile_out_of_sync_fails_with_log_tail(ddevd: Devd, make_repo, locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    files = project(locks)
    manifest = json.loads(files["package.json"])
    manifest["dependencies"]["is-even"] = "1.0.0"  # not in the lockfile
    files["package.json"] = json.dumps(manifest)
    repo.commit(files)
    result = provision(ddevd, repo.main, check=False)
    assert result.returncode == 1
    assert "npm ci" in result.stderr and "failed" in result.stderr
    log_path = ddevd.home / "state" / "deps"
    assert str(log_path) in result.stderr and "  | " in result.stderr
    node = deps_of(ddevd, repo.main)["node"]
    assert node["state"] == "failed" and Path(node["log"]).is_file()
    found = ddevd.worktree(repo.main)
    assert found["state"] == "failed" and (repo.main / ".env").is_file()
    assert {r["kind"]: r["state"] for r in found["resources"]}["envfile"] == "ready"


def test_node_modules_that_is_a_file(ddevd: Devd, make_repo, locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(project(locks))
    (repo.main / "node_modules").write_text("oops\n")
    result = provision(ddevd, repo.main, check=False)
    assert result.returncode == 1 and "is not a directory" in result.stderr
    assert (repo.main / "node_modules").read_text() == "oops\n"


def test_declared_tool_that_is_missing_is_named(ddevd: Devd, make_repo) -> None:
    if shutil.which("bun"):
        pytest.skip("bun is installed here; the test needs a missing package manager")
    repo: Repo = make_repo(devd_toml=None)
    repo.commit({"package.json": "{}\n", "bun.lock": "{}\n",
                 "devd.toml": '[deps]\nnode = "bun"\n'})
    result = provision(ddevd, repo.main, check=False)
    assert result.returncode == 1 and "bun is not installed" in result.stderr


def test_bad_deps_config_names_the_key(ddevd: Devd, make_repo) -> None:
    repo: Repo = make_repo(devd_toml='[deps]\nnode = "npx"\n')
    result = provision(ddevd, repo.main, check=False)
    assert result.returncode == 1 and "deps.node" in result.stderr


@dataclass
class SilentRegistry:
    url: str
    held: list[socket.socket]  # the connections it took: a package manager is fetching


@pytest.fixture
def silent_registry() -> Iterator[SilentRegistry]:
    """A registry that accepts connections and never answers: a package manager hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield SilentRegistry(f"http://127.0.0.1:{server.getsockname()[1]}/", held)
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def hanging_project(locks: dict[str, dict], registry: str, timeout: str) -> dict[str, str]:
    files = project(locks, deps_toml=f'timeout = "{timeout}"\n')
    files[".npmrc"] = f"registry={registry}\nfetch-retries=0\nfetch-timeout=600000\n"
    return files


def test_hung_package_manager_is_stopped_at_the_timeout(ddevd: Devd, make_repo, locks,
                                                        silent_registry: SilentRegistry
                                                        ) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(hanging_project(locks, silent_registry.url, "3s"))
    result = provision(ddevd, repo.main, check=False)
    assert result.returncode == 1 and "timed out after 3 s" in result.stderr
    assert deps_of(ddevd, repo.main)["node"]["state"] == "failed"
    assert not _npm_processes_under(repo.main), "the hung npm was left running"


def test_worktree_deleted_during_install_stops_the_job(ddevd: Devd, make_repo, locks,
                                                        silent_registry: SilentRegistry
                                                        ) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(hanging_project(locks, silent_registry.url, "10m"))
    wt = repo.worktree("shop-doomed", "feat/doomed")
    provision(ddevd, wt, "--background")
    wait_for(lambda: deps_of(ddevd, wt).get("node", {}).get("state") == "installing",
             timeout=60, what="the install to start")
    log = Path(deps_of(ddevd, wt)["node"]["log"])
    # Deleted once npm hangs on the registry: before, it is making node_modules' sparse tree
    # (its mkdirs raced rmtree, or made the tree anew before devd could stop it).
    wait_for(lambda: silent_registry.held, what="npm to fetch from the registry")
    shutil.rmtree(wt)
    wait_for(lambda: "the worktree was deleted" in log.read_text(), timeout=60,
             what="the job to notice the deletion")
    wait_for(lambda: "job finished" in log.read_text().split("the worktree was deleted")[-1],
             timeout=60, what="the job to end")
    assert not wt.exists(), "nothing may be written where the worktree was"
    assert not _npm_processes_under(wt)
    run_git(repo.main, "worktree", "prune")


def _npm_processes_under(path: Path) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if "npm" in " ".join(proc.info["cmdline"] or []) and \
                    str(proc.info["cwd"] or "").startswith(str(path)):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


# -- the reflink fast path ---------------------------------------------------------------


def test_reflink_clone_of_main_tree_on_xfs(ddevd: Devd, locks, xfs_mount: Path) -> None:
    main = xfs_mount / "src" / "front"
    main.mkdir(parents=True)
    run_git(main, "init", "-q", "-b", "main")
    repo = Repo(main)
    repo.commit(project(locks, node="vite"))
    provision(ddevd, main)
    wt = repo.worktree("front-b", "feat/b")
    result = provision(ddevd, wt)
    assert "cloning the main worktree's node_modules (reflink)" in result.stderr
    node = deps_of(ddevd, wt)["node"]
    assert node["strategy"] == "reflink" and node["state"] == "ready"
    assert node["saved_seconds"] is not None
    assert_real_tree(wt / "node_modules")
    subprocess.run(["npx", "--no-install", "vite", "--version"], cwd=wt, check=True,
                   capture_output=True, timeout=120)
    shared = subprocess.run(["filefrag", "-v", str(wt / "node_modules/vite/package.json")],
                            capture_output=True, text=True).stdout
    assert "shared" in shared, shared
    assert (wt / "package-lock.json").read_text() == locks["vite"]["package-lock.json"]


def test_plain_filesystem_installs_instead_of_cloning(ddevd: Devd, make_repo, locks) -> None:
    repo: Repo = make_repo(devd_toml=None)
    repo.commit(project(locks))
    provision(ddevd, repo.main)
    wt = repo.worktree("shop-plain", "feat/plain")
    provision(ddevd, wt)
    expected = "reflink" if _can_reflink(wt) else "install"
    assert deps_of(ddevd, wt)["node"]["strategy"] == expected


def _can_reflink(directory: Path) -> bool:
    from devd import reflink

    sample = directory / "package.json"
    return reflink.supported(sample, directory)


# -- rendering ----------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    assert render_counters({"done": 5, "total": 10, "elapsed": 1.25}).endswith("5/10 1.2 s")
    assert render_counters({"elapsed": 3}) == "3.0 s"
    terminal, plain = _Terminal(), io.StringIO()
    for stream in (terminal, plain):
        printer = ProgressPrinter(str, stream)
        printer({"phase": "deps", "message": "npm ci", "done": 1, "total": 4, "elapsed": 0.5})
        printer({"phase": "deps", "message": "npm ci", "done": 2, "total": 4, "elapsed": 1.0})
        printer({"phase": "deps", "message": "ready"})
        printer.close()
    # On a terminal a quick bar is replaced in place by the next line (see test_edges).
    assert terminal.getvalue().endswith("1.0 s\r\x1b[K  deps: ready\n")
    assert "\r" not in plain.getvalue()
    assert plain.getvalue().splitlines() == [
        "  deps: npm ci [######..................] 1/4 0.5 s", "  deps: ready"]
