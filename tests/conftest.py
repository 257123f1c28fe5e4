"""Fixtures: real git repos and worktrees, a real daemon on a real socket under DEVD_HOME."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devd.paths import Paths

ROOT = Path(__file__).resolve().parent.parent


def run_git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True, env=env).stdout


@dataclass
class Repo:
    """A real git repository with helpers to add worktrees next to it."""

    main: Path

    def worktree(self, name: str, branch: str | None = None) -> Path:
        path = self.main.parent / name
        args = ["worktree", "add", "-q"]
        args += ["-b", branch, str(path)] if branch else ["--detach", str(path)]
        run_git(self.main, *args)
        return path.resolve()

    def commit(self, files: dict[str, str], message: str = "change") -> None:
        for rel, text in files.items():
            (self.main / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.main / rel).write_text(text)
        run_git(self.main, "add", "-A")
        run_git(self.main, "commit", "-q", "-m", message)


@pytest.fixture
def make_repo(tmp_path: Path):
    def make(name: str = "shop", devd_toml: str | None = '[ports]\nnames = ["web", "api"]\n'
             ) -> Repo:
        main = tmp_path / "src" / name
        main.mkdir(parents=True)
        run_git(main, "init", "-q", "-b", "main")
        repo = Repo(main.resolve())
        files = {"README.md": "hello\n", ".gitignore": ".env\n.env.local\n"}
        if devd_toml is not None:
            files["devd.toml"] = devd_toml
        repo.commit(files, "init")
        return repo
    return make


@pytest.fixture
def repo(make_repo) -> Repo:
    return make_repo()


@dataclass
class Devd:
    """A devd instance isolated under its own DEVD_HOME."""

    home: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def paths(self) -> Paths:
        return Paths.resolve(self.env)

    def run(self, *args: str, cwd: Path | None = None, check: bool = True,
            env: dict[str, str] | None = None, timeout: float = 180,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        # The timeout only keeps a hung CLI from hanging the suite: a release or gc that
        # dumps a database or backs up volumes takes a while on a loaded CI machine.
        result = subprocess.run([sys.executable, "-m", "devd", *args], cwd=cwd,
                                env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"devd {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str, cwd: Path | None = None) -> Any:
        return json.loads(self.run(*args, "--json", cwd=cwd).stdout)

    def status(self, fresh: bool = True) -> dict[str, Any]:
        """Fresh by default: a test that changed something behind devd's back wants it
        checked now, not at the daemon's next pass (tests/test_status_fast.py tests that).

        `--fresh` waits 5 s at most for the pass under way, then answers from the last one
        (docs/protocol.md): on a loaded machine a background pass can take longer, and the
        answer predates the change. A pass run for the request ends after it was sent, so
        an answer checked before then is asked for again."""
        if not fresh:
            return self.json("status")
        deadline = time.monotonic() + 120
        while True:
            sent = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # the answer's format
            answer = self.json("status", "--fresh")
            if (answer["checked_at"] or "") >= sent or answer["check_error"]:
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f"no status pass ran for --fresh in 120 s: {answer}")

    def worktree(self, path: Path) -> dict[str, Any]:
        matches = [w for w in self.status()["worktrees"] if w["path"] == str(path)]
        assert matches, f"{path} not in status"
        return matches[0]

    def start(self) -> None:
        log = open(self.home / "daemon-test.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "devd", "daemon"], env=self.env,
                                     stdout=log, stderr=log)
        wait_for(lambda: _answers(self.paths.socket), what="daemon socket")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)  # the shutdown stops services: slow under load
        self.proc = None
        return code

    def log(self) -> str:
        path = self.home / "daemon-test.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _answers(path: Path) -> bool:
    """A reply to ping, not just a connect: the socket takes connections (in its backlog)
    before the daemon's startup ends, and a test that then lowers its fd limit, say, would
    break the startup instead of what it tests."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b'{"v": 1, "method": "ping"}\n')
            return json.loads(sock.recv(65536).split(b"\n")[0]).get("ok") is True
    except (OSError, ValueError):  # not yet listening, or not yet serving
        return False


def devd_shim(bin_dir: Path) -> Path:
    """A new `bin_dir` holding a `devd` that runs this checkout: what hooks and the tools
    they come from call by name."""
    bin_dir.mkdir()
    script = bin_dir / "devd"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m devd "$@"\n')
    script.chmod(0o755)
    return bin_dir


@contextlib.contextmanager
def machine_lock(cache: Path) -> Iterator[None]:
    """Held while a cache kept once per machine under the temp dir (an npm install) is
    checked and filled: the test runs of other sessions on this machine share it, and two
    installs into one directory, or one run using the other's half-done install, fail."""
    with open(cache.parent / f".{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll until true; a deadline keeps a broken daemon from hanging the suite. Generous:
    it costs only when the condition never comes, and on a loaded 2-core CI machine a
    daemon's start or pass can take many seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def vite_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """node_modules with Vite, from the registry once per session (tests/test_services.py and
    tests/test_e2e_services.py share it)."""
    if not shutil.which("npm"):
        _unavailable("npm is not installed (the Vite service tests install Vite with it)")
    home = tmp_path_factory.mktemp("vite")
    (home / "package.json").write_text('{"name": "v", "private": true}')
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", vite_for_node()],
                          cwd=home,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "npm_config_cache": str(home / "npm-cache"),
                               "npm_config_update_notifier": "false"})
    if done.returncode != 0:
        _unavailable(f"npm install vite failed: {done.stderr[-500:]}")
    return home / "node_modules"


def vite_for_node() -> str:
    """Vite 8 needs Node 20.19 or later; an older Node (a distribution's) gets Vite 5."""
    out = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    major, minor = (int(n) for n in out.strip().lstrip("v").split(".")[:2])
    return "vite@8" if (major, minor) >= (20, 19) else "vite@5"


def _unavailable(why: str) -> None:
    from pgsupport import unavailable

    unavailable(why)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """One Postgres server for every module that does not start its own. Here because
    `pg_url = other_module.pg_url` is no sharing: pytest runs a session fixture again for
    each module it is registered in (a server each)."""
    from pgsupport import start_server

    yield from start_server()


@pytest.fixture
def devd_home(tmp_path: Path) -> Iterator[Devd]:
    home = tmp_path / "devd-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")}
    env.update({"DEVD_HOME": str(home), "DEVD_NO_AUTOSTART": "1",
                "DEVD_RECONCILE_INTERVAL": "1", "PYTHONPATH": str(ROOT),
                # No Caddy unless a test asks (tests/test_proxy.py): one port per machine.
                "DEVD_PROXY": "0"})
    devd = Devd(home, env)
    yield devd
    _kill_daemons_of(devd)


def _kill_daemons_of(devd: Devd) -> None:
    """No daemon outlives its test: a late autostarted one may win the lock after the test
    stopped the first (tests may also point DEVD_HOME elsewhere)."""
    import psutil

    homes = {str(devd.home), devd.env["DEVD_HOME"]}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "daemon" in (proc.info["cmdline"] or []) and \
                    proc.environ().get("DEVD_HOME") in homes:
                proc.kill()
        except psutil.Error:
            continue


@pytest.fixture
def devd(devd_home: Devd) -> Iterator[Devd]:
    devd_home.start()
    yield devd_home
    if devd_home.proc is not None:
        assert devd_home.stop() == 0, devd_home.log()
        assert not devd_home.paths.socket.exists(), "socket left behind after SIGTERM"


def unavailable_here(reason: str) -> None:
    """Skip locally; on CI (DEVD_REQUIRE_INTEGRATION=1) a missing piece fails the run."""
    if os.environ.get("DEVD_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"{reason} (DEVD_REQUIRE_INTEGRATION=1: integration tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A reflink-capable XFS on a loop device made for this session."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        unavailable_here("a reflink filesystem needs root and mkfs.xfs (apt-get install xfsprogs)")
    base = tmp_path_factory.mktemp("xfs")
    image, mount = base / "xfs.img", base / "mnt"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True,
                   capture_output=True)
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        unavailable_here(f"this machine cannot mount a loop device: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        image.unlink()
