"""`devd db ...`: Postgres snapshots, and resetting a worktree's data to its snapshot.

Kept out of cli.py (which is long enough) and as light: no docker, psycopg or pydantic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from devd.client import Client
from devd.render import safe
from devd.render_status import line, size_text, table

Call = Callable[[Client, argparse.Namespace], dict[str, Any]]


def add_parser(cmd: argparse.ArgumentParser, path_argument: Callable[..., None]) -> None:
    sub = cmd.add_subparsers(dest="db", required=True, metavar="ACTION")
    snap = sub.add_parser("snapshot", help="a consistent copy of a running Postgres, taken "
                          "without stopping or disconnecting its sessions")
    snap.add_argument("name", nargs="?", help="the snapshot's name (default: the repo's)")
    snap.add_argument("--from", dest="source", metavar="PATH|URL",
                      help="a worktree whose devd container to copy (default: the main "
                      "worktree's), or a server's URL (needs a role with REPLICATION; its "
                      "password from PGPASSWORD or ~/.pgpass keeps it out of ps)")
    snap.add_argument("--max-rate", help="cap the copy's read rate, e.g. 50M (pg_basebackup)")
    sub.add_parser("snapshots", help="list snapshots, their size and the worktrees using them")
    drop = sub.add_parser("drop-snapshot", help="remove a snapshot no worktree uses")
    drop.add_argument("name")
    reset = sub.add_parser("reset", help="put a worktree's data back to its snapshot (the "
                           "data it had is kept aside)")
    path_argument(reset)
    for each in (snap, drop, reset, sub.choices["snapshots"]):
        each.add_argument("--json", action="store_true", help="machine-readable output")
        each.add_argument("-v", "--verbose", action="store_true", help="every progress line")


def run(client: Client, args: argparse.Namespace, abspath: Callable[[str], str],
        progress: Callable[[dict[str, Any]], None]) -> int:
    if args.db == "snapshot":
        source = args.source if not args.source or "://" in args.source or "=" in args.source \
            else abspath(args.source)
        params = {"path": abspath("."), "source": source, "name": args.name,
                  "max_rate": args.max_rate}
        if source and source == args.source:  # a URL
            # A password in --from is in argv, which every local user sees (ps) while the
            # copy runs: libpq's PGPASSWORD keeps it out; the daemon's env is not this one's.
            params["password"] = os.environ.get("PGPASSWORD")
        result = client.call("db_snapshot", {k: v for k, v in params.items() if v}, progress)
        text = (f"snapshot {result['name']}: {size_text(result['bytes'])} of PostgreSQL "
                f"{result['pg_major']} from {result['source']} in {result['seconds']} s\n"
                f"  {result['path']}")
    elif args.db == "snapshots":
        result = client.call("db_snapshots", {})
        text = render_snapshots(result["snapshots"])
    elif args.db == "drop-snapshot":
        result = client.call("db_drop_snapshot", {"name": args.name}, progress)
        text = f"dropped snapshot {result['dropped']} ({result['path']})"
    else:
        result = client.call("db_reset", {"path": abspath(args.path)}, progress)
        text = (f"reset {result['reset']} to snapshot {result['snapshot']} "
                f"({result['strategy']}) in {result['seconds']} s"
                + (f"\n  the data it had is kept in {result['before']}"
                   if result.get("before") else ""))
    print(json.dumps(result, indent=2) if args.json else safe(text))
    return 0


def render_snapshots(found: list[dict[str, Any]]) -> str:
    """One aligned row per snapshot: name, size, major, age, source, users."""
    if not found:
        return "no snapshots yet (devd db snapshot NAME)"
    rows = [["NAME", "SIZE", "PG", "TAKEN", "SOURCE", "USED BY"]]
    for snap in found:
        taken = time.strftime("%Y-%m-%d %H:%M", time.localtime(snap.get("created", 0)))
        users = snap.get("used_by") or []
        rows.append([snap["name"], size_text(snap.get("bytes")), str(snap.get("pg_major")),
                     taken, str(snap.get("source")),
                     ", ".join(os.path.basename(u) for u in users) or "-"])
    widths = table(rows, sys.maxsize, ())  # natural widths: nothing is clipped
    return "\n".join(line(row, widths) for row in rows)
