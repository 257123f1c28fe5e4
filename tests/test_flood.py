"""The daemon under a same-user flood, and a CLI that never hangs on a daemon that went quiet."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Devd, Repo, wait_for
from test_ports import listen

from devd import protocol
from devd.client import Client
from devd.errors import ProtocolError


def start_limited(devd: Devd, nofile: int) -> None:
    """Start the daemon with its fd limit at `nofile` (as `ulimit -n` would)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = open(devd.home / "daemon-test.log", "ab")  # noqa: SIM115 - lives with the process
    devd.proc = subprocess.Popen([sys.executable, "-m", "devd", "daemon"], env=devd.env,
                                 stdout=log, stderr=log, preexec_fn=limit)
    wait_for(lambda: devd.run("status", check=False).returncode == 0, what="daemon")


def connect(path: Path) -> socket.socket:
    """Connect as a flood does: retrying while the backlog is full (EAGAIN)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(0)
    for _ in range(3000):
        try:
            sock.connect(str(path))
            break
        except BlockingIOError:
            time.sleep(0.01)
    sock.settimeout(30)
    return sock


def send(devd: Devd, message: dict[str, Any]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(60)
    sock.connect(str(devd.paths.socket))
    sock.sendall(json.dumps(message).encode() + b"\n")
    return sock


def replies(sock: socket.socket, data: bytes = b"") -> list[dict[str, Any]]:
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_1100_idle_connections_at_a_1024_fd_limit(devd_home: Devd, repo: Repo) -> None:
    start_limited(devd_home, 1024)
    tree = repo.worktree("shop-a", "a")
    inflight = send(devd_home, {"v": 1, "method": "provision", "params": {"path": str(tree)}})
    first = inflight.recv(1)  # the daemon took the request: a handler runs it
    idle: list[socket.socket] = []
    try:
        for _ in range(1100):
            idle.append(connect(devd_home.paths.socket))
        status = devd_home.json("status")
        assert status["daemon"]["pid"] == devd_home.proc.pid
        done = replies(inflight, first)
    finally:
        for sock in idle:
            sock.close()
    assert first and done[-1]["ok"] is True, done[-1]
    assert devd_home.worktree(tree)["state"] == "ready"
    assert devd_home.proc.poll() is None
    assert devd_home.stop() == 0, devd_home.log()


def test_accept_failing_for_lack_of_fds_is_logged_once_and_backed_off(devd: Devd) -> None:
    pid = devd.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    waiting = []
    try:
        # A limit of 3 leaves no fd to give beyond stdin/out/err, which stay open: with
        # a limit just above the fds in use, a daemon thread closing one of its own opened a
        # hole, one client got in, and every later EMFILE took the drop-the-oldest-idle-client
        # path instead of the back-off this test is about.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
        def connect_one() -> bool:
            waiting.append(socket.socket(socket.AF_UNIX))
            waiting[-1].connect(str(devd.paths.socket))
            return "accept failed" in devd.log()
        wait_for(connect_one, what="the accept failure in the log")
        wait_for(lambda: devd.log().count("pausing new connections") == 1
                 and devd.proc.poll() is None, what="the daemon to go on")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for sock in waiting:
            sock.close()
    assert devd.json("status")["daemon"]["pid"] == pid
    assert devd.log().count("accept failed") == 1


def test_a_client_sending_a_byte_at_a_time_is_cut_off(devd_home: Devd) -> None:
    devd_home.env["DEVD_REQUEST_TIMEOUT"] = "1"
    devd_home.start()
    received = b""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(devd_home.paths.socket))
        sock.settimeout(0.3)
        payload = b'{"v": 1, "method": "ping", "params": {"padding": "' + b"x" * 500
        for byte in payload:  # one byte each 0.3 s: each recv is quick, the line never is
            try:
                sock.send(bytes([byte]))
                received = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            break
    assert b"no complete request line within 1 s" in received
    assert devd_home.json("status")["daemon"]["pid"] == devd_home.proc.pid
    assert devd_home.stop() == 0


def test_a_stopped_daemon_never_hangs_the_cli_or_the_hooks(devd: Devd, repo: Repo) -> None:
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree))
    quick = {"DEVD_TIMEOUT": "1"}
    os.kill(devd.proc.pid, signal.SIGSTOP)
    try:
        status = devd.run("status", check=False, env=quick)
        assert status.returncode == 3, status.stderr
        assert f"daemon (pid {devd.proc.pid})" in status.stderr
        assert "sent nothing for 1 s" in status.stderr and "stopped" in status.stderr
        # `provision --background` is what the git post-checkout hook runs (detached).
        for args in (["wait", str(tree)], ["provision", "--background", "--wait", str(tree)],
                     ["provision", "--background", str(tree)]):
            done = devd.run(*args, check=False, env=quick)
            assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
        remove = devd.run("hook", "claude-remove", check=False, env=quick,
                          input=json.dumps({"worktree_path": str(tree)}))
        assert remove.returncode == 0 and "could not release" in remove.stderr, remove.stderr
        create = devd.run("hook", "claude-create", check=False, input='{"name": "agent"}',
                          env=quick | {"CLAUDE_PROJECT_DIR": str(repo.main)})
        made = repo.main / ".claude" / "worktrees" / "agent"
        assert create.returncode == 0 and create.stdout.strip() == str(made), create.stderr
        assert "not provisioned yet" in create.stderr
    finally:
        os.kill(devd.proc.pid, signal.SIGCONT)
    # Resumed, it answers again (with the default timeout: after SIGCONT it first works
    # through the connections queued while it was stopped).
    assert devd.run("status").returncode == 0


def test_heartbeats_keep_a_long_request_within_a_short_timeout(devd_home: Devd,
                                                               repo: Repo) -> None:
    devd_home.env["DEVD_KILL_TIMEOUT"] = "4"
    devd_home.start()
    tree = repo.worktree("shop-a", "a")
    devd_home.run("provision", str(tree))
    port = devd_home.worktree(tree)["ports"]["web"]
    stubborn = listen(port, tree, "--stubborn")  # ignores SIGTERM: kill-port waits 4 s
    try:
        result = devd_home.run("kill-port", str(port), "--path", str(tree), "--json",
                               env={"DEVD_TIMEOUT": "2"})
        assert json.loads(result.stdout)["outcome"] == "killed"
    finally:
        stubborn.kill()
        stubborn.wait()
    assert devd_home.stop() == 0


def test_heartbeats_only_go_to_clients_that_ask(devd_home: Devd, repo: Repo) -> None:
    devd_home.env["DEVD_KILL_TIMEOUT"] = "2"
    devd_home.start()
    tree = repo.worktree("shop-a", "a")
    devd_home.run("provision", str(tree))
    port = devd_home.worktree(tree)["ports"]["web"]
    for asked in (True, False):
        stubborn = listen(port, tree, "--stubborn")
        try:
            request = protocol.request("kill_port", {"port": port, "path": str(tree)})
            got = replies(send(devd_home, request | ({"heartbeat": True} if asked else {})))
        finally:
            stubborn.kill()
            stubborn.wait()
        beats = [m for m in got if m.get("event") == "heartbeat"]
        assert got[-1]["ok"] is True and bool(beats) is asked, got
    assert devd_home.stop() == 0


def test_a_10_mb_request_gets_the_error_reply_not_epipe(devd: Devd) -> None:
    client = Client(devd.paths, autostart=False)
    with pytest.raises(ProtocolError, match="longer than"):
        client.call("status", {"path": "x" * (10 << 20)})
    assert client.call("ping")["pid"] == devd.proc.pid


@pytest.mark.parametrize("read_first", [True, False], ids=["closed", "reset"])
def test_a_dropped_connection_is_exit_3_without_a_traceback(devd_home: Devd,
                                                            read_first: bool) -> None:
    """A peer that closes mid-request (EOF), or with our request unread (ECONNRESET)."""
    devd_home.paths.runtime_dir.mkdir(parents=True, mode=0o700)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(devd_home.paths.socket))
        server.listen()
        cli = subprocess.Popen([sys.executable, "-m", "devd", "status"], env=devd_home.env,
                               stderr=subprocess.PIPE, text=True)
        conn, _ = server.accept()
        with conn:
            if read_first:
                conn.recv(65536)
            else:
                wait_for(lambda: select_readable(conn), what="the request")
        _, err = cli.communicate(timeout=60)
    assert cli.returncode == 3 and "dropped the connection" in err and "Traceback" not in err


def select_readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_cli_timeout_must_be_a_positive_number(devd: Devd) -> None:
    for bad in ("soon", "0", "-1", "inf", "nan"):
        done = devd.run("status", check=False, env={"DEVD_TIMEOUT": bad})
        assert done.returncode == 2 and "DEVD_TIMEOUT" in done.stderr, (bad, done.stderr)



def test_beyond_the_handler_slots_a_request_is_told_busy(devd_home: Devd, repo: Repo) -> None:
    from devd.daemon import MAX_WORKERS

    # The slots are held until the test kills the stubborn listener itself: with a short
    # kill timeout the daemon's own SIGKILL freed them while a loaded machine was still
    # filling the other slots, and the extra ping was answered.
    devd_home.env["DEVD_KILL_TIMEOUT"] = "120"
    devd_home.start()
    tree = repo.worktree("shop-a", "a")
    devd_home.run("provision", str(tree))
    port = devd_home.worktree(tree)["ports"]["web"]
    stubborn = listen(port, tree, "--stubborn")  # each kill_port waits on it till it dies
    request = protocol.request("kill_port", {"port": port, "path": str(tree)})
    held = []
    try:
        for _ in range(MAX_WORKERS):
            held.append(send(devd_home, request | {"heartbeat": True}))
            assert held[-1].recv(1)  # its handler runs (the heartbeat comes at once)
        extra = replies(send(devd_home, protocol.request("ping")))
        assert extra[-1]["error"]["code"] == "busy", extra
        # The CLI's client reads `busy` as "nothing ran": it asks again until a slot frees.
        with ThreadPoolExecutor(1) as pool:
            retried = pool.submit(Client(devd_home.paths, autostart=False, timeout=60).call,
                                  "ping")
            time.sleep(1)
            assert not retried.done(), retried.result()  # every slot is still held
            stubborn.kill()
            assert retried.result()["pid"] == devd_home.proc.pid
    finally:
        stubborn.kill()
        stubborn.wait()
        for sock in held:
            sock.close()
    wait_for(lambda: devd_home.run("status", check=False).returncode == 0, what="a free slot")
    assert devd_home.stop() == 0


def test_an_older_daemon_without_heartbeats_is_waited_for(devd_home: Devd) -> None:
    """After its first word, a daemon that never sends heartbeats gets the time it takes."""
    import threading

    devd_home.paths.runtime_dir.mkdir(parents=True, mode=0o700)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(devd_home.paths.socket))
        server.listen()

        def slow_old_daemon() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b'{"event": "progress", "phase": "deps", "message": "npm ci"}\n')
                time.sleep(2.5)  # longer than the client's idle timeout, without a word
                conn.sendall(b'{"ok": true, "result": {"pid": 1, "version": "0.0.9"}}\n')

        thread = threading.Thread(target=slow_old_daemon)
        thread.start()
        try:
            result = Client(devd_home.paths, autostart=False, timeout=1).call("ping")
        finally:
            thread.join()
    assert result == {"pid": 1, "version": "0.0.9"}


def test_a_burst_of_status_before_the_first_pass_is_answered_not_busy(devd_home: Devd,
                                                                       repo: Repo) -> None:
    """Right after the daemon starts no pass has run: one request runs it, the rest answer
    from the registry (`"checked": false`) instead of each waiting on (or running) a pass
    and filling the handler slots."""
    from devd.daemon import MAX_WORKERS

    devd_home.start()
    trees = [repo.worktree(f"shop-{i}", f"b{i}") for i in range(4)]
    for tree in trees:
        devd_home.run("provision", str(tree))
    assert devd_home.stop() == 0
    devd_home.start()  # it answers ping: no status pass has run yet
    # More at once than there are slots: a `busy` one (nothing ran) is asked again by the
    # client, so every caller gets its answer.
    client = Client(devd_home.paths, autostart=False, timeout=30)
    with ThreadPoolExecutor(MAX_WORKERS + 8) as pool:
        answers = list(pool.map(lambda _: client.call("status"), range(MAX_WORKERS + 8)))
    for answer in answers:
        assert {w["path"] for w in answer["worktrees"]} >= {str(t) for t in trees}
        for wt in answer["worktrees"]:
            assert isinstance(wt["checked"], bool)
            assert wt["checked"] or all(r["state"] != "failed" for r in wt["resources"])
    # The first pass (under way all along, or run by the first caller) ends: no mark.
    wait_for(lambda: "not checked yet" not in devd_home.run("status").stdout.splitlines()[0],
             what="the first pass to end")
    assert devd_home.stop() == 0
