"""Processes: `devd run` runs in the worktree, signals reach only the process meant (pid
reuse steered in a private pid namespace), ancestry claims come only from the kernel, and a
gone worktree's servers are shown, stopped by gc or keep its ports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, Devd, Repo, run_git, wait_for
from test_ports import LISTEN, listen, row

REQUIRED = os.environ.get("DEVD_REQUIRE_INTEGRATION") == "1"

# A client that is not `devd run`: sends each request (a JSON list of [method, params]) on
# its own connection, prints each reply; with --stay it then sleeps (a process that
# recorded itself as a run stays alive to be looked at).
ASK = """
import json, socket, sys, time
for method, params in json.loads(sys.argv[2]):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    s.sendall(json.dumps({"v": 1, "method": method, "params": params}).encode() + b"\\n")
    data = b""
    while not data.endswith(b"\\n") or b'"ok"' not in data.splitlines()[-1]:
        chunk = s.recv(65536)
        if not chunk: break
        data += chunk
    print(data.decode().splitlines()[-1], flush=True)
if "--stay" in sys.argv: time.sleep(300)
"""


def ask(devd: Devd, requests: list[tuple[str, dict]], stay: bool = False
        ) -> tuple[list[dict], subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", ASK, str(devd.paths.socket),
                             json.dumps(requests), *(["--stay"] if stay else [])],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    replies = [json.loads(proc.stdout.readline()) for _ in requests]
    if not stay:
        proc.wait(timeout=10)
    return replies, proc


def tree_of(cwd: Path) -> subprocess.Popen[str]:
    """An unrelated process tree (a shell and its sleeping child), started outside devd."""
    proc = subprocess.Popen(["sh", "-c", "sleep 300 & echo started; wait"], cwd=cwd,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    return proc


def alive(proc: subprocess.Popen[str]) -> bool:
    return proc.poll() is None and all(c.status() != psutil.STATUS_ZOMBIE
                                       for c in psutil.Process(proc.pid).children())


def ended(pid: int) -> bool:
    """Exited (a zombie counts: whoever adopted it reaps it in its own time)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_tree(proc: subprocess.Popen[str]) -> None:
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    for each in family:
        each.kill()
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def pdevd(devd_home: Devd) -> Iterator[Devd]:
    devd_home.env.update({"DEVD_WATCHERS_NOTIFY": "0", "DEVD_KILL_TIMEOUT": "2"})
    devd_home.start()
    yield devd_home
    assert devd_home.stop() == 0, devd_home.log()


@pytest.fixture
def feat(pdevd: Devd, repo: Repo) -> Path:
    tree = repo.worktree("shop-feat-a", "feat/a")
    pdevd.run("provision", str(tree))
    return tree


def devd_run_listener(devd: Devd, tree: Path, port: int, cwd: Path,
                      path_arg: str | None = None, via: list[str] | None = None,
                      extra: list[str] | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "devd", "run", "--path", path_arg or str(tree), "--",
            *(via or []), sys.executable, "-c", LISTEN, str(port), *(extra or [])]
    proc = subprocess.Popen(argv, cwd=cwd, env=devd.env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return proc


# -- item 1: devd run runs in the worktree -------------------------------------------


def test_devd_run_from_the_main_checkout_serves_the_worktree(pdevd: Devd, repo: Repo,
                                                            feat: Path) -> None:
    port = pdevd.worktree(feat)["ports"]["web"]
    server = devd_run_listener(pdevd, feat, port, cwd=repo.main, path_arg="../shop-feat-a")
    try:
        assert Path(psutil.Process(server.pid).cwd()) == feat
        assert psutil.Process(server.pid).environ()["PWD"] == str(feat)
        assert row(pdevd, port)["owner_worktree"] == str(feat)
    finally:
        kill_tree(server)


def test_devd_run_keeps_a_subdirectory_of_the_worktree(pdevd: Devd, feat: Path) -> None:
    sub = feat / "frontend"
    sub.mkdir()
    port = pdevd.worktree(feat)["ports"]["web"]
    server = devd_run_listener(pdevd, feat, port, cwd=sub, path_arg=".")
    try:
        assert Path(psutil.Process(server.pid).cwd()) == sub
    finally:
        kill_tree(server)


def test_devd_run_from_a_nested_checkout_runs_in_the_asked_worktree(pdevd: Devd, repo: Repo
                                                                    ) -> None:
    pdevd.run("provision", str(repo.main))
    nested = repo.main / ".claude" / "worktrees" / "x"
    run_git(repo.main, "worktree", "add", "-q", "--detach", str(nested))
    port = pdevd.worktree(repo.main)["ports"]["web"]
    server = devd_run_listener(pdevd, repo.main, port, cwd=nested)
    try:
        assert Path(psutil.Process(server.pid).cwd()) == repo.main
    finally:
        kill_tree(server)


# -- item 10 (issue item 3): signals reach only the process meant --------------------

REUSE = """
import dataclasses, json, signal, socket, subprocess, sys, tempfile, time
import psutil
from pathlib import Path
from devd import errors, processes, registry, signals

def reuse(pid, cwd=None):
    # Inside a new pid namespace pids are handed out in order: the next one is pid itself.
    # A start time has 10 ms ticks: wait one out so the newcomer's start differs.
    time.sleep(0.03)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    other = subprocess.Popen(["sleep", "300"], cwd=cwd)
    assert other.pid == pid, (other.pid, pid)
    return other

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

out = {}
tree = Path(tempfile.mkdtemp())
reg = registry.Registry(tree / "r.sqlite3")
wt = reg.register("wt-1", tree, None, tree / ".git", tree, "r")
# kill-port: the holder is described, it exits, an unrelated process gets its pid.
port = free_port()
target = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(port)], cwd=tree,
                          stdout=subprocess.PIPE, text=True)
assert target.stdout.readline().strip() == "listening"
holder = processes.listeners()[port]
assert holder.pid == target.pid
target.kill(); target.wait()
other = reuse(target.pid, cwd=tree)
out["kill_port"] = processes.stop_holder(port, holder, wt, reg, 1.0)
out["kill_port_other_alive"] = other.poll() is None
# The same within one start-time tick (same pid, same start): the socket tells them apart.
same_tick = dataclasses.replace(holder, create_time=psutil.Process(other.pid).create_time())
try:
    out["same_tick"] = processes.stop_holder(port, same_tick, wt, reg, 1.0)
except errors.NotOwner as exc:
    out["same_tick"] = "refused: " + exc.message
out["same_tick_other_alive"] = other.poll() is None
# The pidfd itself: pinned before the exit, it never reaches the newcomer.
target = subprocess.Popen(["sleep", "300"])
with signals._pinned(target.pid) as pin:
    other.kill(); other.wait()
    target.kill(); target.wait()
    other = reuse(target.pid)
    try:
        signal.pidfd_send_signal(pin.fd, signal.SIGKILL)
        out["pidfd"] = "delivered"
    except ProcessLookupError:
        out["pidfd"] = "ESRCH"
out["pidfd_other_alive"] = other.poll() is None
# A recorded run (watchers --restart, idle stop, gc): it exits, its pid is reused.
run = subprocess.Popen(["sleep", "300"])
processes.record_run(reg, run.pid, "wt-1")
started = [t for p, t, _ in reg.processes()][0]
other.kill(); other.wait()
run.kill(); run.wait()
other = reuse(run.pid)
out["stop_run"] = processes.stop_run(reg, "wt-1", run.pid, started, 1.0)
out["stop_run_other_alive"] = other.poll() is None
other.kill()
print(json.dumps(out))
"""


def test_pid_reuse_is_refused_in_a_private_pid_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        if REQUIRED:
            pytest.fail("this test needs root and unshare on CI")
        pytest.skip("needs root and unshare(1) for a private pid namespace")
    done = subprocess.run(["unshare", "-pf", "--mount-proc", sys.executable, "-c", REUSE,
                           LISTEN],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out.pop("same_tick").startswith("refused: ") and out.pop("same_tick_other_alive")
    assert out == {"kill_port": "already exited", "kill_port_other_alive": True,
                   "pidfd": "ESRCH", "pidfd_other_alive": True,
                   "stop_run": "already exited", "stop_run_other_alive": True}, out


def test_a_forged_run_started_pid_1_makes_nothing_devd_started(pdevd: Devd, feat: Path,
                                                               tmp_path: Path) -> None:
    (reply,), _ = ask(pdevd, [("run_started", {"path": str(feat), "pid": 1, "argv": ["x"]})])
    assert reply["ok"] and reply["result"]["pid"] not in (1, None)  # the asker, not pid 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = pdevd.worktree(feat)["ports"]["web"]
    stranger = listen(port, elsewhere)
    try:
        assert row(pdevd, port)["owner_worktree"] is None
        refused = pdevd.run("kill-port", str(port), "--path", str(feat), check=False)
        assert refused.returncode == 1 and "no worktree" in refused.stderr
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_forged_run_events_and_restart_spare_an_unrelated_tree(pdevd: Devd, feat: Path,
                                                               tmp_path: Path) -> None:
    victim = tree_of(tmp_path)
    event = {"path": str(feat), "pid": victim.pid, "signature": "enospc", "budget": "watches",
             "line": "Error: ENOSPC: System limit for number of file watchers reached",
             "argv": ["sh", "-c", "true"], "cwd": str(feat)}
    forger = None
    try:
        for forged in (event, event | {"token": "0" * 32}):
            (refused,), _ = ask(pdevd, [("run_event", forged)])
            assert not refused["ok"] and refused["error"]["code"] == "not_owner"
        # A client may record itself as a run: a break it then reports, naming the victim's
        # pid, is its own run's, and a restart stops that run, never the victim.
        replies, forger = ask(pdevd, [("run_started", {"path": str(feat), "argv": ["true"]}),
                                      ("run_event", event)], stay=True)
        assert all(r["ok"] for r in replies), replies
        broken = pdevd.json("doctor")["broken"]
        assert [b["pid"] for b in broken] == [forger.pid], broken
        (sibling,), _ = ask(pdevd, [("run_event", event)])  # not the forger's family
        assert sibling["error"]["code"] == "not_owner"
        plan = json.loads(pdevd.run("watchers", "--restart", "--force", "--json").stdout)
        assert [r["pid"] for r in plan["runs"]] == [forger.pid], plan
        assert forger.wait(timeout=10) != 0  # stopped: it was a recorded run
        assert alive(victim)
    finally:
        kill_tree(victim)
        if forger is not None:
            kill_tree(forger)


def test_kill_port_refuses_a_server_in_an_unregistered_nested_checkout(pdevd: Devd,
                                                                       repo: Repo) -> None:
    pdevd.run("provision", str(repo.main))
    nested = repo.main / ".claude" / "worktrees" / "x"
    run_git(repo.main, "worktree", "add", "-q", "--detach", str(nested))
    port = pdevd.worktree(repo.main)["ports"]["web"]
    server = listen(port, nested)
    try:
        assert row(pdevd, port)["owner_worktree"] is None
        refused = pdevd.run("kill-port", str(port), "--path", str(repo.main), check=False)
        assert refused.returncode == 1 and "no worktree" in refused.stderr, refused.stderr
        assert server.poll() is None
    finally:
        server.kill()
        server.wait()


# -- item 10: a gone worktree's servers ------------------------------------------------


def gone_entry(devd: Devd, tree: Path) -> dict:
    wait_for(lambda: devd.worktree(tree)["state"] == "gone", what=f"{tree} to be gone")
    return devd.worktree(tree)


# A shell in between: the listener is the recorded run's child (npm -> node, say).
CHILD = ["python3", "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]


@pytest.mark.parametrize(("via", "extra", "outcome"), [
    ([], [], "terminated"), ([], ["--stubborn"], "killed"), (CHILD, [], "terminated")],
    ids=["server", "stubborn", "child"])
def test_a_gone_worktrees_devd_run_server_is_shown_then_stopped_by_gc(
        pdevd: Devd, repo: Repo, feat: Path, via: list[str], extra: list[str],
        outcome: str) -> None:
    port = pdevd.worktree(feat)["ports"]["web"]
    run = devd_run_listener(pdevd, feat, port, cwd=repo.main, via=via, extra=extra)
    server = row(pdevd, port)["pid"]
    try:
        run_git(repo.main, "worktree", "remove", "--force", str(feat))
        entry = gone_entry(pdevd, feat)
        shown = [(p["pid"], p["port"], p["devd_run"]) for p in entry["processes"]]
        assert (server, port, True) in shown, entry["processes"]
        assert row(pdevd, port)["owner_worktree"] == str(feat)
        assert "(its worktree is gone)" in pdevd.run("ports").stdout
        assert f"gone, but pid {server} " in pdevd.run("status").stdout  # a warning
        assert f"running  pid {server}" in pdevd.run("status", "-v").stdout
        gc = pdevd.json("gc", "--grace", "0")
        assert gc["worktrees"][0]["released"], gc
        assert gc["worktrees"][0]["stopped"] == [{"pid": run.pid, "outcome": outcome}]
        assert run.wait(timeout=10) != 0 and ended(server)
        assert all(r["worktree"] != str(feat) for r in pdevd.json("ports"))
    finally:
        kill_tree(run)


def test_gc_keeps_the_port_of_a_gone_worktrees_foreign_server(pdevd: Devd, repo: Repo,
                                                             feat: Path) -> None:
    port = pdevd.worktree(feat)["ports"]["web"]
    server = listen(port, feat)  # started by hand, not through `devd run`
    try:
        run_git(repo.main, "worktree", "remove", "--force", str(feat))
        entry = gone_entry(pdevd, feat)
        assert [(p["pid"], p["port"], p["devd_run"]) for p in entry["processes"]] == \
            [(server.pid, port, False)]
        refused = pdevd.run("gc", "--grace", "0", check=False)
        assert refused.returncode == 1, refused.stdout
        assert f"{port} (web) by pid {server.pid}" in refused.stdout
        assert server.poll() is None and row(pdevd, port)["worktree"] == str(feat)
        assert f"devd kill-port {port} --path {feat}" in refused.stdout + refused.stderr
        # The command it names works on the gone worktree's server.
        pdevd.run("kill-port", str(port), "--path", str(feat))
        assert server.wait(timeout=10) != 0
        pdevd.run("gc", "--grace", "0")
        assert all(r["worktree"] != str(feat) for r in pdevd.json("ports"))
    finally:
        server.kill()
        server.wait()


def test_the_restart_command_doctor_prints_runs_where_the_watcher_ran(
        pdevd: Devd, feat: Path, tmp_path: Path) -> None:
    sub = feat / "frontend"
    sub.mkdir()
    line = "Error: ENOSPC: System limit for number of file watchers reached, watch '/x'"
    where = tmp_path / "cwd.txt"
    script = (f"import os, sys; open({str(where)!r}, 'w').write(os.getcwd()); "
              f"print({line!r}, file=sys.stderr)")
    pdevd.run("run", "--", sys.executable, "-c", script, cwd=sub, check=False)
    assert where.read_text() == str(sub)
    command = pdevd.json("doctor")["broken"][0]["restart"]
    assert command.startswith(f"cd {sub} && devd run -- ")
    where.unlink()
    # Run exactly what a person would paste, from somewhere else entirely.
    done = subprocess.run(["sh", "-c", command.replace("devd run", f"{sys.executable} -m devd "
                                                       "run", 1)],
                          cwd="/", env=pdevd.env, capture_output=True, text=True, timeout=60)
    assert line in done.stderr and where.read_text() == str(sub)
