"""Issue 11 end to end, as a new user would try it: three worktrees of one repo, each with a
Vite app and a Python API declared in devd.toml, one `devd up` each, each at its own named
URL through a real Caddy; HMR through the proxy in a real Chromium; the API reached from the
web page at its wired URL; `git worktree remove` stops that worktree's servers and drops its
routes. Then idle_stop and wake-on-request through the proxy.

*.localhost does not resolve through glibc here: curl pins names with --resolve, Chromium
resolves them itself. Vite comes from the session's cached install (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, Devd, Repo, run_git, wait_for
from test_proxy import curl, free_port, make_daemon, need_caddy
from test_proxy import playwright_dir as playwright_dir  # the fixture, installed once
from test_services import gone

FIXTURES = Path(__file__).parent / "fixtures"
# The API answers the web origin it was wired to, and lets that origin's page read it.
API = textwrap.dedent("""\
    import http.server, json, os
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"api": True, "web_origin": os.environ["WEB_ORIGIN"]}).encode()
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", os.environ["WEB_ORIGIN"])
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *args): pass
    http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
    """)
TOML = """\
[ports]
names = ["web", "api"]

[services.web]
command = "npm run dev"
dir = "web"
port = "web"
env = { VITE_API_URL = "{url:api}" }

[services.api]
command = "python3 api.py"
port = "api"
ready = "/health"
env = { WEB_ORIGIN = "{url:web}" }
"""
# main.js fetches the API by its wired URL; msg.js is what the test edits (HMR).
MAIN = """import { msg } from "./msg.js";
const show = (text) => { document.getElementById("msg").textContent = text; };
show(msg);
if (import.meta.hot) import.meta.hot.accept("./msg.js", (m) => show(m.msg));
fetch(import.meta.env.VITE_API_URL + "/")
  .then((r) => r.text()).then((t) => { document.getElementById("api").textContent = t; })
  .catch((e) => { document.getElementById("api").textContent = "error: " + e; });
"""
BRANCHES = {"main": None, "feat/a": "shop-a", "fix/a": "shop-b"}


def web_app(root: Path, modules: Path) -> None:
    web = root / "web"
    web.mkdir(exist_ok=True)
    (web / "package.json").write_text(json.dumps(
        {"name": "web", "private": True, "type": "module", "scripts": {"dev": "vite"}}))
    (web / "index.html").write_text('<!doctype html><p id="msg"></p><pre id="api"></pre>'
                                    '<script type="module" src="/main.js"></script>\n')
    (web / "main.js").write_text(MAIN)
    (web / "msg.js").write_text('export const msg = "v0";\n')
    (web / "node_modules").symlink_to(modules)
    (root / "api.py").write_text(API)


def up(devd: Devd, path: Path, *names: str) -> dict[str, dict[str, Any]]:
    shown = json.loads(devd.run("up", "--json", "--path", str(path), *names,
                                timeout=180).stdout)
    return {s["name"]: s for s in shown["services"]}


def services(devd: Devd, path: Path) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in devd.worktree(path).get("services", [])}


def idle_api(devd: Devd, repo: Repo, branch: str, name: str) -> tuple[Path, dict[str, Any]]:
    """A worktree whose api has idle_stop = "1s", brought up and then stopped for idleness."""
    path = repo.worktree(branch, name)
    (path / "api.py").write_text(API)
    (path / "devd.toml").write_text(TOML.replace('ready = "/health"\n',
                                                 'ready = "/health"\nidle_stop = "1s"\n'))
    devd.run("provision", str(path))
    api = up(devd, path, "api")["api"]
    wait_for(lambda: services(devd, path)["api"]["state"] == "idle", 60, "the idle stop")
    return path, api


def code_of(url: str) -> tuple[str, str]:
    """(status code, body) of a GET through the proxy."""
    reply = curl(url, "-w", "\n%{http_code}")
    body, _, code = reply.stdout.rpartition("\n")
    return code, body


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, vite_modules: Path
         ) -> Iterator[tuple[Devd, Repo, dict[str, Path]]]:
    need_caddy()
    tmp = tmp_path_factory.mktemp("e2e")
    main = tmp / "src" / "shop"
    main.mkdir(parents=True)
    run_git(main, "init", "-q", "-b", "main")
    repo = Repo(main.resolve())
    repo.commit({"devd.toml": TOML, ".gitignore": ".env\nweb/node_modules\n"}, "init")
    trees = {b: repo.worktree(leaf, b) if leaf else repo.main for b, leaf in BRANCHES.items()}
    for path in trees.values():
        web_app(path, vite_modules)
    devd = make_daemon(tmp, free_port())
    devd.start()
    try:
        yield devd, repo, trees
    finally:
        if devd.proc is not None:
            assert devd.stop() == 0, devd.log()


def test_three_worktrees_named_urls_hmr_wiring_and_removal(
        shop: tuple[Devd, Repo, dict[str, Path]], playwright_dir: Path) -> None:
    devd, repo, trees = shop
    shown = {}
    for branch, path in trees.items():
        devd.run("provision", str(path))
        shown[branch] = up(devd, path)
    urls = {b: devd.worktree(p)["urls"] for b, p in trees.items()}
    assert len({u["web"] for u in urls.values()}) == 3
    for branch, svc in shown.items():
        web, api = svc["web"], svc["api"]
        assert (web["state"], api["state"]) == ("running", "running")
        # `up` and `status` give the named URL when the proxy is on, not the bare port.
        assert (web["url"], api["url"]) == (urls[branch]["web"], urls[branch]["api"])
        assert services(devd, trees[branch])["web"]["url"] == web["url"]
        code, page = code_of(web["url"] + "/")
        assert code == "200" and 'src="/main.js"' in page
        # Vite inlined the API's wired URL; the API knows the web origin it serves.
        assert f'"{api["url"]}"' in code_of(web["url"] + "/main.js")[1]
        code, body = code_of(api["url"] + "/")
        assert code == "200" and json.loads(body)["web_origin"] == web["url"]

    sites = [{"url": shown[b]["web"]["url"] + "/", "dir": str(p)} for b, p in trees.items()]
    reply = subprocess.run(["node", str(FIXTURES / "e2e_browser.js"), json.dumps(sites)],
                           capture_output=True, text=True, timeout=600,  # its own waits: 60 s
                           env={**os.environ, "PLAYWRIGHT_DIR": str(playwright_dir)})
    assert reply.returncode == 0, reply.stderr
    for seen, branch in zip(json.loads(reply.stdout), trees, strict=True):
        # The page read its own worktree's API, by URL, from the browser (cross-origin).
        assert json.loads(seen["api"]) == {"api": True, "web_origin": shown[branch]["web"]["url"]}
        assert seen["msg"] == seen["want"] and seen["kept"] == "same page"  # HMR, no reload
        assert seen["loads"] == 1

    # The worktree goes: its servers stop and its names stop routing (generous deadline).
    feat = trees["feat/a"]
    pids = [s["pid"] for s in shown["feat/a"].values()]
    children = [c.pid for pid in pids for c in psutil.Process(pid).children(recursive=True)]
    run_git(repo.main, "worktree", "remove", "--force", str(feat))
    wait_for(lambda: all(gone(p) for p in pids + children), what="feat/a's servers to stop")
    wait_for(lambda: code_of(urls["feat/a"]["web"] + "/")[0] == "404",
             what="feat/a's route to go")
    assert "No such name" in code_of(urls["feat/a"]["web"] + "/")[1]
    assert code_of(urls["fix/a"]["web"] + "/")[0] == "200"  # the others go on
    board = devd.json("status")["proxy"]["dashboard"]  # under its secret key path
    dashboard = code_of(board)[1]
    assert shown["main"]["web"]["url"] in dashboard and urls["feat/a"]["web"] not in dashboard
    # Its service rows: state, the named URL to open, the log tail (Vite's own output).
    main_id = devd.worktree(trees["main"])["id"]
    assert f'web: running (pid {shown["main"]["web"]["pid"]}' in dashboard
    assert f'<a href="{shown["main"]["web"]["url"]}/">open</a>' in dashboard
    assert f'href="logs/{main_id}/web"' in dashboard
    code, tail = code_of(f"{board}logs/{main_id}/web")
    assert code == "200" and "ready in" in tail and str(shown["main"]["web"]["port"]) in tail


def test_idle_stop_then_a_request_wakes_it(shop: tuple[Devd, Repo, dict[str, Path]]) -> None:
    """An idle_stop service stopped for idleness: its URL answers "starting…" (503, a page
    that reloads itself) while devd starts it, then the service itself."""
    devd, repo, _ = shop
    path, api = idle_api(devd, repo, "shop-idle", "idle")
    assert gone(api["pid"])

    code, page = code_of(api["url"] + "/")
    assert code == "503" and "starting api" in page and 'http-equiv="refresh"' in page
    # Once it answers, its idle_stop of 1 s can stop it again before status is read (seen
    # under load: "stopping"); a later request wakes it again. So both at once, retried.
    wait_for(lambda: code_of(api["url"] + "/")[0] == "200"
             and services(devd, path)["api"]["state"] == "running",
             what="the woken api to answer, running")
    assert "idle (a request to its URL starts it again)" in \
        devd.run("logs", "api", "--path", str(path)).stdout

    # Only Caddy's wake routes may wake: the dashboard's /_devd/wake without the secret,
    # or with a wrong one, is a 404 and starts nothing.
    wt_id = devd.worktree(path)["id"]
    dashboard = f"http://devd.localhost:{devd.env['DEVD_PROXY_PORT']}/_devd/wake/{wt_id}/api"
    assert code_of(dashboard)[0] == "404"
    assert curl(dashboard, "-H", "X-Devd-Wake: guess", "-o", "/dev/null", "-w",
                "%{http_code}").stdout == "404"

    # A service `devd down` stopped is not woken: its URL says it is not running.
    devd.run("down", "--path", str(path))
    wait_for(lambda: code_of(api["url"] + "/")[0] == "502", what="devd's not-running page")
    assert "api of shop/idle is not running" in code_of(api["url"] + "/")[1]
    assert services(devd, path)["api"]["state"] == "stopped"


def test_a_wake_that_cannot_start_says_why(shop: tuple[Devd, Repo, dict[str, Path]]) -> None:
    """Woken while a foreign process holds its port: the page says so, nothing starts."""
    devd, repo, _ = shop
    path, api = idle_api(devd, repo, "shop-held", "held")
    squatter = subprocess.Popen(["python3", "-m", "http.server", "--bind", "127.0.0.1",
                                 str(api["port"])], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: api["port"] in {c.laddr.port for c in psutil.net_connections("tcp")
                                         if c.status == psutil.CONN_LISTEN}, what="squatter")
        code, page = code_of(api["url"] + "/")
        assert code == "502" and "api of shop/held is not running" in page and \
            "is taken by pid" in page
        assert services(devd, path)["api"]["state"] == "idle"
    finally:
        squatter.kill()
        squatter.wait()


ECHO = textwrap.dedent("""\
    import os
    from websockets.sync.server import serve
    def echo(ws):
        for message in ws:
            ws.send(message)
    with serve(echo, "127.0.0.1", int(os.environ["PORT_API"])) as server:
        print("ready", flush=True)
        server.serve_forever()
    """)


def test_a_route_change_keeps_open_websockets(shop: tuple[Devd, Repo, dict[str, Path]]
                                              ) -> None:
    """Routes are pushed whole; an HMR socket open through the proxy must outlive the push
    that another worktree's new route makes (else every Vite page through it reloads)."""
    pytest.importorskip("websockets")
    import socket

    from websockets.sync.client import connect

    devd, repo, _ = shop
    one, two = repo.worktree("shop-ws1", "ws1"), repo.worktree("shop-ws2", "ws2")
    devd.run("provision", str(one))
    env = json.loads(devd.run("env", "--format", "json", str(one)).stdout)
    server = subprocess.Popen([sys.executable, "-c", ECHO], env={**os.environ, **env},
                              stdout=subprocess.PIPE, cwd=one)  # the worktree's: dialled
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        wait_for(lambda: code_of(env["DEVD_URL_API"] + "/")[0] not in ("502", "503"), 30,
                 "the route to the echo server")
        port = int(devd.env["DEVD_PROXY_PORT"])
        url = env["DEVD_URL_API"].replace("http", "ws", 1) + "/"
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        with connect(url, sock=sock, open_timeout=20) as ws:
            ws.send("before")
            assert ws.recv(timeout=20) == "before"
            devd.run("provision", str(two))  # a new route: a new config pushed
            two_url = devd.worktree(two)["urls"]["api"]
            wait_for(lambda: code_of(two_url + "/")[0] == "502", what="ws2's route")
            ws.send("after")
            assert ws.recv(timeout=20) == "after"
    finally:
        server.kill()
        server.wait()
