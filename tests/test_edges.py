"""The rough edges a newcomer hits (issue 13), each driven through the real CLI and daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Devd, Repo

from devd.client import Client
from devd.errors import DevdError, UsageError


def test_bare_devd_prints_usage_and_commands(devd_home: Devd) -> None:
    result = devd_home.run(check=False)
    assert result.returncode == 2
    assert "usage: devd" in result.stderr and "provision" in result.stderr
    assert "kill-port" in result.stderr and "error" not in result.stderr


@pytest.mark.parametrize("command", [["env"], ["run"], ["kill-port"], ["browser"], ["init"]])
def test_path_and_options_have_help_with_defaults(devd_home: Devd, command: list[str]) -> None:
    out = " ".join(devd_home.run(*command, "--help").stdout.split())  # unwrapped
    assert "a directory in the worktree (default: ., the current directory)" in out \
        or "(default: .)" in out
    if command == ["env"]:
        assert "(default: sh)" in out
    if command == ["kill-port"]:
        assert "a TCP port, 1-65535" in out


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536", "http"])
def test_kill_port_out_of_range_is_a_usage_error(devd: Devd, repo: Repo, port: str) -> None:
    result = devd.run("kill-port", "--path", str(repo.main), "--", port, check=False)
    assert result.returncode == 2, result.stderr
    assert "nothing listens" not in result.stderr and "Traceback" not in result.stderr


def test_kill_port_out_of_range_refused_by_the_daemon(devd: Devd, repo: Repo) -> None:
    with pytest.raises(UsageError, match="out of range"):
        Client(devd.paths, autostart=False).call(
            "kill_port", {"port": 99999, "path": str(repo.main)})


def test_browser_that_does_not_exist_is_an_error_not_a_traceback(devd: Devd, repo: Repo) -> None:
    devd.run("provision", str(repo.main))
    result = devd.run("browser", "--path", str(repo.main), check=False,
                      env={"DEVD_BROWSER": "/nonexistent"})
    assert result.returncode == 1, result.stderr
    assert "cannot start the browser /nonexistent" in result.stderr
    assert "Traceback" not in result.stderr and "opened" not in result.stdout


def test_browser_dying_at_once_is_not_opened(devd: Devd, repo: Repo) -> None:
    devd.run("provision", str(repo.main))
    result = devd.run("browser", "--path", str(repo.main), check=False,
                      env={"DEVD_BROWSER": "sh -c 'exit 3' browser"})
    assert result.returncode == 1 and "opened" not in result.stdout
    assert "exited at once (status 3)" in result.stderr


@pytest.mark.parametrize("browser", ["sh -c 'sleep 1' browser", "true"])
def test_browser_running_or_handing_off_is_opened(devd: Devd, repo: Repo, browser: str) -> None:
    devd.run("provision", str(repo.main))
    result = devd.run("browser", "--path", str(repo.main), env={"DEVD_BROWSER": browser})
    assert result.stdout.startswith("opened http://localhost:")


def test_init_in_a_missing_directory_is_an_error(devd_home: Devd, tmp_path: Path) -> None:
    result = devd_home.run("init", str(tmp_path / "nonexistent" / "x"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot write" in result.stderr and "No such file" in result.stderr


@pytest.mark.parametrize("dump", [[], ["--dump", "/nonexistent.dump"]])
def test_restore_without_postgres_is_an_error_not_usage(devd: Devd, repo: Repo,
                                                        dump: list[str]) -> None:
    devd.run("provision", str(repo.main))
    result = devd.run("restore", str(repo.main), *dump, check=False)
    assert result.returncode == 1, result.stderr
    assert "has no Postgres provisioned; nothing was changed" in result.stderr


EMPTY_NPM_LOCK = {"name": "x", "version": "1.0.0", "lockfileVersion": 3, "requires": True,
                  "packages": {"": {"name": "x", "version": "1.0.0"}}}


def test_a_lockfile_without_dependencies_is_ready_and_not_reinstalled(
        make_repo: Any, devd: Devd) -> None:
    import json
    import shutil

    if not shutil.which("npm"):
        pytest.skip("npm is not installed")
    repo = make_repo("front", devd_toml=None)
    repo.commit({".gitignore": "node_modules/\n.env\n.env.local\n",
                 "package.json": '{"name": "x", "version": "1.0.0"}\n',
                 "package-lock.json": json.dumps(EMPTY_NPM_LOCK)})
    first = devd.run("provision", str(repo.main), timeout=300)
    assert "node: ready (npm" in first.stderr, first.stderr
    assert not (repo.main / "node_modules").exists()
    node = devd.worktree(repo.main)["deps"]["node"]
    assert node["state"] == "ready" and node["note"] == "", node
    shown = {r["kind"]: r for r in devd.worktree(repo.main)["resources"]}
    assert shown["deps"]["state"] == "ready", shown
    again = devd.run("provision", str(repo.main), timeout=300)
    assert "node: up to date" in again.stderr and "npm ci" not in again.stderr


def test_kill_port_hint_fits_where_the_holder_runs(devd: Devd, repo: Repo, tmp_path: Path
                                                   ) -> None:
    from conftest import run_git, wait_for
    from test_ports import listen

    a, b, c = (repo.worktree(f"shop-{n}", n) for n in "abc")
    for tree in (a, b, c):
        devd.run("provision", str(tree))
    ports = devd.worktree(a)["ports"]
    (tmp_path / "elsewhere").mkdir()
    holders = [listen(ports["web"], b), listen(ports["api"], tmp_path / "elsewhere"),
               listen(devd.worktree(c)["ports"]["web"], c)]
    try:
        def hint(port: int) -> str:
            refused = devd.run("kill-port", str(port), "--path", str(a), check=False)
            assert refused.returncode == 1
            return refused.stderr
        assert f"`devd kill-port {ports['web']} --path {b}`" in hint(ports["web"])
        outside = hint(ports["api"])
        assert "runs in no worktree devd knows" in outside and "--path" not in outside
        assert f"kill {holders[1].pid}" in outside
        run_git(repo.main, "worktree", "remove", "--force", str(c))
        wait_for(lambda: devd.worktree(c)["state"] == "gone", what="c gone")
        gone = hint(devd.worktree(c)["ports"]["web"])
        assert "gone worktree" in gone and "its worktree is gone" in gone, gone
        assert f"kill {holders[2].pid}" in gone and "--path" not in gone.split("hint:")[1]
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_stop_without_a_daemon_says_so_and_succeeds(devd_home: Devd) -> None:
    result = devd_home.run("stop", env={"DEVD_NO_AUTOSTART": "0"})
    assert "no daemon running" in result.stdout
    assert not devd_home.paths.socket.exists()  # and it started none


def test_stop_ends_the_daemon_gracefully(devd: Devd) -> None:
    assert devd.proc is not None
    result = devd.run("stop")
    assert f"stopped the daemon (pid {devd.proc.pid})" in result.stdout
    assert devd.proc.wait(timeout=60) == 0 and not devd.paths.socket.exists()
    assert "devd daemon stopping" in devd.log()
    devd.proc = None


def test_stop_leaves_a_managed_daemon_to_its_manager(devd_home: Devd, tmp_path: Path) -> None:
    devd_home.env["NOTIFY_SOCKET"] = str(tmp_path / "no-manager-here")  # as systemd sets it
    devd_home.start()
    result = devd_home.run("stop", check=False)
    assert result.returncode == 1 and "runs under systemd" in result.stderr
    assert "systemctl --user stop devd.socket devd.service" in result.stderr
    assert devd_home.proc is not None and devd_home.proc.poll() is None
    assert devd_home.stop() == 0


def test_daemon_log_has_one_line_per_request(devd: Devd, repo: Repo, tmp_path: Path) -> None:
    devd.run("provision", str(repo.main))
    devd.run("status")
    with pytest.raises(DevdError):  # the CLI refuses such a path; another client may not
        Client(devd.paths, autostart=False).call("env", {"path": "/x\nINFO request forged"})
    devd.run("restore", str(repo.main), "--dump", str(tmp_path / "secret-token-123"),
             check=False)
    lines = [line for line in devd.log().splitlines() if " request " in line]
    assert any(f"INFO request provision {repo.main} (pid " in line and ": ok in " in line
               for line in lines), lines
    # `devd status` asks for status_view (the fast path: devd/quick.py)
    assert any(("request status (pid" in line or "request status_view (pid" in line)
               and ": ok in" in line for line in lines)
    assert any(f"request restore {repo.main}" in line and "error no_postgres" in line
               for line in lines)
    assert any("request env '" in line and "x\\nINFO request forged" in line for line in lines)
    assert not any(line.startswith("INFO request forged") for line in devd.log().splitlines())
    assert "secret-token-123" not in devd.log()


def _on_a_terminal(devd: Devd, *args: str) -> str:
    """stderr of `devd ARGS` written to a real pseudo-terminal, as a user sees it."""
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "devd", *args], env=devd.env,
                                stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
    return b"".join(chunks).decode()


def test_progress_collapses_on_a_terminal_and_stays_full_with_v_or_a_pipe(
        devd: Devd, repo: Repo) -> None:
    plain = devd.run("provision", str(repo.main)).stderr.splitlines()
    assert len(plain) >= 3 and all(line.startswith("  ") for line in plain)
    collapsed = _on_a_terminal(devd, "provision", str(repo.main))
    assert "\r\x1b[K" in collapsed
    verbose = _on_a_terminal(devd, "provision", "-v", str(repo.main))
    assert "\x1b[K" not in verbose
    assert len(verbose.splitlines()) == len(devd.run("provision", str(repo.main)
                                                     ).stderr.splitlines())
    shown = [part for line in collapsed.split("\r\n") for part in line.split("\r\x1b[K")]
    assert {line.strip() for line in verbose.splitlines()} <= {p.strip() for p in shown}


class _Terminal:
    """A stream that says it is a terminal, with a clock the test moves."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_quick_phases_are_redrawn_and_slow_ones_or_warnings_kept(monkeypatch) -> None:
    from devd import progressbar

    now = [0.0]
    monkeypatch.setattr(progressbar.time, "monotonic", lambda: now[0])
    terminal = _Terminal()
    printer = progressbar.ProgressPrinter(str, terminal)  # type: ignore[arg-type]
    for message, took in (("a", 0.01), ("slow", 2.0), ("b", 0.01), ("c", 0.01)):
        printer({"phase": "p", "message": message})
        now[0] += took
    printer({"phase": "p", "message": "lost volume", "level": "warning"})
    printer.close()
    kept = [line.rsplit("\r\x1b[K", 1)[-1] for line in terminal.text.split("\n")[:-1]]
    assert kept == ["  p: slow", "  p: c", "  p: lost volume"], terminal.text


def test_gc_says_what_is_not_due_yet_and_when(devd: Devd, repo: Repo) -> None:
    from conftest import run_git, wait_for

    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    run_git(repo.main, "worktree", "remove", "--force", str(tree))
    wait_for(lambda: devd.worktree(tree)["state"] == "gone", what="gone")
    out = devd.run("gc").stdout.splitlines()
    assert out[-1] == "nothing to collect yet", out
    line = next(line for line in out if line.startswith(f"{tree}: gone "))
    import re

    assert re.search(r"gone \d+s, due in (1d|23h 5\dm);", line), line
    assert line.endswith("`devd gc --grace 0` releases it now")
    pending = devd.json("gc", "--dry-run")["not_due"]
    assert [p["path"] for p in pending] == [str(tree)]
    assert 0 < pending[0]["due_in_seconds"] <= 86400
    assert f"released {tree}" in devd.run("gc", "--grace", "0").stdout
    assert devd.run("gc").stdout.strip() == "nothing to collect"


@pytest.mark.parametrize("required", ["", "1"])
def test_container_tests_skip_where_the_image_is_absent(tmp_path: Path, required: str) -> None:
    """As the README's test command runs them: with Docker up and no such image, skipped
    locally (not errors), failed when DEVD_REQUIRE_INTEGRATION=1."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")}
    env |= {"DEVD_TEST_POSTGRES_IMAGE": "devd-test-absent/postgres:0",
            "DEVD_REQUIRE_INTEGRATION": required}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_pgcontainer.py", "tests/test_edges_pg.py::"
                           "test_first_container_provision_does_not_say_the_volume_was_deleted",
                           "-rs"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if "Docker engine not reachable" in done.stdout:
        pytest.skip("no Docker engine here")
    summary = done.stdout.strip().splitlines()[-1]
    if required:
        # pytest.fail in a fixture counts as an error: either way, not a silent skip
        assert done.returncode == 1 and "skipped" not in summary, summary
        assert "DEVD_REQUIRE_INTEGRATION=1: integration tests must run" in done.stdout
    else:
        assert done.returncode == 0 and "3 skipped" in summary, done.stdout[-3000:]
        assert "devd-test-absent/postgres:0 is not present and cannot be pulled" in done.stdout


def test_readme_walkthrough_runs_line_by_line(devd_home: Devd, tmp_path: Path) -> None:
    """The quick start's 'in any git repository' block, each line in a fresh repo through
    a real shell, with `devd` on PATH and the daemon autostarted as for a newcomer."""
    import os
    import re
    import stat
    import subprocess
    import sys

    from conftest import ROOT, run_git

    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    walkthrough = next(b for b in blocks if "git worktree add ../shop-feat-a" in b)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "devd"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m devd "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    shop = tmp_path / "shop"
    shop.mkdir()
    run_git(shop, "init", "-q", "-b", "main")
    run_git(shop, "commit", "-q", "--allow-empty", "-m", "init")
    env = devd_home.env | {"DEVD_NO_AUTOSTART": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}",
                           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for line in walkthrough.strip().splitlines():
        done = subprocess.run(["sh", "-c", line], cwd=shop, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    assert "devd.toml" in run_git(shop, "ls-files")
    assert run_git(shop, "show", "HEAD:devd.toml") == (shop / "devd.toml").read_text()
    assert not devd_home.paths.socket.exists()  # `devd stop` ended the autostarted daemon
