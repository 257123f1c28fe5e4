"""Declared services for real: Vite and a Python API in worktrees of one repo, wired by
{url:api}; crashes, restarts with backoff, `crashed`; every bad input; a removed worktree's
servers stopped; a killed daemon's leftovers stopped by the next one.

Vite comes from the npm registry, installed once per session into a cached tmp dir and
linked into each worktree's web dir.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Devd, Repo, run_git, wait_for

API = textwrap.dedent("""\
    import http.server, json, os
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"api": True, "web_origin": os.environ["WEB_ORIGIN"]}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
    http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
    """)
SERVICES = """\
[ports]
names = ["web", "api"]

[services.web]
command = "npm run dev"
dir = "web"
port = "web"
env = { VITE_API_URL = "{url:api}", VITE_API_PORT = "{port:api}" }

[services.api]
command = "python3 api.py"
port = "api"
ready = "/health"
env = { WEB_ORIGIN = "{url:web}" }
"""


def vite_app(root: Path, modules: Path) -> None:
    web = root / "web"
    web.mkdir(exist_ok=True)
    (web / "package.json").write_text(json.dumps(
        {"name": "web", "private": True, "type": "module", "scripts": {"dev": "vite"}}))
    (web / "index.html").write_text('<script type="module" src="/main.js"></script>\n')
    (web / "main.js").write_text("export const api = import.meta.env.VITE_API_URL;\n"
                                 "export const port = import.meta.env.VITE_API_PORT;\n")
    if not (web / "node_modules").exists():
        (web / "node_modules").symlink_to(modules)
    (root / "api.py").write_text(API)


def up(devd: Devd, path: Path, *names: str) -> Any:
    return json.loads(devd.run("up", "--json", "--path", str(path), *names,
                               timeout=120).stdout)


def services(devd: Devd, path: Path) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in devd.worktree(path).get("services", [])}


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_vite_and_api_in_two_worktrees(devd: Devd, make_repo, vite_modules: Path) -> None:
    repo: Repo = make_repo("shop", SERVICES)
    vite_app(repo.main, vite_modules)
    feat = repo.worktree("shop-feat", "feat/a")
    vite_app(feat, vite_modules)
    shown = {}
    for path in (repo.main, feat):
        devd.run("provision", str(path))
        shown[path] = {s["name"]: s for s in up(devd, path)["services"]}
    ports = {path: devd.worktree(path)["ports"] for path in shown}
    for path, svc in shown.items():
        web, api = svc["web"], svc["api"]
        assert (web["state"], web["port"], api["port"]) == \
            ("running", ports[path]["web"], ports[path]["api"])
        assert web["url"] == f"http://127.0.0.1:{web['port']}"
        # The web side sees the API's wired URL and port (Vite inlines import.meta.env).
        module = get(f"{web['url']}/main.js")
        assert f'"{api["url"]}"' in module and f'"{api["port"]}"' in module, module
        assert json.loads(get(api["url"])) == {"api": True, "web_origin": web["url"]}
        listens = {c.laddr.port for c in psutil.Process(web["pid"]).children(recursive=True)
                   for c in _listening(c)}
        assert web["port"] in listens and 5173 not in listens  # never Vite's default
    assert len({shown[p]["web"]["port"] for p in shown}) == 2
    again = up(devd, repo.main)  # idempotent: the same processes
    assert [s["pid"] for s in again["services"]] == \
        [shown[repo.main][n]["pid"] for n in ("web", "api")]
    status = services(devd, repo.main)
    assert status["web"]["listening"] and status["web"]["restarts"] == 0
    assert "web:up api:up" in devd.run("status").stdout
    # The worktree goes: its servers stop within seconds (generous deadline, no timing).
    pids = [s["pid"] for s in shown[feat].values()]
    children = [c.pid for pid in pids for c in psutil.Process(pid).children(recursive=True)]
    run_git(repo.main, "worktree", "remove", "--force", str(feat))
    wait_for(lambda: all(gone(p) for p in pids + children), what="feat's servers to stop")
    down = json.loads(devd.run("down", "--json", "--path", str(repo.main)).stdout)
    assert {s["name"]: s["outcome"] for s in down["services"]} == \
        {"web": "terminated", "api": "terminated"}
    assert not any(s["listening"] for s in services(devd, repo.main).values())


def _listening(proc: psutil.Process) -> list[Any]:
    try:
        return [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


# It exits once its log (its stdout) says devd saw it ready: a fixed short life could be missed
# by a loaded daemon's readiness tick, and the first run would "fail before it was ready".
# (Its note is `[devd 06:25:20] ready after 0.1 s`; the command, also in the log, must not
# hold that text whole.)
LISTEN_THEN_EXIT = ("python3 -c 'import os, socket, time\ns = socket.socket()\n"
                    "s.bind((\"127.0.0.1\", int(os.environ[\"PORT\"]))); s.listen()\n"
                    "print(\"up, about to fail\", flush=True)\n"
                    "while b\"]\" + b\" ready after\" not in "
                    "open(\"/proc/self/fd/1\", \"rb\").read():\n"
                    "    time.sleep(0.05)\n"
                    "exit(3)'")


def test_crash_backoff_then_crashed(devd: Devd, make_repo) -> None:
    repo = make_repo("flaky", f'[ports]\nnames = ["web"]\n[services.web]\n'
                     f'command = {json.dumps(LISTEN_THEN_EXIT)}\nport = "web"\n')
    devd.run("provision", str(repo.main))
    up(devd, repo.main)
    wait_for(lambda: services(devd, repo.main)["web"]["state"] == "crashed", 60, "crashed")
    web = services(devd, repo.main)["web"]
    assert web["restarts"] == 4 and web["pid"] is None
    assert "exited with status 3" in web["error"] and "up, about to fail" in web["log_tail"]
    assert "web:crashed" in devd.run("status").stdout
    verbose = devd.run("status", "-v").stdout
    assert "web crashed" in verbose and "| up, about to fail" in verbose
    log = devd.run("logs", "web", "--path", str(repo.main), "-n", "200").stdout
    assert log.splitlines().count("up, about to fail") == 5


def bad(devd: Devd, path: Path, toml: str, *names: str) -> str:
    """`devd up` with this devd.toml: it must fail, with a message and no traceback."""
    (path / "devd.toml").write_text(toml)
    result = devd.run("up", "--path", str(path), *names, check=False, timeout=120)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def service(name: str, command: str, port: str | None = "web", **extra: str) -> str:
    lines = [f"[services.{name}]", f"command = {json.dumps(command)}"]
    lines += [f'port = "{port}"'] if port else []
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


PORTS = '[ports]\nnames = ["web"]\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_bad_input(devd: Devd, make_repo, tmp_path: Path) -> None:
    repo = make_repo("bad", PORTS)
    devd.run("provision", str(repo.main))
    port = devd.worktree(repo.main)["ports"]["web"]
    err = bad(devd, repo.main, PORTS + service("web", "echo boom; exit 1"))
    assert "exited with status 1 before it was ready" in err and "| boom" in err
    err = bad(devd, repo.main, PORTS + service("web", "sleep 60", ready_timeout="1s"))
    assert f"did not listen on port {port} within 1 s" in err
    unwell = ("python3 -c 'import http.server as h, os\nclass H(h.BaseHTTPRequestHandler):\n"
              "    def do_GET(self): self.send_error(503)\n"
              "h.HTTPServer((\"127.0.0.1\", int(os.environ[\"PORT\"])), H).serve_forever()'")
    err = bad(devd, repo.main, PORTS + service("web", unwell, ready="/health",
                                               ready_timeout="2s"))
    assert f"did not answer http://127.0.0.1:{port}/health within 2 s" in err
    other = free_port()
    err = bad(devd, repo.main, PORTS + service("web", f"python3 -m http.server {other}"))
    assert f"listens on {other} instead of its port {port}" in err
    with socket.socket() as squatter:  # a foreign process (this test) holds the port
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # probes' TIME_WAIT
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        err = bad(devd, repo.main, PORTS + service("web", "python3 -m http.server"))
        assert f"port {port} (web) is taken by pid {os.getpid()}" in err and "python" in err
    for name in ("Web", "web_1", "-web", "a" * 64):
        assert "must be a DNS label" in bad(devd, repo.main, PORTS + service(name, "true"))
    (repo.main / "out").symlink_to(tmp_path)
    assert "leads outside the worktree" in bad(
        devd, repo.main, PORTS + service("web", "true", dir="out"))
    assert "relative to the worktree" in bad(
        devd, repo.main, PORTS + service("web", "true", dir="../x"))
    assert "'nope' is not a [ports] name" in bad(
        devd, repo.main, PORTS + service("web", "true", port="nope"))
    assert "'nope' is not a [ports] name" in bad(
        devd, repo.main, PORTS + service("web", "true") + 'env = { X = "{url:nope}" }\n')
    assert "no service 'nope'" in bad(devd, repo.main, PORTS + service("web", "true"), "nope")
    assert "both serve port 'web'" in bad(
        devd, repo.main, PORTS + service("a", "true") + service("b", "true"))


def test_twenty_services_at_once(devd: Devd, make_repo) -> None:
    names = [f"p{i}" for i in range(20)]
    toml = f"[ports]\nnames = {json.dumps(names)}\n" + "".join(
        service(f"s{i}", "python3 -m http.server", port=name) for i, name in enumerate(names))
    repo = make_repo("many", toml)
    devd.run("provision", str(repo.main))
    shown = up(devd, repo.main)["services"]
    ports = devd.worktree(repo.main)["ports"]
    assert sorted((s["name"], s["port"], s["state"]) for s in shown) == \
        sorted((f"s{i}", ports[n], "running") for i, n in enumerate(names))
    assert "svc 20/20 up" in devd.run("status").stdout
    down = json.loads(devd.run("down", "--json", "--path", str(repo.main)).stdout)
    assert {s["outcome"] for s in down["services"]} == {"terminated"}


def test_daemon_stop_and_kill(devd: Devd, make_repo) -> None:
    """A graceful stop takes the services along; after a kill -9 the next daemon stops
    what the dead one left."""
    repo = make_repo("life", PORTS + service("web", "python3 -m http.server",
                                             idle_stop="1s"))
    devd.run("provision", str(repo.main))
    pid = up(devd, repo.main)["services"][0]["pid"]
    # idle_stop: nobody connects, so it is stopped (checked every few seconds).
    wait_for(lambda: services(devd, repo.main)["web"]["state"] == "idle", what="idle stop")
    assert gone(pid)
    pid = up(devd, repo.main)["services"][0]["pid"]
    devd.stop()
    assert gone(pid)
    # No idle_stop from here: started slowly (a loaded machine), it is due for one at once,
    # and an idle stop before the kill -9 below would leave nothing for the next daemon.
    (repo.main / "devd.toml").write_text(PORTS + service("web", "python3 -m http.server"))
    devd.start()
    pid = up(devd, repo.main)["services"][0]["pid"]
    assert devd.proc is not None
    devd.proc.send_signal(signal.SIGKILL)
    devd.proc.wait()
    assert not gone(pid)  # a dead daemon's service runs on, nobody supervising it
    devd.start()
    wait_for(lambda: gone(pid), what="the leftover service to be stopped")
    assert services(devd, repo.main)["web"]["state"] == "stopped"


def test_restart_follow_and_release(devd: Devd, make_repo) -> None:
    repo = make_repo("cycle", PORTS + service("web", "python3 -u -m http.server"))
    devd.run("provision", str(repo.main))
    first = up(devd, repo.main)["services"][0]
    follow = subprocess.Popen([sys.executable, "-m", "devd", "logs", "web", "-f", "-n", "200",
                               "--path", str(repo.main)], env=devd.env, stdout=subprocess.PIPE,
                              text=True)
    seen = collect(follow)
    try:
        again = devd.run("restart", "--path", str(repo.main))
        assert "web  running" in again.stdout and gone(first["pid"])
        wait_for(lambda: any("stopped by devd (terminated)" in line for line in seen),
                 what="`devd logs -f` to show the restart")
    finally:
        follow.terminate()
        follow.wait()
    (repo.main / "devd.toml").write_text(PORTS + service("web", "python3 -m http.server 0"))
    changed = devd.run("up", "--path", str(repo.main))
    assert "devd.toml changed since it started" in changed.stderr
    pid = services(devd, repo.main)["web"]["pid"]
    log_dir = Path(services(devd, repo.main)["web"]["log"]).parent
    devd.run("release", str(repo.main))
    assert gone(pid) and not log_dir.exists()


def collect(proc: subprocess.Popen[str]) -> list[str]:
    """The lines `proc` prints, gathered by a thread as they come."""
    import threading

    lines: list[str] = []
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
    return lines


STUBBORN = ("python3 -c 'import os, signal, socket; signal.signal(signal.SIGTERM, "
            "signal.SIG_IGN); s = socket.socket(); s.bind((\"127.0.0.1\", "
            "int(os.environ[\"PORT\"]))); s.listen(); signal.pause()'")


def test_term_ignored_then_killed_and_concurrent_ups(devd_home: Devd, make_repo) -> None:
    devd_home.env["DEVD_KILL_TIMEOUT"] = "1"
    devd_home.start()
    repo = make_repo("stubborn", PORTS + service("web", STUBBORN))
    devd_home.run("provision", str(repo.main))
    ups = [subprocess.Popen([sys.executable, "-m", "devd", "up", "--json", "--path",
                             str(repo.main)], env=devd_home.env, stdout=subprocess.PIPE,
                            text=True) for _ in range(3)]
    pids = {json.loads(p.communicate(timeout=120)[0])["services"][0]["pid"] for p in ups}
    assert len(pids) == 1  # three `up`s at once started it once
    down = json.loads(devd_home.run("down", "--json", "--path", str(repo.main)).stdout)
    assert down["services"][0]["outcome"] == "killed" and gone(pids.pop())
    assert devd_home.stop() == 0


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No service of a test survives it (each daemon stops its own; this checks). Only
    services of this session's daemons (their DEVD_HOME is under its temp dir) count: the
    services of other daemons on the machine (a developer's own, a benchmark's, another
    session's) are none of this test's business, and were SIGKILLed by it."""
    ours = str(tmp_path_factory.getbasetemp())
    before = {p.pid for p in psutil.process_iter()}
    yield
    time.sleep(0.1)
    for proc in psutil.process_iter(["environ"]):
        try:
            env = proc.info["environ"] or {}
            if proc.pid not in before and "DEVD_SERVICE_TOKEN" in env and \
                    env.get("DEVD_HOME", "").startswith(ours):
                proc.kill()
                raise AssertionError(f"service process {proc.pid} outlived its daemon")
        except psutil.Error:
            continue
