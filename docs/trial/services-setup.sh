#!/bin/sh
# Issue 11's Done-when trial: Vite + Next.js + Python API, three worktrees (see docs/trial-services.md).
set -eu
T=/tmp/up11-trial
rm -rf $T/src $T/home && mkdir -p $T/src/shop && cd $T/src/shop
git init -q -b main
cat > devd.toml <<'TOML'
[ports]
names = ["web", "next", "api"]

[services.web]
command = "npx vite"
dir = "web"
port = "web"
env = { VITE_API_URL = "{url:api}" }

[services.next]
command = "npx next dev"
dir = "next"
port = "next"
env = { NEXT_PUBLIC_API_URL = "{url:api}" }

[services.api]
command = "python3 api.py"
port = "api"
ready = "/health"
env = { WEB_ORIGIN = "{url:web}", NEXT_ORIGIN = "{url:next}" }
TOML
cat > api.py <<'PY'
import http.server, json, os
ORIGINS = {os.environ["WEB_ORIGIN"], os.environ["NEXT_ORIGIN"]}
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"api": os.environ["DEVD_WORKTREE"]}).encode()
        self.send_response(200)
        if self.headers.get("Origin") in ORIGINS:
            self.send_header("Access-Control-Allow-Origin", self.headers["Origin"])
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
PY
mkdir -p web next/app
echo '{"name":"web","private":true,"type":"module"}' > web/package.json
echo 'export default { cacheDir: ".vite" };' > web/vite.config.js
printf '<!doctype html><p id="msg"></p><pre id="api"></pre><script type="module" src="/main.js"></script>\n' > web/index.html
cat > web/main.js <<'JS'
import { msg } from "./msg.js";
const show = (text) => { document.getElementById("msg").textContent = text; };
show(msg);
if (import.meta.hot) import.meta.hot.accept("./msg.js", (m) => show(m.msg));
fetch(import.meta.env.VITE_API_URL + "/").then((r) => r.text())
  .then((t) => { document.getElementById("api").textContent = t; })
  .catch((e) => { document.getElementById("api").textContent = "error: " + e; });
JS
echo 'export const msg = "v0";' > web/msg.js
echo '{"name":"next-app","private":true}' > next/package.json
echo 'export default { turbopack: { root: "/tmp/up11-trial" } };' > next/next.config.mjs
cat > next/app/layout.js <<'JS'
export default function Root({ children }) { return <html><body>{children}</body></html>; }
JS
cat > next/app/msg.js <<'JS'
export const msg = "n0";
JS
cat > next/app/page.js <<'JS'
"use client";
import { useEffect, useState } from "react";
import { msg } from "./msg";
export default function Page() {
  const [api, setApi] = useState("");
  useEffect(() => { fetch(process.env.NEXT_PUBLIC_API_URL + "/").then((r) => r.text())
    .then(setApi, (e) => setApi("error: " + e)); }, []);
  return <main><p id="msg">{msg}</p><pre id="api">{api}</pre></main>;
}
JS
printf '.env\nnode_modules\n.vite\n.next\n' > .gitignore
git add -A && git -c user.name=t -c user.email=t@x commit -qm trial
git worktree add -q ../shop-a -b feat/a
git worktree add -q ../shop-b -b fix/a
for w in shop shop-a shop-b; do
  ln -s /tmp/vite-cache-services/node_modules $T/src/$w/web/node_modules
  ln -s $T/next-modules/node_modules $T/src/$w/next/node_modules
done
