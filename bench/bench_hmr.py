"""HMR through the proxy (issue 11): a real Vite dev server, a real Chromium, one module
rewritten again and again; the time from the write to the new text in the page, with the
page opened straight on Vite's port and through devd's Caddy, rounds alternating.

Needs node, npm (vite and playwright-core are installed once into a temp dir) and
/usr/bin/chromium.

    python bench/bench_hmr.py [--rounds 5] [--updates 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_core import git, start_daemon
from bench_proxy import devd, free_port, machine, wait_proxy

HERE = Path(__file__).resolve().parent
MAIN = """import { msg } from "./msg.js";
const show = (text) => { document.getElementById("msg").textContent = text; };
show(msg);
if (import.meta.hot) import.meta.hot.accept("./msg.js", (m) => show(m.msg));
"""


def node_modules() -> Path:
    where = Path(tempfile.gettempdir()) / "devd-bench-vite"
    if not (where / "node_modules" / "vite").is_dir():
        where.mkdir(exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "vite@7",
                        "playwright-core@1"], cwd=where, check=True)
    return where


def make_app(repo: Path, modules: Path) -> None:
    (repo / "src").mkdir(parents=True)
    (repo / "index.html").write_text('<!doctype html><p id="msg"></p>'
                                     '<script type="module" src="/src/main.js"></script>\n')
    (repo / "src" / "main.js").write_text(MAIN)
    (repo / "src" / "msg.js").write_text('export const msg = "v0";\n')
    (repo / "devd.toml").write_text('[ports]\nnames = ["web"]\n')
    (repo / ".gitignore").write_text("node_modules\n.env\n")
    (repo / "node_modules").symlink_to(modules / "node_modules")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=10)
    args = parser.parse_args()
    modules = node_modules()
    with tempfile.TemporaryDirectory(prefix="devd-bench-hmr-") as tmp_name:
        tmp = Path(tmp_name)
        repo, home, port = tmp / "shop", tmp / "home", free_port()
        home.mkdir()
        repo.mkdir()
        make_app(repo, modules)
        git(repo, "init", "-q", "-b", "main")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "init")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVD_")} | {
            "DEVD_HOME": str(home), "DEVD_NO_AUTOSTART": "1", "DEVD_PROXY_PORT": str(port),
            "DEVD_DEPS_JOBS": "1"}
        daemon = start_daemon(env, home)
        vite = None
        try:
            devd(env, "provision", str(repo))
            wt_env = json.loads(devd(env, "env", "--format", "json", str(repo)))
            web = wt_env["PORT_WEB"]
            vite = subprocess.Popen(
                ["node", "node_modules/vite/bin/vite.js", "--port", web, "--strictPort",
                 "--host", "127.0.0.1"], cwd=repo, env=env | wt_env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert vite.stdout is not None
            while b"ready in" not in (line := vite.stdout.readline()):
                assert line, "vite exited"
            wait_proxy(env, wt_env["DEVD_URL_WEB"])
            reply = subprocess.run(
                ["node", str(HERE / "hmr_browser.js"), str(repo), f"http://127.0.0.1:{web}/",
                 wt_env["DEVD_URL_WEB"] + "/", str(args.rounds), str(args.updates)],
                env=env | {"PLAYWRIGHT_DIR": str(modules)}, capture_output=True, text=True)
            if reply.returncode:
                raise SystemExit(f"the browser run failed:\n{reply.stderr[-2000:]}")
            seen = json.loads(reply.stdout)
            times, lost = seen["times"], seen["lost"]
        finally:
            if vite is not None:
                vite.kill()
            daemon.terminate()
            daemon.wait(20)
    if lost["direct"] or lost["proxied"]:
        raise SystemExit(f"updates lost: {lost} (each must show; see hmr_browser.js)")
    direct, proxied = (statistics.median(times[k]) for k in ("direct", "proxied"))
    print(machine(f"{len(times['direct'])} and {len(times['proxied'])} updates timed "
                  f"(lost: {lost['direct']} direct, {lost['proxied']} proxied); vite 7, "
                  "Chromium") + "\n")
    print("| measure | direct p50 | through the proxy p50 | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| Vite HMR update, file write → new text in the page | {direct:.0f} ms | "
          f"{proxied:.0f} ms | {proxied / direct:.2f}× | ≤ 1.1× |")


if __name__ == "__main__":
    sys.exit(main())
