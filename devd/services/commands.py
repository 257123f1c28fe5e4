"""`devd up`, `down`, `restart` and `logs`: the CLI side (light imports only)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from devd import cli
from devd.client import Client
from devd.render import safe
from devd.services import logs


def add_parsers(command: Any) -> None:
    """The four commands, through cli.build_parser's `command` helper."""
    for name, text in (("up", "start the worktree's declared services and wait until ready"),
                       ("down", "stop the worktree's services"),
                       ("restart", "stop and start the worktree's services")):
        cmd = command(name, text, name != "restart")
        cmd.add_argument("--path", default=".", help="a directory in the worktree "
                         "(default: .)")
        cmd.add_argument("services", nargs="*", metavar="SERVICE",
                         help="only these (default: every declared service)")
        if name != "down":
            cmd.add_argument("-v", "--verbose", action="store_true", help="every progress line")
    cmd = command("logs", "print a service's log (its output and devd's notes)")
    cmd.add_argument("service", help="a service name from devd.toml")
    cmd.add_argument("--path", default=".", help="a directory in the worktree (default: .)")
    cmd.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    cmd.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")


def cmd_up(client: Client, args: argparse.Namespace, restart: bool = False) -> int:
    params = {"path": cli._abspath(args.path), "restart": restart,
              "caller_path": os.environ.get("PATH", "")}
    if args.services:
        params["services"] = args.services
    result = client.call("up", params, cli._progress)
    if getattr(args, "json", False):
        cli._print_json(result)
        return cli.EXIT_OK
    rows = [[s["name"], s["state"], s.get("url") or "-", f"pid {s['pid']}" if s.get("pid")
             else "-"] for s in result["services"]]
    print(safe(_table(rows)))
    return cli.EXIT_OK


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    return cmd_up(client, args, restart=True)


def cmd_down(client: Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"path": cli._abspath(args.path)}
    if args.services:
        params["services"] = args.services
    result = client.call("down", params, cli._progress)
    if args.json:
        cli._print_json(result)
    elif not result["services"]:
        print("no services running")
    else:
        print(safe(_table([[s["name"], s["outcome"]] for s in result["services"]])))
    return cli.EXIT_OK


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    result = client.call("logs", {"path": cli._abspath(args.path), "service": args.service})
    path = Path(result["log"])
    end = logs.size(path)  # the tail ends here and -f goes on from here: no line lost
    for line in logs.tail(path, max(args.lines, 0), end):
        print(safe(line))
    if args.follow:
        sys.stdout.flush()
        for line in logs.follow(path, end):
            print(safe(line), flush=True)
    elif not path.exists():
        print(f"devd: {args.service} has no log yet ({path})", file=sys.stderr)
    return cli.EXIT_OK


def _table(rows: list[list[str]]) -> str:
    from devd.render_status import WIDTH, line, table

    widths = table(rows, WIDTH, ((0,),))
    return "\n".join(line(row, widths) for row in rows)
