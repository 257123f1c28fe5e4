"""`devd status` and `devd ports` at a glance: one aligned row per item, warnings at the bottom.

Widths are terminal cells: East Asian wide characters count two, combining marks none
(unicodedata), so a CJK or emoji branch name keeps the columns aligned in most terminals.
"""

from __future__ import annotations

import os
import time
import unicodedata
from typing import Any

from devd.render import safe
from devd.services.logs import output_of

WIDTH = 100  # when stdout is not a terminal: what the one-screen promise is measured at
LISTENING = "+"  # after a port something listens on
HERE = "*"  # before the worktree the caller stands in
FLOOR = 10  # cells a column keeps however narrow the terminal
STATE = 2  # the state column of a status row: the one coloured
COLOURS = {"ready": "32", "provisioning": "33", "failed": "31", "degraded": "31", "gone": "90"}
PG_MODES = {"database": "pg-db", "schema": "pg-schema", "container": "pg-docker"}
SERVICES_LISTED = 3  # more services than this are counted on the row, listed with -v
# Which per-tree deps state speaks for the whole, worst first.
DEPS_WORST = ("failed", "missing", "stale", "symlinked", "installing", "ready")


def cells(text: str) -> int:
    """How many terminal cells `text` takes."""
    if text.isascii():  # one cell each (safe() has escaped control characters): most text
        return len(text)
    return sum(_cell(ch) for ch in text)


def _cell(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def clip(text: str, width: int, keep_end: bool = False) -> str:
    """`text` cut to `width` cells, with an ellipsis where it was cut (`keep_end`: at the
    start, for paths, whose end names them)."""
    if cells(text) <= width:
        return text
    chars = reversed(text) if keep_end else iter(text)
    out, used = [], 0
    for ch in chars:
        if used + _cell(ch) > width - 1:
            break
        out.append(ch)
        used += _cell(ch)
    return "…" + "".join(reversed(out)) if keep_end else "".join(out) + "…"


def clip_middle(text: str, width: int) -> str:
    """`text` cut to `width` cells in its middle: names sharing a start (shop-feature-1,
    shop-feature-2, ...) are told apart by their ends, which a cut at the end would drop."""
    if cells(text) <= width:
        return text
    start = clip(text, (width - 1) // 3 + 1)[:-1]
    return start + clip(text, width - cells(start), keep_end=True)


def pad(text: str, width: int) -> str:
    return text + " " * max(0, width - cells(text))


def tilde(path: str, home: str | None = None) -> str:
    """`path` with the home directory (default: this process's) shown as `~`."""
    home = (home or os.path.expanduser("~")).rstrip("/")
    if home and (path == home or path.startswith(home + "/")):
        return "~" + path[len(home):]
    return path


def span(seconds: float) -> str:
    """A duration for people, its two largest units: '45s', '3m', '23h 57m', '2d 4h'."""
    left, parts = max(0, int(seconds)), list[str]()
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if left >= size or (size == 1 and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return " ".join(parts[:2])


def ago(seconds: float) -> str:
    """3m, 5h, 2d: the largest unit that fits."""
    return span(seconds).split()[0]


def epoch(value: Any) -> float | None:
    """An ISO 8601 time (status' schema 1) or an epoch number as epoch seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        from datetime import datetime  # only gone rows pay its import (`devd status` is hot)

        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


class Painter:
    """ANSI colour on a terminal only; NO_COLOR (any value) or TERM=dumb (Emacs' shell, a
    terminal that prints escapes as text) turns it off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: Any, environ: dict[str, str]) -> Painter:
        return cls(bool(getattr(stream, "isatty", lambda: False)()) and not environ.get("NO_COLOR")
                   and environ.get("TERM") != "dumb")

    def __call__(self, text: str, code: str | None) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled and code else text


# -- status --------------------------------------------------------------------


def state_word(wt: dict[str, Any], grace: float | None, now: float) -> str:
    """`ready`, `degraded` (a resource failed its check), or `gone 3m · gc in 23h`."""
    if wt["state"] == "gone":
        since = epoch(wt.get("gone_at"))
        if since is None:
            return "gone"
        gone = f"gone {ago(now - since)}"
        if grace is None:
            return gone
        left = since + grace - now
        return f"{gone} · gc {'in ' + ago(left) if left > 0 else 'due'}"
    if wt["state"] == "ready" and any(r["state"] == "failed" for r in wt.get("resources", [])):
        return "degraded"
    return str(wt["state"])


def ports_word(wt: dict[str, Any]) -> str:
    listening = wt.get("listening") or {}
    return " ".join(f"{name}={port}{LISTENING * bool(listening.get(name))}"
                    for name, port in wt.get("ports", {}).items()) or "-"


def postgres_word(wt: dict[str, Any]) -> str:
    pg = wt.get("postgres")
    return f"{PG_MODES.get(pg.get('mode'), pg.get('mode'))}:{pg.get('state')}" if pg else "-"


def deps_word(wt: dict[str, Any]) -> str:
    states = {d.get("state") for d in (wt.get("deps") or {}).values()}
    if not states:
        return "-"
    worst = next((s for s in DEPS_WORST if s in states), sorted(map(str, states))[0])
    return f"deps:{worst}"


def services_word(wt: dict[str, Any]) -> str:
    """`web:up api:crashed`, or for many services a count: `svc 4/6 up, 1 crashed`."""
    shown = wt.get("services") or []
    words = {"running": "up", "stopped": "down"}
    states = [words.get(s["state"], s["state"]) for s in shown]
    if len(shown) <= SERVICES_LISTED:
        return " ".join(f"{s['name']}:{state}" for s, state in zip(shown, states, strict=True))
    bad = [s for s in states if s not in ("up", "down")]
    return f"svc {states.count('up')}/{len(states)} up" + (f", {len(bad)} {bad[0]}"
                                                            if bad else "")


def here_of(cwd: str | None, worktrees: list[dict[str, Any]]) -> str | None:
    """The path of the deepest worktree containing `cwd` (they can nest)."""
    if not cwd:
        return None
    inside = [w["path"] for w in worktrees
              if cwd == w["path"] or cwd.startswith(w["path"].rstrip("/") + "/")]
    return max(inside, key=len, default=None)


def status_rows(result: dict[str, Any], cwd: str | None, now: float
                ) -> list[tuple[str, list[list[str]]]]:
    """(repo heading, rows of cells) per repo, repos and rows sorted by path."""
    grace = (result.get("daemon") or {}).get("gc_grace_seconds")
    here = here_of(cwd, result["worktrees"])
    with_services = any(wt.get("services") for wt in result["worktrees"])
    groups: dict[str, list[list[str]]] = {}
    for wt in sorted(result["worktrees"], key=lambda w: w["path"]):
        groups.setdefault(wt.get("repo") or "?", []).append([
            f"{HERE if wt['path'] == here else ' '} {os.path.basename(wt['path']) or wt['path']}",
            wt.get("branch") or "(detached HEAD)", state_word(wt, grace, now), ports_word(wt),
            postgres_word(wt), deps_word(wt)] + [services_word(wt)] * with_services)
    return [(repo, [[safe(c) for c in row] for row in rows])
            for repo, rows in sorted(groups.items())]


def fit(widths: list[int], limit: int, tiers: tuple[tuple[int, ...], ...]) -> list[int]:
    """Narrow columns until the row fits: the widest of the first tier, one cell at a time,
    down to FLOOR, then the next tier's (names and branches give way before ports)."""
    widths = list(widths)
    for tier in tiers:
        while sum(widths) > limit:
            wide = max(tier, key=lambda i: widths[i])
            if widths[wide] <= FLOOR:
                break
            widths[wide] -= 1
    return widths


def table(rows: list[list[str]], limit: int, tiers: tuple[tuple[int, ...], ...]
          ) -> list[int]:
    """Column widths for `rows`, fitted to `limit` cells in all (gaps of two included)."""
    natural = [max(cells(row[i]) for row in rows) for i in range(len(rows[0]))]
    return fit(natural, limit - 2 * (len(natural) - 1), tiers)


def line(row: list[str], widths: list[int], paint: Painter | None = None,
         colour: str | None = None, keep_end: tuple[int, ...] = (),
         middle: tuple[int, ...] = ()) -> str:
    """One row: every cell clipped (at its end, its start for `keep_end`, its middle for
    `middle`) and padded to its column, the state cell coloured."""
    shown = [pad(clip_middle(c, w) if i in middle else clip(c, w, i in keep_end), w)
             for i, (c, w) in enumerate(zip(row, widths, strict=True))]
    if paint is not None:
        shown[STATE] = paint(shown[STATE], colour)
    return "  ".join(shown).rstrip()


def render_status(result: dict[str, Any], cwd: str | None, paint: Painter,
                  width: int = WIDTH, now: float | None = None, home: str | None = None) -> str:
    """The at-a-glance table: a summary line, a heading per repo, one row per worktree."""
    now = time.time() if now is None else now
    groups = status_rows(result, cwd, now)
    out = [summary(result, now)]
    every = [row for _, rows in groups for row in rows]
    widths = table(every, width, ((0, 1), (3,))) if every else []
    for repo, rows in groups:
        out.append(paint(safe(tilde(repo, home)), "1"))
        for row in rows:
            out.append(line(row, widths, paint, COLOURS.get(row[STATE].split(" ")[0]),
                            middle=(0, 1)))
    return "\n".join(out + warnings(result))


def dashboard(result: dict[str, Any]) -> str | None:
    """`dashboard <url>` for `status -v`: at 81 cells it wrapped the glance, whose 20
    worktrees of 3 repos must fit one 80x24 screen (the key is only in status)."""
    proxy = result.get("proxy") or {}
    if proxy.get("state") == "running" and proxy.get("dashboard"):
        return f"dashboard {proxy['dashboard']}"
    return None


def summary(result: dict[str, Any], now: float | None = None) -> str:
    daemon, count = result["daemon"], len(result["worktrees"])
    text = f"devd {daemon['version']} · pid {daemon['pid']} · {count} " \
        f"worktree{'s' * (count != 1)}"
    budget = result.get("watchers") or {}
    if budget.get("max_watches"):
        text += f" · watchers {budget.get('level')} {budget.get('watches')}/" \
            f"{budget['max_watches']}"
    proxy = result.get("proxy") or {}
    if proxy.get("state") == "running":
        text += f" · proxy :{proxy.get('port')}"
    return safe(text + stale(result, time.time() if now is None else now))


def stale(result: dict[str, Any], now: float) -> str:
    """` · checked 2m ago` once the daemon's last pass is over two cadences old (a pass is
    stuck or slow: the rows may be out of date); ` · not checked yet` for an answer made
    before the daemon's first pass ended; nothing while the cadence keeps up."""
    if any(wt.get("checked") is False for wt in result.get("worktrees", [])):
        return " · not checked yet"
    checked, interval = epoch(result.get("checked_at")), result.get("check_interval_seconds")
    if checked is None or not isinstance(interval, (int, float)) \
            or now - checked <= 2 * interval + 1:
        return ""
    return f" · checked {ago(now - checked)} ago"


def orphan_line(orphan: dict[str, Any]) -> str:
    """One orphan, and what becomes of it: a dead daemon's snapshot leftovers (no worktree)
    go with the next daemon or `devd gc`; the rest are left to you."""
    if not orphan["worktree_id"]:
        return (f"orphan {orphan['kind']} {orphan['name']} ({orphan['where']}): left by a "
                "daemon killed mid-snapshot; `devd gc` removes it")
    return (f"orphan {orphan['kind']} {orphan['name']} ({orphan['where']}, worktree "
            f"{orphan['worktree_id']}): no registered worktree owns it; remove it by hand if "
            "unwanted")


def warnings(result: dict[str, Any]) -> list[str]:
    """What needs a look, gathered at the bottom: one line each."""
    ordered = sorted(result["worktrees"], key=lambda w: (w.get("repo") or "", w["path"]))
    found = [w for wt in ordered for w in _worktree_warnings(wt)]
    found += [orphan_line(o) for o in result.get("orphans", [])]
    if result.get("check_error"):
        when = epoch(result.get("checked_at"))
        last = f"from {ago(time.time() - when)} ago" if when is not None else "not checked yet"
        found.append(f"the daemon's status checks failed ({result['check_error']}): the rows "
                     f"are {last}; see the daemon log")
    proxy = result.get("proxy") or {}
    if proxy.get("enabled") and proxy.get("state") not in ("running", "starting"):
        found.append(f"proxy {proxy.get('state')}: {proxy.get('error')} ({proxy.get('hint')}); "
                     "ports and the rest of devd work without it")
    return [safe(f"! {text}") for text in found]


def _worktree_warnings(wt: dict[str, Any]) -> list[str]:
    name = os.path.basename(wt["path"]) or wt["path"]
    found = [f"{name}: {wt['error']}"] if wt.get("error") else []
    found += [f"{name}: {r['kind']} {r['state']} {r.get('detail') or ''}".rstrip()
              for r in wt.get("resources", []) if r["state"] != "ready"]
    found += [f"{name}: gone, but pid {p['pid']} {p['command']} still runs"
              + (f" on port {p['port']}" if p.get("port") else "")
              for p in wt.get("processes", [])]
    found += [f"{name}: port {h['name']} {h['port']} is held by pid {h['pid']} {h['command']}, "
              + (f"a process of {os.path.basename(h['worktree'])}" if h.get("worktree")
                 else "outside any worktree") + "; its own server cannot listen there"
              for h in wt.get("foreign_holders", [])]
    found += [f"{name}: service {s['name']} {s['state']}: {s.get('error') or ''}".rstrip(": ")
              + "".join(f" | {line}" for line in output_of(s.get("log_tail") or [])[-1:])
              for s in wt.get("services") or [] if s["state"] in ("crashed", "failed")]
    watch = wt.get("watchers") or {}
    if watch.get("state") in ("broken", "partial", "critical"):
        found.append(f"{name}: watchers {watch['state']} {watch.get('reason') or ''}".rstrip())
    return found


# -- ports ---------------------------------------------------------------------

PORT_HEADER = ["PORT", "NAME", "WORKTREE", "LISTENING", "PID", "COMMAND", "OWNER"]


def port_owner(row: dict[str, Any]) -> str:
    """Whose process holds the port, flagged when a gone worktree's still does."""
    if not row["listening"]:
        return "-"
    owner, gone = row.get("owner_worktree"), row.get("owner_state") == "gone"
    if owner is None:
        return "(outside any worktree)"
    if owner != row["worktree"]:
        return f"{'! gone worktree ' * gone}{tilde(owner)}"
    if gone or row.get("worktree_state") == "gone":
        return "! (its worktree is gone)"
    return "this worktree"


def render_ports(rows: list[dict[str, Any]], width: int = WIDTH) -> str:
    """A header and aligned columns, one row per leased port."""
    if not rows:
        return "no ports leased"
    shown = [PORT_HEADER] + [[safe(str(c)) for c in (
        r["port"], r["name"], tilde(r["worktree"]), "yes" if r["listening"] else "no",
        r.get("pid") or "-", r.get("command") or "-", port_owner(r))] for r in rows]
    widths = table(shown, width, ((2, 5), (6,)))
    return "\n".join(line(row, widths, keep_end=(2,)) for row in shown)


def size_text(count: float | None) -> str:
    """Bytes as people read them: 0 B, 812 KB, 4.9 GB (1024-based, as du -h); ? if unknown."""
    if count is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return "?"
