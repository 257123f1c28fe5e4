"""Proxy benchmarks (issue 11): per-request latency and a WebSocket round trip, through
devd's Caddy versus straight to the same local server, measured in the same run.

The server is tests/fixtures/proxy_backend.py (stdlib HTTP, websockets echo), started with
a worktree's own env contract. Batches alternate direct and proxied, so both see the same
machine load; each sample is one request on a kept-alive connection (or one echo on an open
WebSocket), as a browser and an HMR client use them.

    python bench/bench_proxy.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from bench_core import new_repo, start_daemon

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "tests" / "fixtures" / "proxy_backend.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def devd(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "devd", *args], env=env, check=True,
                          capture_output=True, text=True).stdout


def http_sampler(port: int, host: str) -> Callable[[], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def one() -> float:
        start = time.perf_counter()
        conn.request("GET", "/", headers={"Host": host})
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 200, reply.status
        return time.perf_counter() - start
    return one


def ws_sampler(port: int, url: str, stack: contextlib.ExitStack) -> Callable[[], float]:
    from websockets.sync.client import connect

    ws = stack.enter_context(connect(url, sock=socket.create_connection(("127.0.0.1", port))))
    # An HMR message is a small JSON object, e.g. Vite's {"type":"update","updates":[…]}.
    payload = json.dumps({"type": "update", "updates": [
        {"type": "js-update", "path": "/src/App.tsx", "timestamp": 1}]})

    def one() -> float:
        start = time.perf_counter()
        ws.send(payload)
        ws.recv(timeout=10)
        return time.perf_counter() - start
    return one


def compare(direct: Callable[[], float], proxied: Callable[[], float], count: int,
            rounds: int) -> tuple[float, float]:
    """p50 (ms) of each, batches alternating; the first batch of each warms up unrecorded."""
    for sample in (direct, proxied):
        for _ in range(min(200, count)):
            sample()
    times: dict[str, list[float]] = {"direct": [], "proxied": []}
    for _ in range(rounds):
        for key, sample in (("direct", direct), ("proxied", proxied)):
            times[key] += [sample() for _ in range(count)]
    return (statistics.median(times["direct"]) * 1000,
            statistics.median(times["proxied"]) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="devd-bench-proxy-") as tmp_name:
        tmp = Path(tmp_name)
        repo, home, port = tmp / "shop", tmp / "home", free_port()
        new_repo(repo, '[ports]\nnames = ["web", "ws"]\n')
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")} | {
            "DEVD_HOME": str(home), "DEVD_NO_AUTOSTART": "1", "DEVD_PROXY_PORT": str(port)}
        daemon = start_daemon(env, home)
        backend = None
        try:
            devd(env, "provision", str(repo))
            wt_env = json.loads(devd(env, "env", "--format", "json", str(repo)))
            backend = subprocess.Popen([sys.executable, str(BACKEND)], env=env | wt_env,
                                       stdout=subprocess.PIPE, cwd=repo)  # the worktree's
            assert backend.stdout is not None and backend.stdout.readline().strip() == b"ready"
            wait_proxy(env, wt_env["DEVD_URL_WEB"])
            web, ws = int(wt_env["PORT_WEB"]), int(wt_env["PORT_WS"])
            host = urlsplit(wt_env["DEVD_URL_WEB"]).netloc
            ws_url = wt_env["DEVD_URL_WS"].replace("http", "ws", 1) + "/"
            http_p50 = compare(http_sampler(web, host), http_sampler(port, host),
                               args.requests, args.rounds)
            with contextlib.ExitStack() as stack:
                ws_p50 = compare(ws_sampler(ws, f"ws://127.0.0.1:{ws}/", stack),
                                 ws_sampler(port, ws_url, stack), args.requests, args.rounds)
        finally:
            if backend is not None:
                backend.kill()
            daemon.terminate()
            daemon.wait(20)
    report(http_p50, ws_p50, args.requests * args.rounds)


def wait_proxy(env: dict[str, str], url: str = "") -> None:
    """Caddy running and, given a URL, routing it to its server (not devd's page: the
    route dials a server only once devd verified it is the worktree's)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if json.loads(devd(env, "status", "--json"))["proxy"]["state"] == "running" and \
                (not url or _served(url, int(env["DEVD_PROXY_PORT"]))):
            return
        time.sleep(0.1)
    raise SystemExit("the proxy did not come up")


def _served(url: str, port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": urlsplit(url).netloc})
        return conn.getresponse().status not in (502, 503)
    except OSError:
        return False
    finally:
        conn.close()


def machine(what: str) -> str:
    caddy = subprocess.run([str(Path(sys.executable).parent / "caddy"), "version"],
                           capture_output=True, text=True).stdout.split()[:1]
    return (f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
            f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}; caddy "
            f"{' '.join(caddy) or '?'}; {what}, load {os.getloadavg()[0]:.1f}")


def report(http_p50: tuple[float, float], ws_p50: tuple[float, float], samples: int) -> None:
    print(machine(f"{samples} samples each") + "\n")
    print("| measure | direct p50 | through the proxy p50 | overhead | ratio | target |")
    print("|---|---|---|---|---|---|")
    for name, (direct, proxied), target in (
            ("HTTP GET, kept-alive", http_p50, "overhead ≤ 1 ms"),
            ("WebSocket echo (HMR-sized message)", ws_p50, "≤ 1.1×")):
        print(f"| {name} | {direct:.3f} ms | {proxied:.3f} ms | {proxied - direct:+.3f} ms | "
              f"{proxied / direct:.2f}× | {target} |")


if __name__ == "__main__":
    main()
