"""Attacks on the proxy's verified dial (devd/proxy/verify.py) and on the coalesced
provision (a provision that waited while an identical one ran is "done by it"). Real
daemon, real Caddy, real processes and sockets. The defects it found are fixed; the one
left open is a strict xfail."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Devd, Repo, wait_for
from test_proxy import curl, free_port, make_daemon, make_git_repo, need_caddy

# One script, three roles: `own` listens on 127.0.0.1:PORT and answers its NAME; given a
# unix socket path it hands its listening socket to whoever connects there (SCM_RIGHTS,
# as a socket-activation manager or a zero-downtime restart does) and exits (unless told
# `keep`: then both hold the one socket and share its connections); `take`
# receives such a socket and answers on it.
HOLDER = textwrap.dedent("""\
    import http.server, os, socket, sys, threading
    role, name, port, unix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(name.encode())
        def log_message(self, *a): pass
    if role == "own":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port)); sock.listen()
        if unix:
            door = socket.socket(socket.AF_UNIX); door.bind(unix[0]); door.listen()
            def hand_over():
                conn, _ = door.accept()
                socket.send_fds(conn, [b"x"], [sock.fileno()]); conn.close()
                if unix[1:] != ["keep"]:
                    os._exit(0)
            threading.Thread(target=hand_over, daemon=True).start()
    else:
        conn = socket.socket(socket.AF_UNIX); conn.connect(unix[0])
        _, fds, _, _ = socket.recv_fds(conn, 1, 1)
        sock = socket.socket(fileno=fds[0])
    server = http.server.HTTPServer(("127.0.0.1", port), H, bind_and_activate=False)
    server.socket = sock
    print("ready", flush=True)
    server.serve_forever()
""")


class Site:
    def __init__(self, devd: Devd, repo: Repo, tree: Path, tmp: Path) -> None:
        self.devd, self.repo, self.tree, self.tmp = devd, repo, tree, tmp
        self.script = tmp / "holder.py"
        self.script.write_text(HOLDER)
        entry = devd.worktree(tree)
        self.port, self.url = entry["ports"]["web"], entry["urls"]["web"] + "/"

    def start(self, role: str, name: str, cwd: Path, *unix: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, str(self.script), role, name,
                                 str(self.port), *unix], cwd=cwd, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        return proc

    def body(self) -> str:
        return curl(self.url).stdout

    def page(self) -> bool:
        return "is not running" in self.body()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need_caddy()
    tmp = tmp_path_factory.mktemp("attackdial")
    repo = make_git_repo(tmp)
    devd = make_daemon(tmp, free_port())
    tree = repo.worktree("dial", "dial")
    devd.start()
    try:
        devd.run("provision", str(tree))
        wait_for(lambda: devd.status()["proxy"]["state"] == "running", what="proxy running")
        yield Site(devd, repo, tree, tmp)
    finally:
        if devd.proc is not None:
            assert devd.stop() == 0, devd.log()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_socket_handed_to_a_stranger_is_no_longer_the_worktrees(site: Site) -> None:
    """The worktree's server (cwd in it) hands its listening socket to a process started
    outside the worktree (cwd /, not a `devd run`, not a descendant) and exits. The socket
    (same inode) is now held only by that stranger, which processes.owner_of counts as
    nobody's: by verify.py's own rule the route must answer devd's page."""
    door = str(site.tmp / "door.sock")
    owner = site.start("own", "owner", site.tree, door)
    stranger = None
    try:
        wait_for(lambda: site.body() == "owner", 30, "the owner through its URL")
        stranger = site.start("take", "stranger", Path("/"), door)
        owner.wait(timeout=30)  # it exited after the hand-over
        from devd import processes
        from devd.registry import Registry
        registry = Registry(site.devd.paths.state_dir / "registry.sqlite3")
        holder = processes.describe(stranger.pid)
        assert processes.owner_of(holder, registry.worktrees(), registry) is None
        deadline = time.monotonic() + 8  # 16 of the proxy's passes
        while time.monotonic() < deadline and not site.page():
            time.sleep(0.1)
        body = site.body()
        assert "stranger" not in body and "is not running" in body, body
    finally:
        _stop(owner)
        if stranger is not None:
            _stop(stranger)


def test_a_socket_shared_with_a_stranger_is_never_dialled(site: Site) -> None:
    """The worktree's server keeps running after handing its socket to a process outside
    the worktree (an fd passed, or leaked into a child that left): both accept on it, as
    two processes on one SO_REUSEPORT address would, which verify.py refuses to dial."""
    door = str(site.tmp / "door-keep.sock")
    owner = site.start("own", "owner", site.tree, door, "keep")
    stranger = None
    try:
        wait_for(lambda: site.body() == "owner", 30, "the owner through its URL")
        stranger = site.start("take", "stranger", Path("/"), door)
        from devd.proxy.verify import Verifier
        from devd.registry import Registry
        registry = Registry(site.devd.paths.state_dir / "registry.sqlite3")
        wt_id = site.devd.worktree(site.tree)["id"]
        # A verdict of its own (no cache): the socket's holders are the owner and a stranger.
        assert Verifier(registry, dict).dials([((wt_id, "web"), site.port)]) == {}
    finally:
        _stop(owner)
        if stranger is not None:
            _stop(stranger)
        wait_for(site.page, 30, "devd's page again")


NOBODY_SQUATTER = ("import http.server,sys,time\n"
                   "class H(http.server.BaseHTTPRequestHandler):\n"
                   "    def do_GET(self):\n"
                   "        self.send_response(200);self.end_headers();"
                   "self.wfile.write(b'squatter')\n"
                   "    def log_message(self,*a): pass\n"
                   "while True:\n"
                   "    try: s=http.server.HTTPServer(('127.0.0.1',int(sys.argv[1])),H);break\n"
                   "    except OSError: time.sleep(0.001)\n"
                   "print('ready',flush=True);s.serve_forever()\n")


@pytest.mark.xfail(strict=True, reason="the verified dial is a check made every 0.5 s by the "
                   "daemon, not at connect time: between the owner's exit and the next pass "
                   "(longer while the daemon is busy) Caddy sends the worktree's requests to "
                   "whoever binds the port next, another user's squatter included")
def test_another_users_squatter_never_gets_a_request_after_the_owner_exits(
        site: Site) -> None:
    """Another local user (uid 65534) polls bind() on the worktree's port. The owner (a
    dev server restarting: nodemon, vite, `next dev`) exits; the squatter binds within a
    millisecond. SIGSTOP on the daemon stands for its next pass being late (2 cores,
    a reconcile, a GIL-heavy status): the same happens within 0.5 s without it."""
    if os.geteuid() != 0:
        pytest.skip("starting a process as another user needs root")
    owner = site.start("own", "owner", site.tree)
    squatter = None
    assert site.devd.proc is not None
    try:
        wait_for(lambda: site.body() == "owner", 30, "the owner through its URL")
        squatter = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534",
                                     "--clear-groups", sys.executable, "-c", NOBODY_SQUATTER,
                                     str(site.port)], cwd="/", stdout=subprocess.PIPE)
        time.sleep(0.2)  # it is polling bind()
        os.kill(site.devd.proc.pid, signal.SIGSTOP)
        try:
            owner.kill()
            owner.wait()
            assert squatter.stdout is not None
            assert squatter.stdout.readline().strip() == b"ready"
            body = site.body()
        finally:
            os.kill(site.devd.proc.pid, signal.SIGCONT)
        assert "squatter" not in body, body
    finally:
        _stop(owner)
        if squatter is not None:
            _stop(squatter)
        wait_for(site.page, 30, "devd's page again")


# -- the coalesced provision ----------------------------------------------------

# npm ci on the daemon's PATH: it says it started, waits for the test's gate, then makes
# what a real one makes (node_modules with its marker), counting its runs.
FAKE_NPM = textwrap.dedent("""\
    #!/bin/sh
    [ "$1" = "ci" ] || exit 0
    echo run >> "{dir}/runs"
    touch "{dir}/started"
    while [ ! -e "{dir}/gate" ]; do sleep 0.05; done
    if [ -e "{dir}/fail" ]; then rm "{dir}/fail"; echo "npm ERR! fake" >&2; exit 1; fi
    mkdir -p node_modules && cp package-lock.json node_modules/.package-lock.json
""")
LOCK = json.dumps({"name": "shop", "lockfileVersion": 3, "requires": True,
                   "packages": {"": {"name": "shop"}}})


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[Devd, Path, Path]]:
    tools = tmp_path / "tools"
    tools.mkdir()
    npm = tools / "npm"
    npm.write_text(FAKE_NPM.format(dir=tools))
    npm.chmod(0o755)
    repo = make_git_repo(tmp_path)
    repo.commit({"package.json": '{"name": "shop"}\n', "package-lock.json": LOCK + "\n"})
    tree = repo.worktree("twice", "twice")
    devd = make_daemon(tmp_path, free_port(), DEVD_PROXY="0",
                       PATH=f"{tools}:{os.environ['PATH']}")
    devd.start()
    yield devd, tree, tools
    (tools / "gate").touch()
    if devd.proc is not None:
        devd.proc.kill()
        devd.proc.wait()


def _waiting(proc: subprocess.Popen[str]) -> bool:
    """The client is connected to the daemon and blocked waiting for its answer."""
    try:
        fds = [os.readlink(f) for f in Path(f"/proc/{proc.pid}/fd").iterdir()]
        wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
    except OSError:
        return False
    return any(f.startswith("socket:") for f in fds) and wchan.startswith("poll")


def test_a_provision_asked_after_the_user_changed_the_tree_runs(
        gated: tuple[Devd, Path, Path]) -> None:
    """The hook's provision of a new worktree runs (npm ci under way). Meanwhile the user
    pulls a new lockfile and deletes .env, then runs `devd provision`: it must install the
    new lockfile and write .env again, not return 'done' with both stale."""
    devd, tree, tools = gated
    devd.run("provision", str(tree), "--background")  # what the git hook sends
    wait_for(lambda: (tools / "started").exists(), 60, "the first npm ci")
    (tree / ".env").unlink()
    (tree / "package-lock.json").write_text(LOCK.replace('"shop"}', '"shop2"}') + "\n")
    user = subprocess.Popen([sys.executable, "-m", "devd", "provision", str(tree)],
                            env=devd.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(lambda: _waiting(user), 60, "the user's provision to wait")
    time.sleep(0.5)
    (tools / "gate").touch()
    out, _ = user.communicate(timeout=120)
    assert user.returncode == 0, out
    assert (tree / ".env").exists(), out
    assert (tools / "runs").read_text().count("run") == 2, out


def _second_provision(devd: Devd, tree: Path, tools: Path, meanwhile: Callable[[], None]
                      ) -> str:
    """The hook's provision runs (npm ci under way); `meanwhile` happens, the user's
    `devd provision` is asked and waits; then the first pass ends. The user's output."""
    devd.run("provision", str(tree), "--background")
    wait_for(lambda: (tools / "started").exists(), 60, "the first npm ci")
    meanwhile()
    user = subprocess.Popen([sys.executable, "-m", "devd", "provision", str(tree)],
                            env=devd.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(lambda: _waiting(user), 60, "the user's provision to wait")
    time.sleep(0.5)
    (tools / "gate").touch()
    out, _ = user.communicate(timeout=120)
    return out


def test_a_failed_first_pass_is_never_taken_for_the_second(
        gated: tuple[Devd, Path, Path]) -> None:
    devd, tree, tools = gated
    out = _second_provision(devd, tree, tools, lambda: (tools / "fail").touch())
    assert "ran meanwhile" not in out, out
    assert (tools / "runs").read_text().count("run") == 2, out
    assert devd.worktree(tree)["state"] == "ready", out


def test_a_devd_toml_edited_meanwhile_runs_the_second_pass(
        gated: tuple[Devd, Path, Path]) -> None:
    devd, tree, tools = gated
    toml = tree / "devd.toml"
    out = _second_provision(devd, tree, tools, lambda: toml.write_text(
        toml.read_text().replace('"ws"]', '"ws", "extra"]')))
    assert "ran meanwhile" not in out, out
    assert "extra" in devd.worktree(tree)["ports"], out


# -- the cost of a pass -----------------------------------------------------------

def test_one_scan_of_the_processes_per_pass(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    from devd.proxy.verify import Verifier
    from devd.registry import Registry

    socks = []
    for _ in range(40):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        socks.append(sock)
    try:
        routes = [((f"w{i}", "web"), s.getsockname()[1]) for i, s in enumerate(socks)]
        scans, pids = [0], psutil.pids

        def counted() -> list[int]:
            scans[0] += 1
            return pids()
        monkeypatch.setattr(psutil, "pids", counted)
        Verifier(Registry(tmp_path / "registry.sqlite3"), dict).dials(routes)
        assert scans[0] <= 1, f"{scans[0]} scans of every process for {len(routes)} routes"
    finally:
        for sock in socks:
            sock.close()
