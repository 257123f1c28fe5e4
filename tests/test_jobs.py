"""A package-manager job outlives a `kill -9` of its daemon: the next daemon never starts a
second install into the same tree while it runs (real pip, a real local package)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import Devd, Repo, wait_for

# A PEP 517 backend in the package itself (no setuptools, no index): building the wheel
# waits until the test opens the gate, and notes any build that overlaps another.
BACKEND = '''
import os, time, zipfile

def _live(name):
    try:  # a build that was killed leaves its file; only a running one counts
        with open(f"/proc/{name.split('.')[1]}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def _gate():
    gate = os.environ["DEVD_TEST_GATE"]
    here = os.path.dirname(gate)
    running = [f for f in os.listdir(here) if f.startswith("running.") and _live(f)]
    if running:
        with open(os.path.join(here, "overlap"), "a") as f:
            f.write(" ".join(running) + "\\n")
    mine = os.path.join(here, f"running.{os.getpid()}")
    open(mine, "w").close()
    open(os.path.join(here, f"started.{os.getpid()}"), "w").close()
    while not os.path.exists(gate):
        time.sleep(0.05)
    os.unlink(mine)

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _gate()
    name = "slowpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        z.writestr("slowpkg.py", "")
        info = "slowpkg-1.0.dist-info/"
        z.writestr(info + "METADATA", "Metadata-Version: 2.1\\nName: slowpkg\\nVersion: 1.0\\n")
        z.writestr(info + "WHEEL", "Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\n"
                   "Tag: py3-none-any\\n")
        z.writestr(info + "RECORD", "")
    return name
'''
PYPROJECT = '''[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
'''


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "gate"
    where.mkdir()
    yield where / "open"
    where.joinpath("open").touch()  # never leave a build waiting
    for pid in _builds(where):
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(60)


def _builds(where: Path) -> list[int]:
    return [int(p.name.split(".")[1]) for p in where.glob("started.*")]


def _slow_project(repo: Repo) -> None:
    repo.commit({".gitignore": ".venv/\n.env\n", "requirements.txt": "./slowpkg\n",
                 "slowpkg/pyproject.toml": PYPROJECT, "slowpkg/backend.py": BACKEND,
                 "devd.toml": '[deps]\npython = "pip"\n'})


def _pips_in(tree: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "pip" in cmd and str(tree / ".venv" / "bin" / "python") in cmd:
            found.append(proc)
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_daemon(devd: Devd) -> None:
    assert devd.proc is not None
    devd.proc.send_signal(signal.SIGKILL)  # the daemon dies mid-install
    devd.proc.wait(15)
    devd.proc = None


def _python_state(devd: Devd, tree: Path) -> dict:
    return devd.worktree(tree).get("deps", {}).get("python", {})


def _orphaned_install(devd: Devd, repo: Repo, gate: Path) -> tuple[Path, int]:
    """A worktree whose pip install is held at the gate while its daemon is killed -9."""
    devd.env.update(DEVD_TEST_GATE=str(gate), PIP_NO_INDEX="1")
    _slow_project(repo)
    tree = repo.worktree("shop-a", "a")
    devd.start()
    devd.run("provision", str(tree), "--background")
    wait_for(lambda: _builds(gate.parent), timeout=120, what="the wheel build to start")
    pips = _pips_in(tree)
    assert len(pips) == 1, pips
    _kill_daemon(devd)
    assert _alive(pips[0].pid), "the install died with the daemon"
    return tree, pips[0].pid


def test_an_install_outlives_a_killed_daemon_and_the_next_one_waits_for_it(
        devd_home: Devd, repo: Repo, gate: Path) -> None:
    tree, _ = _orphaned_install(devd_home, repo, gate)
    devd_home.start()
    state = _python_state(devd_home, tree)
    assert state["state"] == "installing" and "previous daemon" in state["note"]
    refused = devd_home.run("release", str(tree), check=False)
    assert refused.returncode == 1 and "from the previous daemon is still running" in \
        refused.stderr
    log = devd_home.home / "provision.err"
    with open(log, "w") as err:
        second = subprocess.Popen([sys.executable, "-m", "devd", "provision", str(tree)],
                                  env=devd_home.env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: "from the previous daemon" in log.read_text(), timeout=60,
                 what="the new daemon to report the adopted install")
        assert len(_builds(gate.parent)) == 1 and len(_pips_in(tree)) == 1
        gate.touch()
        assert second.wait(180) == 0, log.read_text()
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert not (gate.parent / "overlap").exists(), "two installs ran into one .venv"
    assert _python_state(devd_home, tree)["state"] == "ready"
    assert subprocess.run([str(tree / ".venv/bin/python"), "-c", "import slowpkg"],
                          check=False).returncode == 0
    assert not _pips_in(tree)
    devd_home.stop()


def test_an_orphaned_install_past_its_timeout_is_stopped_by_the_next_daemon(
        devd_home: Devd, repo: Repo, gate: Path) -> None:
    tree, orphan = _orphaned_install(devd_home, repo, gate)
    builder = _builds(gate.parent)[0]
    (tree / "devd.toml").write_text('[deps]\npython = "pip"\ntimeout = "1s"\n')
    devd_home.start()
    result = devd_home.run("provision", str(tree), check=False, timeout=120)
    assert "from the previous daemon" in result.stderr
    assert "stopped it" in result.stderr, result.stderr
    assert not _alive(orphan) and not _alive(builder), "the orphaned install kept running"
    assert not (gate.parent / "overlap").exists(), "two installs ran into one .venv"
    assert not _pips_in(tree)
    devd_home.stop()


def test_a_command_writes_its_log_itself_and_lines_still_reach_the_caller(tmp_path: Path
                                                                         ) -> None:
    from devd.jobs import JobRunner

    lines: list[str] = []
    with JobRunner(tmp_path / "jobs").job("k", lambda: True) as job:
        script = "printf 'one\\n'; printf 'caf\\303\\251 two\\n' >&2; printf 'three'"
        assert job.run(["sh", "-c", script], tmp_path, {}, 60, on_line=lines.append) == 0
    assert lines == ["one", "café two", "three"]
    log = (tmp_path / "jobs" / "k.log").read_text()
    assert "one\ncafé two\nthree" in log


def test_what_a_command_leaves_running_in_its_group_is_stopped_with_it(tmp_path: Path
                                                                      ) -> None:
    """A leftover (an install script's background child) would keep the inherited lock
    and go on writing into the tree."""
    from devd.jobs import JobRunner

    runner, pid_file = JobRunner(tmp_path / "jobs"), tmp_path / "leftover.pid"
    with runner.job("k", lambda: True) as job:
        assert job.run(["sh", "-c", f"sleep 600 & echo $! > {pid_file}"], tmp_path, {},
                       60) == 0
    assert not _alive(int(pid_file.read_text())), "the leftover kept running"
    assert not runner.busy("k"), "the leftover kept the worktree locked"


def test_a_job_of_this_daemon_is_never_taken_for_the_previous_daemons(tmp_path: Path) -> None:
    """Before its first command names itself in the lock file, the file is empty: that is
    this daemon's job, not an install adopted from a crashed one (status said so, and
    release refused with deps_busy)."""
    from devd.jobs import JobRunner

    runner = JobRunner(tmp_path / "jobs")
    with runner.job("k", lambda: True):
        assert runner.busy("k") and not runner.adopted("k")
