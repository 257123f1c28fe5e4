"""Watcher budget, recovery: break records that outlive the daemon, restarting failed
watchers once the limit rose, stopping idle devd-started watchers. Real daemon, real
inotify, real user namespaces with a lowered limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Devd, Repo, wait_for

# The fixtures `wdevd` and `chokidar` come from test_watchers (one npm install a session).
from test_watchers import WATCHER, chokidar, fill, need_userns, start_watcher, stop, wdevd  # noqa: F401

ENOSPC = "Error: ENOSPC: System limit for number of file watchers reached, watch '/x'"


def test_broken_survives_a_daemon_restart(wdevd: Devd, repo: Repo) -> None:  # noqa: F811
    tree = repo.worktree("shop-a", "a")
    wdevd.run("provision", str(tree))
    code = f"import sys; print({ENOSPC!r}, file=sys.stderr); sys.exit(1)"
    wdevd.run("run", "--path", str(tree), "--", sys.executable, "-c", code, check=False)
    assert wdevd.worktree(tree)["watchers"]["state"] == "broken"
    assert wdevd.stop() == 0
    wdevd.start()
    state = wdevd.worktree(tree)["watchers"]
    assert state["state"] == "broken" and "ENOSPC" in state["reason"]
    broken = wdevd.json("doctor")["broken"]
    assert broken[0]["argv"][:2] == [sys.executable, "-c"] and broken[0]["worktree"] == str(tree)


# Runs inside `unshare -Ur` and obeys one JSON line at a time: {"limit": N} sets the
# namespace's watch limit, {"spawn": argv, ...} starts a process and answers its pid,
# {"call": argv} runs one to the end and answers its stdout. Kills what it spawned at EOF.
NS_SHELL = r"""
import json, subprocess, sys
procs = []
for line in sys.stdin:
    req = json.loads(line)
    if "limit" in req:
        open("/proc/sys/user/max_inotify_watches", "w").write(str(req["limit"]))
        answer = "ok"
    elif "spawn" in req:
        p = subprocess.Popen(req["spawn"], cwd=req["cwd"], stdout=open(req["out"], "wb"),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        procs.append(p); answer = p.pid
    else:
        done = subprocess.run(req["call"], capture_output=True, text=True)
        answer = {"code": done.returncode, "out": done.stdout, "err": done.stderr}
    print(json.dumps(answer), flush=True)
for p in procs:
    p.kill(); p.wait()
"""


class Namespace:
    """A user namespace of our own, with its own inotify watch limit."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(["unshare", "-Ur", sys.executable, "-c", NS_SHELL],
                                     env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def ask(self, **request: object) -> object:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def devd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "devd", *args]


def test_restart_after_the_limit_rises(
        wdevd: Devd, repo: Repo, chokidar: Path, tmp_path: Path) -> None:  # noqa: F811
    need_userns()
    tree = repo.worktree("shop-c", "c")
    fill(tree, 20, 3)
    wdevd.run("provision", str(tree))
    ns = Namespace(wdevd.env)
    restarted: list[int] = []
    try:
        ns.ask(limit=30)  # far below the ~80 watches chokidar wants here
        first = tmp_path / "first.log"
        ns.ask(spawn=devd_argv("run", "--path", str(tree), "--", "node",
                               str(chokidar / "watch.js"),
                               str(chokidar / "node_modules" / "chokidar")),
               cwd=str(tree / "src"), out=str(first))
        wait_for(lambda: wdevd.worktree(tree)["watchers"]["state"] == "broken", timeout=60,
                 what="broken state")
        # Still no room: devd refuses, since the watcher would break again at once.
        early = ns.ask(call=devd_argv("watchers", "--restart", "--json"))
        plan = json.loads(early["out"])
        assert plan["runs"] == [] and "raise the limit" in plan["skipped"][0]["why"]
        assert early["code"] == 1  # a refusal is no success
        ns.ask(limit=100_000)
        done = ns.ask(call=devd_argv("watchers", "--restart", "--json"))
        plan = json.loads(done["out"])
        assert [r["worktree"] for r in plan["runs"]] == [str(tree)], done
        run = plan["runs"][0]
        restarted.append(run["new_pid"])
        assert run["cwd"] == str(tree / "src") and run["argv"][0] == "node"
        log = Path(run["log"])
        assert log.parent == wdevd.paths.state_dir / "watchers"
        wait_for(lambda: "ready" in log.read_text(), timeout=60, what="restarted chokidar")
        assert "ENOSPC" not in log.read_text()
        fresh = wdevd.json("watchers")["worktrees"]  # a fresh pass (status may reuse one)
        state = next(w for w in fresh if w["path"] == str(tree))
        assert state["state"] == "ok" and run["new_pid"] in state["pids"], state
        assert state["watches"] >= 60
        assert wdevd.json("doctor")["broken"] == []
        again = ns.ask(call=devd_argv("watchers", "--restart"))
        assert "nothing to restart" in again["out"] and again["code"] == 0
    finally:
        for pid in restarted:
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
        ns.close()


def test_idle_devd_started_watchers_are_stopped_and_nothing_else(devd_home: Devd, repo: Repo
                                                                 ) -> None:
    devd_home.env.update({"DEVD_WATCHERS_NOTIFY": "0", "DEVD_WATCHERS_IDLE_STOP": "3s",
                          "DEVD_WATCHERS_FULL_INTERVAL": "0.5", "DEVD_KILL_TIMEOUT": "1"})
    devd_home.start()
    tree = repo.worktree("shop-a", "a")
    fill(tree, 5)
    devd_home.run("provision", str(tree))
    stubborn = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + WATCHER
    run = [sys.executable, "-m", "devd", "run", "--path", str(tree), "--"]
    ours = subprocess.Popen([*run, sys.executable, "-c", stubborn, str(tree), "", str(ROOT)],
                            env=devd_home.env, stdout=subprocess.PIPE, text=True)
    quiet = subprocess.Popen([*run, "sleep", "600"], env=devd_home.env)  # no inotify: kept
    stranger, _ = start_watcher(tree, tree)  # not started by devd: never touched
    try:
        assert ours.stdout and ours.stdout.readline().startswith("watching")
        # Edits keep it in use: well past the idle time, it still runs.
        edited = tree / "src" / "d0" / "f0.txt"
        for n in range(25):
            edited.write_text(f"edit {n}\n")
            subprocess.run(["sleep", "0.2"], check=True)
            assert ours.poll() is None
        assert ours.wait(timeout=60) == -9  # SIGTERM ignored, so SIGKILL
        assert stranger.poll() is None and quiet.poll() is None
        wait_for(lambda: devd_home.worktree(tree)["watchers"]["state"] == "stopped",
                 what="stopped state")  # status may reuse a pass up to 2 s old
        assert "without use" in devd_home.worktree(tree)["watchers"]["reason"]
        assert f"stopped idle watcher pid {ours.pid}" in devd_home.log()
    finally:
        stop(stranger)
        for proc in (ours, quiet):
            proc.kill()
            proc.wait()
        devd_home.stop()
