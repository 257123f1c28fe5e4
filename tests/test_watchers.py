"""Watcher budget: real inotify watches, real user namespaces with lowered limits, a real
chokidar (from the npm registry) started through `devd run`, real daemon and CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Devd, Repo, wait_for

from devd.watchers import analysis, macos, signatures
from devd.watchers.estimate import estimate
from devd.watchers.linux import LinuxSampler, probe_watch_lines

REQUIRED = os.environ.get("DEVD_REQUIRE_INTEGRATION") == "1"
# A watcher like watchdog's: one inotify watch per directory under a root (ctypes, real).
WATCHER = r"""
import ctypes, os, sys, time
sys.path.insert(0, sys.argv[3])
from devd.watchers.linux import Inotify
if sys.argv[2]:
    libc = ctypes.CDLL(None); libc.prctl(15, sys.argv[2].encode(), 0, 0, 0)
ino = Inotify(); n = 0
for top, dirs, _ in os.walk(sys.argv[1]):
    dirs[:] = [d for d in dirs if d not in (".git", "node_modules")]
    ino.add_watch(top); n += 1
    if os.environ.get("ONLY_ROOT"):
        break
print("watching", n, flush=True)
time.sleep(600)
"""
CHOKIDAR = """
const chokidar = require(process.argv[2]);
const w = chokidar.watch(process.env.DEVD_WORKTREE,
  {ignored: /(^|[\\/\\\\])(\\.git|node_modules)([\\/\\\\]|$)/, ignoreInitial: true});
w.on('ready', () => console.log('ready'));
"""
# Runs inside `unshare -Ur`: lowers the namespace's watch limit, then starts what the test
# sends (one JSON line each) and answers with the pid; kills them all when stdin closes.
NS_HELPER = r"""
import json, os, subprocess, sys
open("/proc/sys/user/max_inotify_watches", "w").write(sys.argv[1])
procs = []
for line in sys.stdin:
    req = json.loads(line)
    out = open(req["out"], "wb")
    p = subprocess.Popen(req["argv"], cwd=req["cwd"], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    procs.append(p); print(p.pid, flush=True)
for p in procs:
    p.kill(); p.wait()
"""


def fill(tree: Path, dirs: int, files: int = 2) -> None:
    for d in range(dirs):
        sub = tree / "src" / f"d{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            (sub / f"f{f}.txt").write_text("x\n")


def start_watcher(cwd: Path, root: Path, name: str = "", via: list[str] | None = None,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([*(via or []), sys.executable, "-c", WATCHER, str(root), name,
                             str(ROOT)], cwd=cwd, stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["watching"], line
    return proc, int(line[1])


def stop(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def consumer(report: dict, pid: int) -> dict:
    found = [c for c in report["top"] if c["pid"] == pid]
    assert found, f"pid {pid} not among {[c['pid'] for c in report['top']]}"
    return found[0]


def userns_available() -> str:
    if not shutil.which("unshare"):
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "-Ur", "sh", "-c",
                            "echo 50 > /proc/sys/user/max_inotify_watches"],
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"user namespaces unavailable: {probe.stderr}"


def need_userns() -> None:
    reason = userns_available()
    if reason:
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def wdevd(devd_home: Devd) -> Iterator[Devd]:
    """A daemon without desktop notifications, judging coverage at once (no settle time)."""
    devd_home.env.update({"DEVD_WATCHERS_NOTIFY": "0", "DEVD_WATCHERS_SETTLE": "0"})
    devd_home.start()
    yield devd_home
    assert devd_home.stop() == 0, devd_home.log()


@pytest.fixture(scope="session")
def chokidar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chokidar@3 from the npm registry, installed once per session."""
    if not shutil.which("npm") or not shutil.which("node"):
        if REQUIRED:
            pytest.fail("node and npm are required on CI")
        pytest.skip("node/npm not installed")
    where = tmp_path_factory.mktemp("npm")
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                           "chokidar@3"], cwd=where, capture_output=True, text=True,
                          timeout=300)
    if done.returncode:
        if REQUIRED:
            pytest.fail(f"npm install chokidar failed: {done.stderr}")
        pytest.skip(f"npm install chokidar failed (offline?): {done.stderr[-300:]}")
    (where / "watch.js").write_text(CHOKIDAR)
    return where


# -- the sampler against real inotify ------------------------------------------------


def test_sampler_counts_real_watches(tmp_path: Path) -> None:
    fill(tmp_path, 12)
    proc, n = start_watcher(tmp_path, tmp_path)
    try:
        sample = LinuxSampler().sample(full=True)
        mine = [c for c in sample.consumers if c.pid == proc.pid]
        assert mine and mine[0].watches == n == 14 and mine[0].instances == 1
        assert mine[0].cwd == str(tmp_path) and mine[0].fd_limit
        assert sample.max_watches and sample.max_instances and sample.watch_lines
        cheap = LinuxSampler().sample(full=False)
        assert [c.instances for c in cheap.consumers if c.pid == proc.pid] == [1]
    finally:
        stop(proc)


def test_processes_exiting_mid_scan_do_not_break_a_pass(tmp_path: Path) -> None:
    sampler = LinuxSampler()
    deadline = time.monotonic() + 3
    churn = []
    while time.monotonic() < deadline:
        churn.append(subprocess.Popen([sys.executable, "-c", WATCHER, str(tmp_path), "",
                                       str(ROOT)], stdout=subprocess.DEVNULL))
        sampler.sample(full=len(churn) % 2 == 0)
        if len(churn) > 3:
            churn.pop(0).kill()
    stop(*churn)
    sample = sampler.sample(full=True)
    assert all(c.pid not in {p.pid for p in churn} for c in sample.consumers)


def test_a_kernel_without_watch_lines_reports_unknown_not_zero(tmp_path: Path) -> None:
    assert probe_watch_lines() is True  # this kernel has them; the old-kernel case below
    proc, _ = start_watcher(tmp_path, tmp_path)
    try:
        sample = LinuxSampler(watch_lines=False).sample(full=True)
        assert [c.watches for c in sample.consumers if c.pid == proc.pid] == [None]
        level, reasons = analysis.level_of(sample, analysis.Thresholds())
        assert level == "unknown" and "no watch lines" in reasons[0]
    finally:
        stop(proc)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a sampler as another user")
def test_other_users_entries_are_unreadable_and_skipped(tmp_path: Path) -> None:
    proc, _ = start_watcher(tmp_path, tmp_path)  # held by root
    code = ("import json; from devd.watchers.linux import LinuxSampler; "
            "s = LinuxSampler().sample(full=True); "
            "print(json.dumps([c.pid for c in s.consumers]))")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that another user may run")
    try:
        seen = subprocess.run([python, "-c", code], user=65534, capture_output=True,
                              text=True, env={"PYTHONPATH": str(ROOT)}, cwd="/", check=True)
        assert proc.pid not in json.loads(seen.stdout)
    finally:
        stop(proc)


def test_enospc_for_real_in_a_user_namespace() -> None:
    need_userns()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import os\n"
            "from devd.watchers.linux import Inotify\n"
            "open('/proc/sys/user/max_inotify_watches', 'w').write('5')\n"
            "i = Inotify()\n"
            "for n in range(20):\n"
            "    i.add_watch(os.path.join('/', sorted(os.listdir('/'))[n]))\n")
    done = subprocess.run(["unshare", "-Ur", sys.executable, "-c", code, str(ROOT)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "No space left on device" in done.stderr
    line = done.stderr.strip().splitlines()[-1].encode()
    assert signatures.match(line).budget == "watches"  # inotify_add_watch ... ENOSPC


def test_signatures_match_known_lines_through_colours() -> None:
    scanner = signatures.LineScanner()
    hits = scanner.feed(b"ok\n\x1b[31mError: ENOSPC: System limit for number of file "
                        b"watchers reached, watch '/x'\x1b[0m\nWatchpack Error (watch")
    hits += scanner.feed(b"er): Error: EMFILE\n") + scanner.close()
    assert [h[0].name for h in hits] == ["node-enospc", "watchpack"]
    assert "\x1b" not in hits[0][1]
    for text in (b"EMFILE: too many open files, watch '/a'", b"OS file watch limit reached",
                 b"Too many open files (os error 24)"):
        assert signatures.match(text) is not None
    assert signatures.match(b"all good") is None


def test_estimate_honours_the_usual_ignores(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    for ignored in ("node_modules/pkg", ".git/objects", "dist/assets"):
        (tmp_path / ignored).mkdir(parents=True)
        (tmp_path / ignored / "x.js").write_text("")
    found = estimate(str(tmp_path))
    assert (found.dirs, found.files, found.chokidar) == (5, 6, 11)


# -- the daemon: attribution, status, CLI ---------------------------------------------


@pytest.fixture
def trees(wdevd: Devd, repo: Repo) -> tuple[Path, Path]:
    a, b = repo.worktree("shop-a", "a"), repo.worktree("shop-b", "b")
    for tree, dirs in ((a, 8), (b, 15)):
        fill(tree, dirs)
        wdevd.run("provision", str(tree))
    return a, b


def test_watches_are_attributed_to_the_right_worktree(wdevd: Devd, trees) -> None:
    a, b = trees
    in_a, n_a = start_watcher(a, a)
    in_b, n_b = start_watcher(b / "src", b)
    try:
        report = wdevd.json("watchers")
        assert consumer(report, in_a.pid)["worktree"] == str(a)
        assert consumer(report, in_a.pid)["watches"] == n_a
        assert consumer(report, in_b.pid)["worktree"] == str(b)
        assert report["level"] == "ok" and report["max_watches"] > 0
        status = wdevd.status()
        assert {"level", "watches", "max_watches", "instances", "max_instances"
                } <= set(status["watchers"])
        assert "top" not in status["watchers"]  # only `devd watchers` lists consumers
        by_path = {w["path"]: w["watchers"] for w in status["worktrees"]}
        assert by_path[str(a)]["watches"] == n_a and by_path[str(b)]["watches"] == n_b
        assert by_path[str(a)]["state"] == "ok" and by_path[str(a)]["instances"] == 1
        text = wdevd.run("watchers").stdout
        assert "watcher budget: ok" in text and f"pid {in_a.pid}" in text
    finally:
        stop(in_a, in_b)


def test_attribution_by_ancestry_and_by_watched_inodes(wdevd: Devd, trees) -> None:
    a, b = trees
    # cwd / is outside every worktree: one is a child of `devd run`, one only watches b.
    spawner = ("import subprocess, sys; p = subprocess.Popen([sys.executable, *sys.argv[1:]],"
               " cwd='/'); p.wait()")
    parent = subprocess.Popen(
        [sys.executable, "-m", "devd", "run", "--path", str(a), "--", sys.executable, "-c",
         spawner, "-c", WATCHER, str(a), "", str(ROOT)], env=wdevd.env, stdout=subprocess.PIPE,
        text=True)
    stranger, _ = start_watcher(Path("/"), b)
    try:
        assert parent.stdout is not None and parent.stdout.readline().startswith("watching")
        report = wdevd.json("watchers")
        child = [c for c in report["top"] if c["pid"] not in (parent.pid, stranger.pid)
                 and c["worktree"] == str(a)]
        assert child and child[0]["attributed_by"] == "run"
        assert consumer(report, stranger.pid)["worktree"] == str(b)
        assert consumer(report, stranger.pid)["attributed_by"] == "inode"
    finally:
        stop(parent, stranger)


def test_a_hostile_process_name_is_printed_safely(wdevd: Devd, trees) -> None:
    a, _ = trees
    hostile = "\x1b[2J\nrm -rf"
    proc, _ = start_watcher(a, a, name=hostile)
    try:
        text = wdevd.run("watchers").stdout + wdevd.run("doctor").stdout
        assert "\x1b" not in text and "\\x1b[2J\\nrm -rf" in text
        assert consumer(wdevd.json("watchers"), proc.pid)["name"] == hostile[:15]
    finally:
        stop(proc)


def test_devd_run_passes_output_and_exit_status_through(wdevd: Devd, trees) -> None:
    a, _ = trees
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    done = wdevd.run("run", "--path", str(a), "--", sys.executable, "-c", code, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    killed = subprocess.run([sys.executable, "-m", "devd", "run", "--path", str(a), "--",
                             sys.executable, "-c", "import os; os.kill(os.getpid(), 15)"],
                            env=wdevd.env, capture_output=True)
    assert killed.returncode == -signal.SIGTERM  # the command's own death, not a copy
    master, slave = os.openpty()
    with subprocess.Popen([sys.executable, "-m", "devd", "run", "--path", str(a), "--",
                           sys.executable, "-c", "import sys; print(sys.stdout.isatty())"],
                          env=wdevd.env, stdout=slave, stderr=slave) as tty:
        os.close(slave)
        assert tty.wait(timeout=60) == 0
    seen = b""
    while True:
        try:
            chunk = os.read(master, 1024)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert b"True" in seen


def test_a_break_signature_marks_the_worktree_broken(wdevd: Devd, trees) -> None:
    a, b = trees
    line = "Error: ENOSPC: System limit for number of file watchers reached, watch '/x'"
    done = wdevd.run("run", "--path", str(a), "--", sys.executable, "-c",
                     f"import sys; print({line!r}, file=sys.stderr); sys.exit(1)", check=False)
    assert done.returncode == 1 and line in done.stderr and "devd doctor" in done.stderr
    state = wdevd.worktree(a)["watchers"]
    assert state["state"] == "broken" and "ENOSPC" in state["reason"]
    assert wdevd.worktree(b)["watchers"]["state"] == "ok"
    doctor = wdevd.json("doctor")
    assert doctor["fix_needed"] and doctor["broken"][0]["worktree"] == str(a)
    assert "&& devd run -- " in doctor["broken"][0]["restart"]
    # A new run in the worktree replaces the exited broken one.
    wdevd.run("run", "--path", str(a), "--", "true")
    assert wdevd.worktree(a)["watchers"]["state"] == "ok"


def test_a_devd_started_watcher_covering_too_little_is_partial(wdevd: Devd, trees) -> None:
    _, b = trees
    proc, n = start_watcher(b, b, via=[sys.executable, "-m", "devd", "run", "--path", str(b),
                                       "--"], env={**wdevd.env, "ONLY_ROOT": "1"})
    try:
        assert n == 1
        wait_for(lambda: wdevd.worktree(b)["watchers"]["state"] == "partial",
                 what="partial state")
        assert "dirs" in wdevd.worktree(b)["watchers"]["reason"]
    finally:
        stop(proc)


def test_crossing_a_level_runs_the_repo_hook(devd_home: Devd, make_repo, tmp_path: Path
                                             ) -> None:
    marker = tmp_path / "hook-ran"
    repo = make_repo("hooked", devd_toml=f'[watchers]\non_pressure = "echo '
                     f'$DEVD_WATCHERS_LEVEL $DEVD_WATCHERS_PREVIOUS >> {marker}"\n')
    sample = LinuxSampler().sample(full=True)
    baseline = analysis.totals(analysis.mine(sample))[0] or 0
    assert sample.max_watches
    # Warn 3000 watches above what this user holds now (other tests come and go); the
    # watcher below takes 6000.
    warn = (baseline + 3000) / sample.max_watches
    devd_home.env.update({"DEVD_WATCHERS_NOTIFY": "0", "DEVD_WATCHERS_WATCHES_CRITICAL": "1",
                          "DEVD_WATCHERS_WATCHES_WARN": str(warn)})
    devd_home.start()
    proc = None
    try:
        tree = repo.worktree("hooked-a", "a")
        devd_home.run("provision", str(tree))
        # Others' watchers come and go on a shared machine: wait for the quiet baseline.
        wait_for(lambda: devd_home.json("watchers")["level"] == "ok", timeout=60,
                 what="level ok before the watcher starts")
        (tree / "many").mkdir()
        for n in range(6000):
            (tree / "many" / str(n)).mkdir()
        proc, _ = start_watcher(tree, tree)
        assert devd_home.json("watchers")["level"] == "warn"  # a fresh pass
        # Its line, not the file: `echo >> marker` creates the file before it writes.
        wait_for(lambda: marker.exists() and marker.read_text().endswith("\n"),
                 what="on_pressure hook")
        assert marker.read_text().split()[:2] == ["warn", "ok"]
        assert "watcher budget ok → warn" in devd_home.log()
    finally:
        if proc:
            stop(proc)
        devd_home.stop()


def test_watchers_section_of_devd_toml_is_validated(wdevd: Devd, make_repo) -> None:
    bad = make_repo("bad", devd_toml='[watchers]\nestimate = "sometimes"\n')
    result = wdevd.run("provision", str(bad.worktree("bad-a", "a")), check=False)
    assert result.returncode == 1 and "watchers.estimate" in result.stderr


# -- the Done-when scenario: a real chokidar under a lowered limit ------------------------


def test_chokidar_under_a_lowered_limit_warns_first_and_shows_broken(
        wdevd: Devd, repo: Repo, chokidar: Path, tmp_path: Path) -> None:
    need_userns()
    names = ("shop-a", "shop-b", "shop-c")
    trees = [repo.worktree(name, name) for name in names]
    for tree in trees:
        fill(tree, 20, 3)
        wdevd.run("provision", str(tree))
    need = estimate(str(trees[0])).chokidar
    helper = subprocess.Popen(["unshare", "-Ur", sys.executable, "-c", NS_HELPER,
                               str(2 * need + need // 2)], env=wdevd.env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert helper.stdin and helper.stdout

    def start(tree: Path) -> tuple[int, Path]:
        out = tmp_path / f"{tree.name}.log"
        argv = [sys.executable, "-m", "devd", "run", "--path", str(tree), "--", "node",
                str(chokidar / "watch.js"), str(chokidar / "node_modules" / "chokidar")]
        helper.stdin.write(json.dumps({"argv": argv, "cwd": str(tree), "out": str(out)}) + "\n")
        helper.stdin.flush()
        return int(helper.stdout.readline()), out

    try:
        started = [start(tree) for tree in trees[:2]]
        for _, out in started:
            wait_for(lambda out=out: "ready" in out.read_text(), timeout=60, what="chokidar")
        report = wdevd.json("watchers")
        for (pid, _), tree in zip(started, trees[:2], strict=True):
            entry = consumer(report, pid)  # devd run execs: its pid is node's
            assert entry["worktree"] == str(tree) and entry["watches"] >= need - 2
        _, third = start(trees[2])
        wait_for(lambda: "ENOSPC" in third.read_text(), timeout=60, what="ENOSPC")
        log = third.read_text()
        assert log.index("devd: warning:") < log.index("ENOSPC")
        assert f"pid {started[0][0]}" in log  # names the consumers to stop
        wait_for(lambda: wdevd.worktree(trees[2])["watchers"]["state"] == "broken",
                 what="broken state")
        assert "ENOSPC" in wdevd.worktree(trees[2])["watchers"]["reason"]
        doctor = wdevd.run("doctor").stdout
        assert "sudo sysctl -w fs.inotify.max_user_watches=524288" in doctor
        assert "/etc/sysctl.d/60-devd-inotify.conf" in doctor and "sysctl --system" in doctor
    finally:
        helper.stdin.close()
        helper.wait(timeout=30)


# -- macOS: recorded outputs of the real commands (this machine cannot run them) --------

SYSCTL_OUT = "kern.num_files: 6212\nkern.maxfiles: 245760\nkern.maxfilesperproc: 122880\n"
SYSCTL_FULL = "kern.num_files: 236000\nkern.maxfiles: 245760\nkern.maxfilesperproc: 122880\n"
LAUNCHCTL_OUT = "\tmaxfiles    256            unlimited      \n"


def recorded(sysctl: str) -> macos.Runner:
    outputs = {"sysctl": sysctl, "launchctl": LAUNCHCTL_OUT}
    return lambda argv: outputs[argv[0]]


def test_macos_parsing_of_recorded_outputs() -> None:
    assert macos.parse_sysctl(SYSCTL_OUT) == {"kern.num_files": 6212, "kern.maxfiles": 245760,
                                              "kern.maxfilesperproc": 122880}
    assert macos.parse_launchctl_limit(LAUNCHCTL_OUT) == (256, None)
    assert macos.parse_launchctl_limit("") == (None, None)


def test_macos_sampler_meets_the_sampler_contract(tmp_path: Path) -> None:
    """Per-process fds come from psutil, which runs here too; kernel figures are recorded."""
    files = [open(tmp_path / f"f{n}", "w") for n in range(80)]  # noqa: SIM115
    try:
        sample = macos.MacSampler(recorded(SYSCTL_OUT)).sample(full=True)
        me = [c for c in sample.consumers if c.pid == os.getpid()]
        assert me and me[0].fds >= 80 and me[0].fd_limit == 256 and me[0].starttime
        assert sample.max_watches == 245760 and sample.extra["launchd_maxfiles"] == [256, None]
        level, reasons = analysis.level_of(sample, analysis.Thresholds(fds_warn=0.3))
        assert level == "warn" and any(f"pid {os.getpid()}" in r for r in reasons)
        full = macos.MacSampler(recorded(SYSCTL_FULL)).sample(full=True)
        full.consumers = [c for c in full.consumers if c.pid != os.getpid()]
        assert analysis.level_of(full, analysis.Thresholds())[0] == "critical"  # 96 %
    finally:
        for f in files:
            f.close()
