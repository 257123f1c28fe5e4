"""Attacks on issue 10's fixes that their own tests did not drive: a run attested by a peer
pid that was reused before the request was read, a fake daemon's ping pid, a deleted cwd,
relative paths in raw requests, DEVD_TIMEOUT beyond what a socket takes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, Devd, Repo, run_git
from test_ports import listen, row
from test_processes import REQUIRED, ask

# Runs as pid 1 of a private pid namespace, with its own daemon. Process A connects to the
# daemon and exits at once, leaving the connection to its child B; A's pid is then steered
# to an unrelated `sleep` (the victim) before B sends run_started. The kernel's peer pid
# (SO_PEERCRED, taken at connect) now names the victim: was it recorded as a `devd run`,
# and does gc of the gone worktree kill it?
STALE_PEER = """
import json, os, socket, subprocess, sys, time
sock_path, tree, main, elsewhere, log_path = sys.argv[1:6]
log = open(log_path, "ab")
daemon = subprocess.Popen([sys.executable, "-m", "devd", "daemon"], stdout=log, stderr=log)
def devd(*args):
    return subprocess.run([sys.executable, "-m", "devd", *args], capture_output=True, text=True,
                          timeout=60)
# Until it answers, not until the socket exists: the socket takes connections before the
# daemon's startup ends, and a loaded machine can take longer than a client's timeout.
deadline = time.monotonic() + 120
while devd("status").returncode != 0 and time.monotonic() < deadline:
    time.sleep(0.1)
assert devd("provision", tree).returncode == 0
go_r, go_w = os.pipe()
out_r, out_w = os.pipe()
a = os.fork()
if a == 0:  # A: connect, hand the connection to B, exit
    s = socket.socket(socket.AF_UNIX); s.connect(sock_path)
    if os.fork() == 0:  # B
        os.read(go_r, 1)
        s.sendall(json.dumps({"v": 1, "method": "run_started",
                              "params": {"path": tree, "argv": ["x"]}}).encode() + b"\\n")
        data = b""
        while b"\\n" not in data:
            chunk = s.recv(65536)
            if not chunk: break
            data += chunk
        os.write(out_w, data)
        os._exit(0)
    os._exit(0)
os.waitpid(a, 0)
time.sleep(0.3)  # the daemon has accepted A's connection by now
for _ in range(100):  # the daemon (its reconcile runs git) may fork between write and fork
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(a - 1))
    victim = subprocess.Popen(["sleep", "300"], cwd=elsewhere)
    if victim.pid == a:
        break
    victim.kill(); victim.wait(); time.sleep(0.05)
result = {"steered": victim.pid == a}
os.write(go_w, b"x")
reply = json.loads(os.read(out_r, 65536).decode().splitlines()[-1])
result["recorded"] = (reply.get("result") or {}).get("pid")
result["victim"] = victim.pid
subprocess.run(["git", "-C", main, "worktree", "remove", "--force", tree], check=True)
result["gc"] = devd("gc", "--grace", "0").returncode
time.sleep(0.5)
result["victim_alive"] = victim.poll() is None
victim.kill()
daemon.terminate(); daemon.wait(timeout=20)
print(json.dumps(result))
"""


def test_a_peer_pid_reused_before_run_started_is_not_recorded(devd_home: Devd, repo: Repo,
                                                              tmp_path: Path) -> None:
    out = in_pid_namespace(STALE_PEER, devd_home, repo, tmp_path)
    assert out["steered"], out
    assert out["recorded"] != out["victim"], out  # the victim never became a `devd run`
    assert out["victim_alive"], out  # and gc of the gone worktree did not kill it


# The same daemon set-up; now each client waits for its reply (it is recorded while alive)
# but exits at once after, and its pid is steered to a `sleep` started within the same 10 ms
# start-time tick, so (pid, start time) names the victim too. gc must kill none of them.
SAME_TICK = STALE_PEER[:STALE_PEER.index("go_r, go_w")] + """
request = json.dumps({"v": 1, "method": "run_started",
                      "params": {"path": tree, "argv": ["x"]}}).encode() + b"\\n"
victims = []
for _ in range(20):
    a = os.fork()
    if a == 0:
        s = socket.socket(socket.AF_UNIX); s.connect(sock_path); s.sendall(request)
        while b"\\n" not in s.recv(65536):
            pass
        os._exit(0)
    os.waitpid(a, 0)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(a - 1))
    victims.append(subprocess.Popen(["sleep", "300"], cwd=elsewhere))
subprocess.run(["git", "-C", main, "worktree", "remove", "--force", tree], check=True)
gc = devd("gc", "--grace", "0")
time.sleep(0.5)
print(json.dumps({"gc": gc.returncode, "killed": sum(v.poll() is not None for v in victims)}))
for v in victims:
    v.kill()
daemon.terminate(); daemon.wait(timeout=20)
"""


def in_pid_namespace(script: str, devd_home: Devd, repo: Repo, tmp_path: Path) -> dict:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        if REQUIRED:
            pytest.fail("this test needs root and unshare on CI")
        pytest.skip("needs root and unshare(1) for a private pid namespace")
    tree = repo.worktree("shop-feat-a", "feat/a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**devd_home.env, "DEVD_WATCHERS_NOTIFY": "0", "DEVD_KILL_TIMEOUT": "2"}
    done = subprocess.run(["unshare", "-pf", "--mount-proc", sys.executable, "-c", script,
                           str(devd_home.paths.socket), str(tree), str(repo.main),
                           str(elsewhere), str(devd_home.home / "daemon-test.log")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr + devd_home.log()
    return json.loads(done.stdout.splitlines()[-1])


def test_a_run_that_exits_within_its_start_tick_leaves_no_stranger_to_kill(
        devd_home: Devd, repo: Repo, tmp_path: Path) -> None:
    out = in_pid_namespace(SAME_TICK, devd_home, repo, tmp_path)
    assert out == {"gc": 0, "killed": 0}, out


# A same-uid stand-in for a daemon on devd's socket that says its pid is the victim's: a
# daemon in another pid namespace (a container sharing the runtime dir) says a pid that
# means someone else here, and a confused one can say anything.
FAKE_DAEMON = """
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        if c.recv(65536):
            c.sendall(json.dumps({"ok": True, "result": {"pid": int(sys.argv[2]),
                                                         "version": "0"}}).encode() + b"\\n")
    except OSError:
        pass
    c.close()
"""


def test_stop_autostarted_never_signals_a_pid_only_ping_named(devd_home: Devd,
                                                              tmp_path: Path) -> None:
    from devd import service
    from devd.paths import ensure_private_dir

    victim = subprocess.Popen(["sleep", "300"])
    paths = devd_home.paths
    ensure_private_dir(paths.runtime_dir)
    fake = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON, str(paths.socket),
                             str(victim.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        said: list[str] = []
        service.stop_autostarted(paths, said.append)
        assert victim.poll() is None, said
        assert fake.poll() is None and said and "did not stop" in said[-1], said
    finally:
        for proc in (victim, fake):
            proc.kill()
            proc.wait()


def test_stop_autostarted_stops_the_daemon_the_cli_started(devd: Devd) -> None:
    from devd import service

    assert devd.proc is not None
    said: list[str] = []
    service.stop_autostarted(devd.paths, said.append)
    assert devd.proc.wait(timeout=20) == 0 and "stopped the daemon" in said[-1], said
    devd.proc = None


def test_the_cli_in_a_deleted_directory_says_so(devd: Devd, tmp_path: Path) -> None:
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    # A shell whose directory was removed under it (a worktree just removed): `cd` into
    # it, remove it, then run devd there.
    env = {k: v for k, v in devd.env.items() if k != "CLAUDE_PROJECT_DIR"}
    for args in (["env"], ["provision"], ["run", "--", "true"], ["kill-port", "1"],
                 ["hook", "claude-create"]):
        script = f"cd {doomed} && rmdir {doomed} && exec {sys.executable} -m devd " + \
            " ".join(args)
        doomed.mkdir(exist_ok=True)
        done = subprocess.run(["sh", "-c", script], env=env, capture_output=True,
                              text=True, timeout=30, input='{"name": "x"}')
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "current directory" in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["1e308", "1e12", "1e10"])
def test_a_huge_devd_timeout_is_a_usage_error(devd: Devd, value: str) -> None:
    done = devd.run("status", env={"DEVD_TIMEOUT": value}, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "DEVD_TIMEOUT" in done.stderr


def test_a_relative_path_in_a_request_is_refused(devd_home: Devd, repo: Repo) -> None:
    # A daemon started by hand in a worktree (`devd daemon` in a terminal there): a script
    # that sends "." or /proc/self/cwd must not have it taken as the daemon's directory.
    tree = repo.worktree("shop-feat-a", "feat/a")
    log = open(devd_home.home / "daemon-test.log", "ab")  # noqa: SIM115 - closed below
    devd_home.proc = subprocess.Popen([sys.executable, "-m", "devd", "daemon"], cwd=tree,
                                      env=devd_home.env, stdout=log, stderr=log)
    try:
        from conftest import _answers, wait_for
        wait_for(lambda: _answers(devd_home.paths.socket), what="daemon socket")
        devd_home.run("provision", str(tree))
        for path in (".", "shop-feat-a", "/proc/self/cwd", f"{tree}/../not-a-checkout"):
            (reply,), _ = ask(devd_home, [("release", {"path": path, "yes": True})])
            assert not reply["ok"] and reply["error"]["code"] in ("usage", "not_a_worktree"), \
                (path, reply)
        assert devd_home.worktree(tree)["state"] == "ready"
    finally:
        devd_home.stop()
        log.close()


def test_a_client_that_never_reads_its_replies_does_not_hold_the_daemon(devd: Devd,
                                                                        repo: Repo) -> None:
    # 40 clients ask and never read (their replies stay in the socket buffer): the daemon
    # still answers a 41st at once. (Once its first check pass is done: requests that arrive
    # before it wait for that one pass, and 40 of them at once fill the workers.)
    devd.json("status")
    sockets = []
    try:
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(devd.paths.socket))
            s.sendall(b'{"v": 1, "method": "status", "params": {}, "heartbeat": true}\n')
            sockets.append(s)
        assert devd.json("status")["worktrees"] == []
    finally:
        for s in sockets:
            s.close()


def test_concurrent_gc_and_provision_of_a_recreated_worktree(devd: Devd, repo: Repo) -> None:
    # gc of a gone worktree while it is re-created and provisioned: either gc releases it
    # first and provision registers it anew, or gc leaves it; never a registered worktree
    # without its .env.
    tree = repo.worktree("shop-feat-a", "feat/a")
    devd.run("provision", str(tree))
    for _ in range(3):
        run_git(repo.main, "worktree", "remove", "--force", str(tree))
        devd.run("status")  # notices it gone
        gc = threading.Thread(target=devd.run, args=("gc", "--grace", "0"))
        gc.start()
        run_git(repo.main, "worktree", "add", "-q", str(tree), "feat/a")
        devd.run("provision", str(tree))
        gc.join()
        entry = devd.worktree(tree)
        if entry["state"] == "ready":
            assert (tree / ".env").is_file(), entry
    assert ROOT.is_dir()


def test_a_flood_of_background_provisions_queues_one_thread_per_worktree(
        devd_home: Devd, repo: Repo) -> None:
    # A Postgres that accepts connections and never answers: each provision waits out its
    # connect timeout, so requests pile up behind the worktree's lock.
    import psutil

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1024)
    tree = repo.worktree("shop-feat-a", "feat/a")
    (tree / "devd.toml").write_text(
        '[postgres]\nmode = "schema"\n'
        f'url = "postgresql://u:p@127.0.0.1:{silent.getsockname()[1]}/x"\n')
    devd_home.start()
    try:
        request = {"path": str(tree), "background": True}
        replies, _ = ask(devd_home, [("provision", request)] * 200)
        assert all(reply["ok"] for reply in replies)
        assert devd_home.proc is not None
        threads = psutil.Process(devd_home.proc.pid).num_threads()
        assert threads < 30, threads
    finally:
        assert devd_home.proc is not None
        devd_home.proc.kill()
        devd_home.proc.wait()
        devd_home.proc = None
        silent.close()


@pytest.mark.parametrize("name", ["DEVD_REQUEST_TIMEOUT", "DEVD_KILL_TIMEOUT",
                                  "DEVD_RECONCILE_INTERVAL", "DEVD_WATCHERS_FULL_INTERVAL"])
def test_a_setting_in_seconds_too_large_for_select_is_refused_at_start(devd_home: Devd,
                                                                        name: str) -> None:
    # DEVD_REQUEST_TIMEOUT=1e9 was taken, and the first client that connected ended the
    # serve loop (OverflowError from select); the others overflow a wait() the same way.
    done = subprocess.run([sys.executable, "-m", "devd", "daemon"], capture_output=True,
                          text=True, timeout=30, env={**devd_home.env, name: "1e9"})
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert name.removeprefix("DEVD_").lower() in done.stderr.lower(), done.stderr


def test_a_server_in_a_submodule_of_the_worktree_is_the_worktrees(devd: Devd, repo: Repo,
                                                                   make_repo) -> None:
    # A submodule's `.git` file made it "another checkout nested in the worktree": `ports`
    # said "outside any worktree" and kill-port refused the worktree's own server.
    lib = make_repo("lib", devd_toml=None)
    run_git(repo.main, "-c", "protocol.file.allow=always", "submodule", "add", "-q",
            str(lib.main), "packages/lib")
    run_git(repo.main, "commit", "-q", "-m", "submodule")
    tree = repo.worktree("shop-feat-a", "feat/a")
    run_git(tree, "-c", "protocol.file.allow=always", "submodule", "update", "-q", "--init")
    devd.run("provision", str(tree))
    port = devd.worktree(tree)["ports"]["web"]
    server = listen(port, tree / "packages" / "lib")
    try:
        assert row(devd, port)["owner_worktree"] == str(tree)
        devd.run("kill-port", str(port), "--path", str(tree))
        assert server.wait(timeout=20) is not None
    finally:
        server.kill()
        server.wait()


# 200 short-lived clients, each recorded as a run, each gone at once (a script looping
# `devd run -- true`): every record stayed until gc, and each `ports` or `status` holder
# lookup read them all (130 ms per holder with 100k records).
SHORT_RUNS = """
import json, os, socket, sys
request = json.dumps({"v": 1, "method": "run_started",
                      "params": {"path": sys.argv[2], "argv": ["true"]}}).encode() + b"\\n"
for _ in range(200):
    child = os.fork()
    if child == 0:
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(request)
        while b"\\n" not in s.recv(65536):
            pass
        os._exit(0)
    os.waitpid(child, 0)
"""


def test_records_of_exited_runs_do_not_pile_up(devd: Devd, repo: Repo) -> None:
    from devd.registry import Registry

    tree = repo.worktree("shop-feat-a", "feat/a")
    devd.run("provision", str(tree))
    subprocess.run([sys.executable, "-c", SHORT_RUNS, str(devd.paths.socket), str(tree)],
                   check=True, timeout=120)
    registry = Registry(devd.paths.registry)
    try:
        assert len(registry.processes()) <= 2
    finally:
        registry.close()
