"""Silent starvation (issue 13): a real Vite that logs nothing, starved of watches in a user
namespace of its own, is `partial` at the next full pass while a healthy worktree beside it
reads ok; `devd doctor` names the limit that binds there (the namespace's) and `--fix`
raises that one; inside a namespace the machine's sysctls are never written."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, Devd, Repo, wait_for

# One user namespace with its own limit (test_watchers_recovery), the daemon fixture.
from test_watchers import REQUIRED, chokidar, fill, need_userns, wdevd  # noqa: F401
from test_watchers_recovery import Namespace, devd_argv

from devd.watchers.estimate import estimate
from devd.watchers.linux import Limit, binding_limits


@pytest.fixture(scope="session")
def vite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vite@5 from the npm registry, installed once per session: its bin script."""
    if not shutil.which("npm") or not shutil.which("node"):
        if REQUIRED:
            pytest.fail("node and npm are required on CI")
        pytest.skip("node/npm not installed")
    where = tmp_path_factory.mktemp("vite")
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "vite@5"],
                          cwd=where, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"npm install vite@5 failed: {done.stderr[-2000:]}")
    return where / "node_modules" / "vite" / "bin" / "vite.js"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _vite(vite: Path, tree: Path, port: int) -> list[str]:
    """A silent Vite dev server of `tree`, through `devd run` (so devd started it)."""
    return devd_argv("run", "--path", str(tree), "--", "node", str(vite), "--logLevel",
                     "silent", "--port", str(port), "--strictPort", "--host", "127.0.0.1")


# chokidar as tools that "keep going" use it: errors swallowed, nothing printed, the process
# alive (with no watch at all and nothing else to do, node would just exit); a file says
# when its initial walk is done.
QUIET_CHOKIDAR = """
const chokidar = require(process.argv[2]);
const w = chokidar.watch(process.env.DEVD_WORKTREE,
  {ignored: /(^|[\\/\\\\])(\\.git|node_modules)([\\/\\\\]|$)/, ignoreInitial: true});
w.on('error', () => {});
w.on('ready', () => require('fs').writeFileSync(process.argv[3], 'ready'));
setInterval(() => {}, 1 << 30);  // what a dev server's listening socket does: it lives on
"""


def test_starved_watchers_that_say_nothing_are_seen_and_doctor_fixes_the_namespace(
        wdevd: Devd, make_repo, vite: Path, chokidar: Path, tmp_path: Path  # noqa: F811
        ) -> None:
    need_userns()
    repo: Repo = make_repo("shop")
    healthy, crashed, quiet, none = (repo.worktree(f"shop-{n}", n)
                                     for n in ("ok", "vite", "quiet", "none"))
    for tree in (healthy, crashed, quiet, none):
        fill(tree, 5, 3)
        wdevd.run("provision", str(tree))
    need = estimate(str(quiet)).chokidar
    ports = {tree: wdevd.worktree(tree)["ports"]["web"] for tree in (healthy, crashed)}
    with open(tmp_path / "ok.log", "wb") as out:
        ok = subprocess.Popen(_vite(vite, healthy, ports[healthy]), cwd=healthy,
                              env=wdevd.env, stdout=out, stderr=subprocess.STDOUT)
    script, ready = tmp_path / "quiet.js", tmp_path / "quiet.ready"
    script.write_text(QUIET_CHOKIDAR)
    ns = Namespace(wdevd.env)
    try:
        # A silent Vite that gets no watch at all dies of the error, which node prints
        # whatever --logLevel says: `devd run` sees the line, and the worktree is broken.
        ns.ask(limit=0)
        ns.ask(spawn=_vite(vite, crashed, ports[crashed]), cwd=str(crashed),
               out=str(tmp_path / "crashed.log"))
        wait_for(lambda: wdevd.worktree(crashed)["watchers"]["state"] == "broken",
                 timeout=60, what="the starved Vite broken")
        assert "ENOSPC" in wdevd.worktree(crashed)["watchers"]["reason"]
        # A watcher that swallows the error and keeps going with no watch at all: it keeps
        # its inotify instance (libuv made it before inotify_add_watch failed), holding
        # none: partial at the next full pass (each status --fresh takes one).
        ns.ask(limit=0)
        none_ready = tmp_path / "none.ready"
        ns.ask(spawn=devd_argv("run", "--path", str(none), "--", "node", str(script),
                               str(chokidar / "node_modules" / "chokidar"), str(none_ready)),
               cwd=str(none), out=str(tmp_path / "none.log"))
        wait_for(none_ready.exists, timeout=60, what="the starved chokidar's walk")
        wait_for(lambda: wdevd.worktree(none)["watchers"]["state"] == "partial",
                 what="the chokidar with no watch partial")
        assert re.search(r"pid \d+ holds 0 of the ~\d+ watches",
                         wdevd.worktree(none)["watchers"]["reason"])
        # One that keeps going with 2 watches: partial too.
        ns.ask(limit=2)
        ns.ask(spawn=devd_argv("run", "--path", str(quiet), "--", "node", str(script),
                               str(chokidar / "node_modules" / "chokidar"), str(ready)),
               cwd=str(quiet), out=str(tmp_path / "quiet.log"))
        wait_for(ready.exists, timeout=60, what="the quiet chokidar's walk")
        state = wdevd.worktree(quiet)["watchers"]
        assert state["state"] == "partial", state
        assert re.search(rf"pid \d+ holds 2 of the ~{need} watches", state["reason"]), state
        # The healthy worktree beside them reads ok, the budget apart.
        wait_for(lambda: _listening(ports[healthy]), timeout=60, what="the healthy Vite")
        wait_for(lambda: wdevd.worktree(healthy)["watchers"]["state"] == "ok",
                 what="the healthy worktree ok")
        good = wdevd.worktree(healthy)["watchers"]
        assert good["watches"] >= need - 2 and good["budget"] == state["budget"], good
        # doctor inside the namespace: its own limit binds, and the fix is for that one.
        inside = json.loads(ns.ask(call=devd_argv("doctor", "--json"))["out"])
        assert {"sysctl": "user.max_inotify_watches", "value": 2, "namespace": True} \
            in inside["limits"]
        assert "sysctl -w user.max_inotify_watches=524288" in inside["fix"]["now"]
        assert sorted(p["worktree"] for p in inside["partial"]) == sorted([str(quiet), str(none)])
        text = ns.ask(call=devd_argv("doctor"))["out"]
        assert "binding limit: user.max_inotify_watches = 2 (this user namespace's)" in text
        fixed = ns.ask(call=devd_argv("doctor", "--fix", "--json"))
        assert fixed["code"] == 0 and "Traceback" not in fixed["err"], fixed
        applied = json.loads(fixed["out"])["applied"]
        assert applied["done"] and "user.max_inotify_watches=524288" in applied["why"]
        assert "fs.inotify.max_user_instances is the machine's" in applied["why"]
        raised = ns.ask(call=["cat", "/proc/sys/user/max_inotify_watches"])
        assert raised["out"].strip() == "524288"
        # Now there is room: both are started again, and get their watches.
        done = ns.ask(call=devd_argv("watchers", "--restart", "--json"))
        assert done["code"] == 0, done
        plan = json.loads(done["out"])
        assert sorted(r["worktree"] for r in plan["runs"]) == \
            sorted([str(crashed), str(quiet), str(none)])
        for tree in (crashed, quiet, none):
            wait_for(lambda tree=tree: wdevd.worktree(tree)["watchers"]["state"] == "ok",
                     timeout=60, what="restarted watchers ok")
    finally:
        for run in locals().get("plan", {}).get("runs", []):
            subprocess.run(["kill", "-KILL", str(run["new_pid"])], check=False)
        ok.kill()
        ok.wait()
        ns.close()


# Run as nobody inside `unshare -Ur`: the namespace's root is then no one outside, so even a
# bug could not write the machine's sysctls. Prints [fix, what --fix did].
FIX_IN_NS = """
import json, sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] != "-":
    open("/proc/sys/user/max_inotify_watches", "w").write(sys.argv[2])
from devd.watchers import doctor
result = doctor.localise({"fix_needed": True})
print(json.dumps([result["fix"], doctor.apply_fix(result), result["limits"]]))
"""


@pytest.mark.parametrize("limit", ["-", "10"])
def test_doctor_fix_inside_a_namespace_raises_only_the_namespace_s_limit(limit: str) -> None:
    need_userns()
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None or not shutil.which("setpriv"):
        pytest.skip("no system python3 or setpriv to run as another user")
    done = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                           "unshare", "-Ur", python, "-c", FIX_IN_NS, str(ROOT), limit],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    fix, applied, limits = json.loads(done.stdout)
    if limit == "-":  # the namespace's own limit is huge: the machine's binds
        assert not fix["namespace"] and fix["now"][0].startswith(
            "sudo sysctl -w fs.inotify.max_user_watches=")
        assert not applied["done"] and "inside a user namespace" in applied["why"]
    else:
        assert limits[0] == {"sysctl": "user.max_inotify_watches", "value": 10,
                             "namespace": True}
        assert fix["namespace"] and applied["done"], applied


def test_the_lower_limit_binds_and_a_tie_names_the_namespace(tmp_path: Path) -> None:
    def proc(machine: int, own: int, uid_map: str) -> str:
        for name, value in (("fs/inotify/max_user_watches", machine),
                            ("user/max_inotify_watches", own),
                            ("fs/inotify/max_user_instances", 128),
                            ("user/max_inotify_instances", 128)):
            (tmp_path / "sys" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "sys" / name).write_text(f"{value}\n")
        (tmp_path / "self").mkdir(exist_ok=True)
        (tmp_path / "self" / "uid_map").write_text(uid_map)
        return str(tmp_path)

    child = "         0      65534          1\n"
    initial = "         0          0 4294967295\n"
    assert binding_limits(proc(8192, 30, child))[0] == Limit("user.max_inotify_watches", 30)
    assert binding_limits(proc(8192, 2**31 - 1, child))[0] == \
        Limit("fs.inotify.max_user_watches", 8192)
    assert binding_limits(proc(50, 50, child)) == (Limit("user.max_inotify_watches", 50),
                                                   Limit("user.max_inotify_instances", 128))
    # The initial namespace: user.* is the machine's limit under another name.
    assert binding_limits(proc(50, 10, initial))[0] == Limit("fs.inotify.max_user_watches", 50)
    assert Limit("user.max_inotify_watches", 1).path == "/proc/sys/user/max_inotify_watches"


def test_a_silent_vite_service_starved_of_watches_is_broken_and_restarted(
        devd_home: Devd, make_repo, vite: Path) -> None:
    """A declared service writes to its log, not through `devd run`'s scanner: the
    supervisor scans that log, so a silent Vite that dies of ENOSPC (node prints it
    whatever --logLevel says) reads broken at once; `devd watchers --restart` starts the
    service again under the daemon once the limit rose. The daemon runs in the namespace."""
    need_userns()
    command = f"node {vite} --logLevel silent --port $PORT --strictPort --host 127.0.0.1"
    repo: Repo = make_repo("shop", '[ports]\nnames = ["web"]\n[services.web]\n'
                           f'command = {json.dumps(command)}\nport = "web"\n')
    fill(repo.main, 5, 3)
    (repo.main / "index.html").write_text("<p>shop</p>\n")
    devd_home.env.update({"DEVD_WATCHERS_NOTIFY": "0", "DEVD_WATCHERS_SETTLE": "0"})
    ns = Namespace(devd_home.env)
    try:
        ns.ask(limit=2)
        ns.ask(spawn=devd_argv("daemon"), cwd="/", out=str(devd_home.home / "daemon-ns.log"))
        wait_for(lambda: devd_home.run("status", check=False).returncode == 0, what="daemon")
        devd_home.run("provision", str(repo.main))
        # It listens first (ready: `up` may well succeed), then its watcher dies.
        devd_home.run("up", "--path", str(repo.main), check=False, timeout=120)
        wait_for(lambda: devd_home.worktree(repo.main)["watchers"]["state"] == "broken",
                 timeout=60, what="the starved Vite service broken")
        state = devd_home.worktree(repo.main)["watchers"]
        assert "ENOSPC" in state["reason"], state
        assert "broken" in devd_home.run("status").stdout
        early = ns.ask(call=devd_argv("watchers", "--restart", "--json"))
        assert early["code"] == 1 and json.loads(early["out"])["services"] == [], early
        ns.ask(limit=100_000)
        done = ns.ask(call=devd_argv("watchers", "--restart", "--json"))
        assert done["code"] == 0, done
        [restarted] = json.loads(done["out"])["services"]
        assert restarted["service"] == "web" and restarted["worktree"] == str(repo.main)
        wait_for(lambda: devd_home.worktree(repo.main)["services"][0]["state"] == "running",
                 timeout=60, what="the restarted Vite service")
        # Listening is not watching yet: Vite's chokidar walks the tree beside its listen,
        # and the daemon judges coverage at once (no settle time here).
        wait_for(lambda: (w := devd_home.worktree(repo.main)["watchers"])["state"] == "ok"
                 and w["watches"] > 2, what="the restarted Vite's watches")
        assert devd_home.run("stop").returncode == 0
    finally:
        ns.close()
