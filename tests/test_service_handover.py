"""One daemon per user whatever started it: a socket-activated daemon (systemd's own
systemd-socket-activate binds and passes the socket as devd.socket does) takes over from
one the CLI started, `service status` says who runs it, and a daemon killed mid-request
gives one error line and its hint, never a traceback."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import Devd, Repo, wait_for
from tests.pgsupport import unavailable


@pytest.fixture
def activator(devd_home: Devd):
    """Starts systemd-socket-activate on devd's socket path; stopped at the end."""
    if shutil.which("systemd-socket-activate") is None:
        unavailable("systemd-socket-activate is not installed (apt-get install systemd)")
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        passed = [arg for key in devd_home.env if key.startswith(("DEVD_", "PYTHON", "PATH"))
                  for arg in ("-E", key)]
        log = open(devd_home.home / "activated.log", "ab")  # noqa: SIM115 - lives with it
        proc = subprocess.Popen(["systemd-socket-activate", "-l", str(devd_home.paths.socket),
                                 *passed, sys.executable, "-m", "devd", "daemon"],
                                env=devd_home.env, stdout=log, stderr=log)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_socket_activated_daemon_takes_over_from_the_cli_started_one(devd_home: Devd,
                                                                       activator) -> None:
    devd_home.start()
    assert devd_home.proc is not None
    old = devd_home.proc.pid
    assert "started by the CLI" in devd_home.run("service", "status").stdout
    # As `systemctl --user restart devd.socket` does: unlink the path and bind it anew.
    activated = activator()
    assert devd_home.proc.wait(timeout=30) == 0, devd_home.log()  # it saw, and stopped
    devd_home.proc = None
    assert "no longer this daemon's socket" in devd_home.log()
    # Queued in the activator's socket while the daemon it starts imports (slow when loaded).
    status = json.loads(devd_home.run("status", "--json", env={"DEVD_TIMEOUT": "60"}).stdout)
    assert status["daemon"]["pid"] == activated.pid != old
    assert f"running, pid {activated.pid}, run by systemd" in \
        devd_home.run("service", "status").stdout


def test_a_daemon_killed_mid_request_is_one_line_in_every_hook(devd: Devd, repo: Repo,
                                                               tmp_path: Path) -> None:
    assert devd.proc is not None
    daemon = psutil.Process(devd.proc.pid)
    daemon.suspend()  # requests queue in its backlog: each is mid-request when it dies
    removal = tmp_path / "removal.json"
    removal.write_text(json.dumps({"worktree_path": str(repo.worktree("gone-soon", "g"))}))
    calls = {"provision --background --wait": ["provision", "--background", "--wait",
                                               str(repo.main)],
             "claude-remove": ["hook", "claude-remove"], "status": ["status"]}
    with open(removal) as payload:
        procs = {name: subprocess.Popen([sys.executable, "-m", "devd", *argv], env=devd.env,
                                        stdin=payload, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=repo.main)
                 for name, argv in calls.items()}
    wait_for(lambda: all(_connected(proc.pid) for proc in procs.values()),
             what="every client to be waiting on the daemon")
    daemon.kill()
    devd.proc.wait(timeout=60)
    devd.proc = None
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, (name, err)
        assert proc.returncode == (0 if name == "claude-remove" else 3), (name, err)
        problem = [line for line in err.splitlines() if "dropped the connection" in line]
        assert len(problem) == 1 and "Connection reset" in problem[0], (name, err)


def _connected(pid: int) -> bool:
    """The client holds a stream socket: connected to the daemon (a CLI opens no other)."""
    try:
        return any(conn.type == socket.SOCK_STREAM
                   for conn in psutil.Process(pid).net_connections("unix"))
    except psutil.Error:
        return False


def test_service_status_says_when_the_state_dir_is_held_but_nothing_answers(
        devd: Devd, tmp_path: Path) -> None:
    moved = tmp_path / "moved.sock"
    devd.paths.socket.rename(moved)  # the path is no longer its socket: it stops at once
    wait_for(lambda: devd.proc is not None and devd.proc.poll() is not None,
             what="the unreachable daemon to stop")
    assert devd.proc is not None and devd.proc.returncode == 0
    devd.proc = None
    assert "not running" in devd.run("service", "status").stdout
