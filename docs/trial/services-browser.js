// argv: a JSON list of {name, dir, web, next}: each worktree's dir and named URLs.
// For each: the Vite page and the Next page through the proxy, the API text each fetched by
// its wired URL, then one edit each (HMR / Fast Refresh) timed from the write to the new text.
const fs = require("fs"); const path = require("path");
const { chromium } = require("/tmp/devd-bench-vite/node_modules/playwright-core");
const seen = (page, want) => page.waitForFunction((w) => document.getElementById("msg")?.textContent === w, want, { timeout: 60000 });
(async () => {
  const trees = JSON.parse(process.argv[2]);
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
  const out = [];
  for (const t of trees) {
    for (const [kind, url, file, from, to] of [
      ["vite", t.web, "web/msg.js", "v0", "v1-" + t.name], ["next", t.next, "next/app/msg.js", "n0", "n1-" + t.name]]) {
      const page = await browser.newPage();
      let loads = 0; page.on("load", () => loads++);
      const t0 = Date.now();
      await page.goto(url, { timeout: 120000 });
      await seen(page, from);
      await page.waitForFunction(() => document.getElementById("api")?.textContent, null, { timeout: 60000 });
      const firstPaint = Date.now() - t0;
      const api = await page.textContent("#api");
      await new Promise((d) => setTimeout(d, 1000));  // the HMR socket settles
      const w0 = Date.now();
      fs.writeFileSync(path.join(t.dir, file), `export const msg = ${JSON.stringify(to)};\n`);
      await seen(page, to);
      out.push({ worktree: t.name, kind, url, first_load_ms: firstPaint, api, update_ms: Date.now() - w0, page_loads: loads });
      await page.screenshot({ path: `/tmp/up11-trial/${t.name}-${kind}.png` });
      await page.close();
    }
  }
  await browser.close();
  console.log(JSON.stringify(out, null, 1));
})().catch((e) => { console.error(e); process.exit(1); });
