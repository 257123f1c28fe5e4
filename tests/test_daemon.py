"""The daemon process: socket, permissions, single instance, signals, bad clients."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, Devd, wait_for


def request(devd: Devd, payload: bytes, timeout: float = 10) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(devd.paths.socket))
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_socket_and_dir_are_private(devd: Devd) -> None:
    assert stat.S_IMODE(devd.paths.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(devd.paths.runtime_dir.stat().st_mode) == 0o700


def test_ping_over_raw_socket(devd: Devd) -> None:
    replies = request(devd, b'{"v": 1, "method": "ping", "params": {}}\n')
    assert replies == [{"ok": True, "result": {"pid": devd.proc.pid, "version": "0.1.0",
                                                   "manager": None}}]


def test_second_daemon_refuses_with_clear_message(devd: Devd) -> None:
    second = devd.run("daemon", check=False, timeout=30)
    assert second.returncode == 1
    assert "already serving" in second.stderr and str(devd.proc.pid) in second.stderr
    assert devd.run("status", "--json").returncode == 0  # the first one still serves


def test_stale_socket_is_replaced(devd_home: Devd) -> None:
    path = devd_home.paths.socket
    path.parent.mkdir(parents=True, mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: what a SIGKILLed daemon leaves
    devd_home.start()
    assert devd_home.json("status")["daemon"]["pid"] == devd_home.proc.pid
    assert devd_home.stop() == 0
    assert not path.exists()


def test_sigint_stops_gracefully(devd: Devd) -> None:
    devd.proc.send_signal(2)
    assert devd.proc.wait(timeout=60) == 0
    devd.proc = None
    assert not devd.paths.socket.exists()


def test_a_stop_during_startup_is_still_graceful(devd_home: Devd, tmp_path: Path) -> None:
    """SIGTERM as soon as the socket exists, before the rest of startup has run, ends in the
    same clean shutdown, never a traceback. A fresh bytecode cache each time makes startup
    slower, as on a new machine, where a clean-clone CI run once caught SIGINT landing
    between bind and the signal handlers (the window is too small to hit every time here)."""
    for attempt in range(3):
        env = devd_home.env | {"PYTHONPYCACHEPREFIX": str(tmp_path / f"pyc{attempt}")}
        proc = subprocess.Popen([sys.executable, "-m", "devd", "daemon"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda p=proc: devd_home.paths.socket.exists() or p.poll() is not None,
                 what="the socket")
        proc.send_signal(15)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
        assert not devd_home.paths.socket.exists()


def test_garbage_and_oversized_lines_are_rejected_and_daemon_keeps_serving(devd: Devd) -> None:
    garbage = request(devd, b"this is not json\n")
    assert garbage[-1]["ok"] is False and garbage[-1]["error"]["code"] == "protocol"
    not_object = request(devd, b"[1, 2]\n")
    assert not_object[-1]["error"]["code"] == "protocol"
    wrong_version = request(devd, b'{"v": 99, "method": "ping", "params": {}}\n')
    assert "version" in wrong_version[-1]["error"]["message"]
    unknown = request(devd, b'{"v": 1, "method": "explode", "params": {}}\n')
    assert "unknown method" in unknown[-1]["error"]["message"]
    bad_params = request(devd, b'{"v": 1, "method": "ping", "params": {"x": 1}}\n')
    assert bad_params[-1]["error"]["code"] == "usage"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(devd.paths.socket))
        # 10 MB, no newline; the daemon may close on us before we finish: that is the point.
        with contextlib.suppress(OSError):
            sock.sendall(b"x" * (10 << 20))
        reply = sock.recv(65536)
    assert b"longer than" in reply
    assert devd.json("status")["daemon"]["pid"] == devd.proc.pid


def test_client_disconnecting_mid_request_does_not_hurt(devd: Devd, repo) -> None:
    wt = repo.worktree("shop-a", "a")
    payload = json.dumps({"v": 1, "method": "provision", "params": {"path": str(wt)}})
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(devd.paths.socket))
        sock.sendall(payload.encode() + b"\n")
    wait_for(lambda: devd.worktree(wt)["state"] == "ready", what="provision to finish")
    half = socket.socket(socket.AF_UNIX)
    half.connect(str(devd.paths.socket))
    half.sendall(b'{"v": 1, "meth')
    half.close()
    assert devd.json("status")["daemon"]["pid"] == devd.proc.pid


def test_other_uid_is_refused(devd_home: Devd) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another uid")
    # A home that `nobody` can traverse, and a socket opened to everyone for this test only,
    # so the kernel lets `nobody` connect and devd's own SO_PEERCRED check is what refuses it.
    home = Path(tempfile.mkdtemp(prefix="devd-uid-"))
    home.chmod(0o755)
    devd_home.env["DEVD_HOME"] = str(home)
    devd_home.home = home
    devd_home.start()
    try:
        devd_home.paths.runtime_dir.chmod(0o755)
        devd_home.paths.socket.chmod(0o777)
        code = (
            "import contextlib, json, os, socket; os.setgid(65534); os.setuid(65534);"
            f"s = socket.socket(socket.AF_UNIX); s.connect({str(devd_home.paths.socket)!r})\n"
            "with contextlib.suppress(BrokenPipeError):  # refused before we finish sending\n"
            " s.sendall(b'{\"v\": 1, \"method\": \"status\", \"params\": {}}\\n')\n"
            "print(s.recv(65536).decode())"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["ok"] is False and "may not use" in reply["error"]["message"]
    finally:
        assert devd_home.stop() == 0
        shutil.rmtree(home)


def test_no_daemon_and_no_autostart_exits_3(devd_home: Devd) -> None:
    result = devd_home.run("status", check=False)
    assert result.returncode == 3
    assert "no devd daemon answers" in result.stderr and "devd daemon" in result.stderr


def test_cli_autostarts_a_detached_daemon(devd_home: Devd) -> None:
    env = {"DEVD_NO_AUTOSTART": "0"}
    status = json.loads(devd_home.run("status", "--json", env=env).stdout)
    pid = status["daemon"]["pid"]
    try:
        assert os.getsid(pid) == pid  # its own session: survives the terminal closing
        assert (devd_home.paths.daemon_log).exists()
        again = json.loads(devd_home.run("status", "--json", env=env).stdout)
        assert again["daemon"]["pid"] == pid  # reused, not a second one
    finally:
        os.kill(pid, 15)
        wait_for(lambda: not devd_home.paths.socket.exists(), what="autostarted daemon to stop")


def test_concurrent_autostarts_end_with_one_daemon(devd_home: Devd) -> None:
    env = {**devd_home.env, "DEVD_NO_AUTOSTART": "0"}
    procs = [subprocess.Popen([sys.executable, "-m", "devd", "status", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(5)]
    pids = set()
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        pids.add(json.loads(out)["daemon"]["pid"])
    assert len(pids) == 1
    os.kill(pids.pop(), 15)
    wait_for(lambda: not devd_home.paths.socket.exists(), what="daemon to stop")


def test_cli_import_path_stays_light(devd: Devd) -> None:
    code = (
        "import sys; from devd.cli import main; rc = main(['status', '--json']);"
        "heavy = {'pydantic', 'pydantic_settings', 'docker', 'psycopg', 'watchdog', 'mcp'} & "
        "set(sys.modules); print(sorted(heavy)); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**devd.env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_long_devd_home_falls_back_to_a_short_socket_path(tmp_path, devd_home: Devd) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    devd_home.env["DEVD_HOME"] = str(deep)
    devd_home.home = deep
    assert len(str(deep / "run" / "devd.sock")) > 107
    devd_home.start()
    try:
        assert len(str(devd_home.paths.socket)) <= 100
        assert devd_home.json("status")["worktrees"] == []
    finally:
        assert devd_home.stop() == 0


def test_output_into_a_closed_pipe_is_quiet(devd: Devd, repo) -> None:
    for name in ("a", "b", "c"):
        devd.run("provision", str(repo.worktree(f"shop-{name}", name)))
    shell = f'"{sys.executable}" -m devd status | head -c 1 >/dev/null; echo "${{PIPESTATUS[0]}}"'
    result = subprocess.run(["bash", "-c", shell], env=devd.env, capture_output=True, text=True,
                            timeout=60)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert result.stdout.strip() in ("0", "141")


def test_daemon_autostarted_from_a_git_hook_ignores_its_git_variables(devd_home: Devd,
                                                                       repo) -> None:
    tree = repo.worktree("shop-a", "a")
    # What a post-checkout hook inherits: GIT_DIR of the repo that ran it.
    env = {"DEVD_NO_AUTOSTART": "0", "GIT_DIR": str(repo.main / ".git"),
           "GIT_WORK_TREE": str(repo.main)}
    try:
        devd_home.run("provision", str(tree), env=env)
        assert devd_home.worktree(tree)["branch"] == "a"
    finally:
        pid = devd_home.json("status")["daemon"]["pid"]
        os.kill(pid, 15)
        wait_for(lambda: not devd_home.paths.socket.exists(), what="daemon to stop")


def test_autostarted_daemon_does_not_import_from_the_callers_directory(devd_home: Devd,
                                                                        tmp_path) -> None:
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "sqlite3.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n"
                                     "raise ImportError('shadowed')\n")
    try:
        devd_home.run("status", "--json", cwd=trap, env={"DEVD_NO_AUTOSTART": "0"})
        assert not (tmp_path / "pwned").exists()
    finally:
        pid = int(devd_home.paths.lock_file.read_text())
        os.kill(pid, 15)
        wait_for(lambda: not devd_home.paths.socket.exists(), what="daemon to stop")


def test_a_runtime_dir_owned_by_someone_else_is_refused(devd_home: Devd) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to make a directory owned by another uid")
    planted = devd_home.paths.runtime_dir
    planted.mkdir(parents=True, mode=0o777)
    os.chown(planted, 65534, 65534)  # what another local user could leave in a shared /tmp
    result = devd_home.run("daemon", check=False, timeout=30)
    assert result.returncode == 1 and "owned by uid 65534" in result.stderr
    assert "remove it" in result.stderr


def test_client_refuses_a_socket_served_by_another_uid(devd_home: Devd) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to serve a socket as another uid")
    home = Path(tempfile.mkdtemp(prefix="devd-imp-"))
    home.chmod(0o755)
    devd_home.env["DEVD_HOME"] = str(home)
    run_dir = devd_home.paths.runtime_dir
    run_dir.mkdir(parents=True)
    run_dir.chmod(0o777)
    # An impostor, running as `nobody`, answering every request with a poisoned environment.
    impostor = subprocess.Popen([sys.executable, "-c", (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "print('up', flush=True)\n"
        "c, _ = s.accept(); c.recv(65536)\n"
        "c.sendall(b'{\"ok\": true, \"result\": {\"env\": {\"PATH\": \"/evil\"}}}\\n'); c.close()\n"
    ), str(devd_home.paths.socket)], stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout is not None and impostor.stdout.readline().strip() == "up"
        result = devd_home.run("env", check=False)
        assert result.returncode == 3 and "served by uid 65534" in result.stderr
        assert "/evil" not in result.stdout
    finally:
        impostor.kill()
        impostor.wait()
        shutil.rmtree(home)
