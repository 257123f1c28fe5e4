"""The `devd` command: argparse → client → render. Maps errors to exit codes.

Imports stay light (no pydantic, docker or psycopg): `devd status` runs on every prompt.
Exit codes: 0 ok, 1 error reply, 2 usage, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from devd import __version__, dotenv
from devd.client import Client, caller_overrides, timeout_from
from devd.errors import DaemonUnreachable, DevdError, UsageError, storage_error
from devd.paths import Paths, current_dir, faithful
from devd.progressbar import ProgressPrinter
from devd.render import render_worktree, safe

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
PROGRESSING = ("provision", "release", "gc", "restore", "kill-port", "compose")  # they take -v
SERVICE_COMMANDS = ("up", "down", "restart", "logs")  # devd/services/commands.py
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
            "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
            "/Applications/Chromium.app/Contents/MacOS/Chromium")


class _Discard:
    """Stands in for the subparsers a call does not use: building all of them costs more
    than the rest of `devd status` put together."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or with `only`, just that command's subparser."""
    parser = argparse.ArgumentParser(
        prog="devd", description="One isolated environment per git worktree: ports, caches, "
        "browser profile and .env, kept by a user daemon.")
    parser.add_argument("--version", action="version", version=f"devd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, json_flag: bool = False) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Discard()  # type: ignore[return-value]
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if json_flag:
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
        if name in PROGRESSING:
            cmd.add_argument("-v", "--verbose", action="store_true", help="every progress "
                             "line (default on a terminal: one line redrawn in place)")
        return cmd

    command("daemon", "run the daemon in the foreground (logs to stderr)")
    cmd = command("provision", "register a worktree and ensure all its resources", True)
    _path(cmd)
    cmd.add_argument("--background", action="store_true", help="return at once; work goes on")
    cmd.add_argument("--wait", action="store_true", help="with --background: return when the "
                     "background provision ends (exit 1 if it failed); else a no-op")
    cmd.add_argument("--fix-deps", action="store_true",
                     help="replace a symlinked node_modules/.venv with the worktree's own tree")
    cmd = command("release", "tear down what devd made for a worktree", True)
    _path(cmd)
    cmd.add_argument("--yes", action="store_true", help="also release data-bearing resources")
    cmd.add_argument("--no-backup", action="store_true", help="drop databases without a dump")
    cmd.add_argument("--force", action="store_true", help="end sessions holding the database")
    cmd = command("gc", "release worktrees that have been gone longer than the grace", True)
    cmd.add_argument("--dry-run", action="store_true", help="only list what would be released")
    cmd.add_argument("--grace", help="how long a worktree must be gone, e.g. 30m, 2h, 0 for "
                     "now (default: 24h, or DEVD_GC_GRACE)")
    cmd.add_argument("--no-backup", action="store_true", help="drop databases without a dump")
    cmd = command("restore", "load a worktree's last Postgres dump (or --dump FILE) back", True)
    _path(cmd)
    cmd.add_argument("--dump", help="a dump file (default: the worktree's newest)")
    cmd = command("compose", "bring the worktree's Compose project up or down", True)
    cmd.add_argument("action", choices=("up", "down"))
    _path(cmd, option=True)
    cmd = command("status", "show registered worktrees and their resources", True)
    cmd.add_argument("path", nargs="?", help="one worktree, in full (default: all, a row each)")
    cmd.add_argument("-v", "--verbose", action="store_true", help="every worktree in full")
    cmd.add_argument("--fresh", action="store_true", help="run every check now (default: "
                     "the daemon's last pass, a few seconds old at most; PATH is always fresh)")
    cmd = command("env", "print a worktree's environment")
    _path(cmd)
    cmd.add_argument("--format", choices=("sh", "dotenv", "json"), default="sh",
                     help="sh: export lines to eval; dotenv: KEY=value lines; json: an object "
                     "(default: sh)")
    cmd = command("run", "run a command with the worktree's environment")
    _path(cmd, option=True)
    cmd.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                     help="the command and its arguments, after --")
    cmd = command("watchers", "inotify watch budget: limits, use, top consumers per worktree",
                  True)
    cmd.add_argument("--restart", action="store_true", help="start failed devd-started "
                     "watchers again in the background, once their worktree has room")
    cmd.add_argument("--path", help="with --restart: only this worktree's")
    cmd.add_argument("--force", action="store_true", help="with --restart: even without room")
    cmd = command("doctor", "diagnose watcher pressure and print the exact fix", True)
    cmd.add_argument("--fix", action="store_true",
                     help="apply the sysctl fix (only when run as root)")
    command("ports", "list leased ports and who holds them", True)
    cmd = command("kill-port", "stop the process holding a port, if it is this worktree's", True)
    cmd.add_argument("port", type=port_number, help="a TCP port, 1-65535")
    _path(cmd, option=True)
    cmd = command("browser", "open Chromium/Chrome with the worktree's own profile")
    cmd.add_argument("url", nargs="?",
                     help="the page to open (default: http://localhost:$PORT/ of the worktree)")
    _path(cmd, option=True)
    cmd = command("init", "write a commented starter devd.toml")
    cmd.add_argument("path", nargs="?", default=".",
                     help="the directory to write devd.toml in (default: .)")
    cmd = command("wait", "block until a worktree's (background) provisioning ends", True)
    _path(cmd)
    cmd.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    command("stop", "stop the daemon gracefully (SIGTERM); one a service manager runs is "
            "left to it")
    cmd = command("service", "install, remove or inspect devd's user service")
    cmd.add_argument("action", choices=("install", "uninstall", "status"),
                     help="install and start it, stop and remove it, or show its state")
    _hook_parser(command("hook", "install hooks; entry points called by git and Claude Code"))
    cmd = command("skill", "install the devd skill for Claude Code (.claude/skills/devd)")
    cmd.add_argument("action", choices=("install",), help="write .claude/skills/devd/SKILL.md")
    _path(cmd)
    command("mcp", "serve devd's tools to a coding agent over MCP (stdio)")
    if only is None or only in SERVICE_COMMANDS:
        from devd.services import commands as service_commands

        service_commands.add_parsers(command)
    cmd = command("db", "Postgres snapshots: take, list, drop; reset a worktree's data")
    if not isinstance(cmd, _Discard):
        from devd import cli_db

        cli_db.add_parser(cmd, _path)
    return parser


def _path(cmd: argparse.ArgumentParser, option: bool = False) -> None:
    """The worktree argument most commands take: positional, or `--path` where it is not."""
    help_text = "a directory in the worktree (default: ., the current directory)"
    if option:
        cmd.add_argument("--path", default=".", help=help_text)
    else:
        cmd.add_argument("path", nargs="?", default=".", help=help_text)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1-65535 (99999 is a typo, not a port nothing holds)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1-65535)")
    return port


def _hook_parser(cmd: argparse.ArgumentParser) -> None:
    sub = cmd.add_subparsers(dest="hook", required=True, metavar="HOOK")
    install = sub.add_parser("install", help="add devd to a repo's git and/or Claude Code hooks")
    install.add_argument("--git", action="store_true", help="post-checkout hook (all worktrees)")
    install.add_argument("--claude", action="store_true", help=".claude/settings.json hooks")
    install.add_argument("--mcp", action="store_true", help="register `devd mcp` in .mcp.json")
    install.add_argument("--global-hooks-path", action="store_true", help="with --git: install "
                         "even into a core.hooksPath from the global or system git config "
                         "(every repository on the machine)")
    _path(install)
    checkout = sub.add_parser("post-checkout", help="git post-checkout, for hook managers "
                              "(lefthook, pre-commit): provision a new worktree, detached")
    checkout.add_argument("args", nargs="*", help="git's three arguments (pre-commit: none)")
    sub.add_parser("claude-create", help="Claude Code WorktreeCreate (JSON on stdin)")
    sub.add_parser("claude-remove", help="Claude Code WorktreeRemove (JSON on stdin)")
    sub.add_parser("claude-env", help="Claude Code SessionStart: the worktree's env into "
                   "$CLAUDE_ENV_FILE (JSON on stdin)")


def main(argv: list[str] | None = None, sent: int | None = None) -> int:
    """`sent`: devd/quick.py already sent argv's request on this connection (`up`)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a newcomer typing `devd` wants the command list, not an error
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    known = argv[0] in COMMANDS or argv[0] in SERVICE_COMMANDS or argv[0] == "daemon"
    only = argv[0] if known else None
    args = build_parser(only).parse_args(argv)
    _PROGRESS.verbose = getattr(args, "verbose", False)
    paths = Paths.resolve()
    if args.command == "daemon":
        from devd.daemon import main as daemon_main

        return daemon_main(paths)
    try:
        client = Client(paths, autostart=os.environ.get("DEVD_NO_AUTOSTART", "") in ("", "0"),
                        on_autostart=_starting, timeout=timeout_from(os.environ))
        if sent is not None:
            client.adopt(sent)
        return _command(args.command)(client, args)
    except DaemonUnreachable as exc:
        return _fail(exc, EXIT_UNREACHABLE, args)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE, args)
    except DevdError as exc:
        return _fail(exc, EXIT_ERROR, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `devd status | head`: the reader left. Silence the flush at exit, as shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a full or read-only state dir (say, starting the daemon's log)
        if (storage := storage_error(exc)) is None:
            raise
        return _fail(storage, EXIT_ERROR, args)


def lost_daemon(argv: list[str], timeout: float, dropped: OSError | None) -> int:
    """What `argv` (a command of devd/quick.py's) says when the daemon, once it had the
    request, said nothing for `timeout` seconds or (`dropped`) closed the connection: the
    fast path has waited already and must neither wait again nor ask twice."""
    args = build_parser(argv[0]).parse_args(argv)
    client = Client(Paths.resolve(), autostart=False, timeout=timeout)
    return _fail(client.dropped(dropped) if dropped else client.silent(), EXIT_UNREACHABLE,
                 args)


def _command(name: str) -> Any:
    if name in SERVICE_COMMANDS:
        from devd.services import commands as service_commands

        return getattr(service_commands, f"cmd_{name}")
    return COMMANDS[name]


def _starting(paths: Paths) -> None:
    print(f"devd: no daemon running; starting one (log: {paths.daemon_log})", file=sys.stderr,
          flush=True)


def _fail(exc: DevdError, code: int, args: argparse.Namespace) -> int:
    if getattr(args, "json", False):  # scripts get the error where they read the result
        print(json.dumps({"ok": False, "error": exc.to_dict()}, ensure_ascii=False))
    print(f"devd: error: {safe(exc.message)}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {safe(exc.hint)}", file=sys.stderr)
    return code


def _progress(event: dict[str, Any]) -> None:
    _PROGRESS(event)


_PROGRESS = ProgressPrinter(lambda text: safe(text))
atexit.register(_PROGRESS.close)


def _abspath(path: str) -> str:
    # Refused here when JSON cannot carry it exactly.
    return faithful(os.path.abspath(path if os.path.isabs(path)
                                    else os.path.join(current_dir(), path)))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


# -- commands ------------------------------------------------------------------


def cmd_provision(client: Client, args: argparse.Namespace) -> int:
    result = client.call("provision", {"path": _abspath(args.path),
                                       "background": args.background,
                                       "fix_deps": args.fix_deps} | caller_overrides(),
                         _progress)
    if args.background and args.wait:
        from devd import hooks

        # The work stays in the daemon: a hook killed while waiting leaves it running.
        result = hooks.wait_until(client, Path(result["path"]), 600.0)  # as `devd wait`
    if args.json:
        _print_json(result)
    else:
        print(render_worktree(result))
    return EXIT_ERROR if result["state"] == "failed" else EXIT_OK


def cmd_release(client: Client, args: argparse.Namespace) -> int:
    params = {"path": _abspath(args.path), "yes": args.yes}
    params |= {k: True for k in ("no_backup", "force") if getattr(args, k)}
    result = client.call("release", params, _progress)
    print(json.dumps(result) if args.json else f"released {safe(result['path'])}")
    if not args.json:
        _print_outputs(result)
    return EXIT_OK


def _print_outputs(result: dict[str, Any]) -> None:
    """What a release kept and dropped besides the worktree's own resources."""
    for dump in result.get("dumps", []):
        print(safe(f"  dump kept: {dump}"))
    for folder in result.get("volume_backups", []):
        print(safe(f"  volume backup kept: {folder}"))
    for name in result.get("test_databases_dropped", []):
        print(safe(f"  test database dropped (no dump: test runners recreate it): {name}"))


def cmd_restore(client: Client, args: argparse.Namespace) -> int:
    params = {"path": _abspath(args.path)} | ({"dump": _abspath(args.dump)} if args.dump else {})
    result = client.call("restore", params, _progress)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    if "restored" in result:
        print(f"restored {safe(result['restored'])} "
              f"(the data it replaced: {safe(result.get('before', '?'))})")
    for volume in result.get("volumes", []):
        print(safe(f"restored volume {volume} from {result['volume_backup']}"))
    return EXIT_OK


def cmd_compose(client: Client, args: argparse.Namespace) -> int:
    result = client.call("compose", {"path": _abspath(args.path), "action": args.action},
                         _progress)
    print(json.dumps(result) if args.json else
          safe(f"compose {result['action']}: project {result['project']}"))
    return EXIT_OK


def cmd_gc(client: Client, args: argparse.Namespace) -> int:
    from devd.render_status import orphan_line, span

    params = {"grace": args.grace, "dry_run": args.dry_run}
    result = client.call("gc", params | ({"no_backup": True} if args.no_backup else {}),
                         _progress)
    if args.json:
        _print_json(result)
        return EXIT_OK
    verb = "would release" if result["dry_run"] else "released"
    for entry in result["worktrees"]:
        problem, skipped = entry.get("error"), entry.get("skipped")
        line = f"failed to release {entry['path']}: {problem['message']}" if problem \
            else f"skipped {skipped['message']}" if skipped else f"{verb} {entry['path']}"
        print(safe(line))
        if problem and problem.get("hint"):
            print(safe(f"  hint: {problem['hint']}"))
        _print_outputs(entry)
    for removed in result.get("snapshot_leftovers_removed", []):
        print(safe(f"removed {removed}: left by a daemon killed mid-snapshot"))
    for orphan in result.get("orphans", []):
        print(safe(orphan_line(orphan)))
    for entry in result.get("not_due", []):
        print(safe(f"{entry['path']}: gone {span(entry['gone_seconds'])}, due in "
                   f"{span(entry['due_in_seconds'])}; `devd gc --grace 0` releases it now"))
    if not result["worktrees"]:
        print("nothing to collect" + (" yet" if result.get("not_due") else ""))
    return EXIT_ERROR if any("error" in e for e in result["worktrees"]) else EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    from devd import render_status

    params: dict[str, Any] = {"path": _abspath(args.path)} if args.path else {}
    result = client.call("status", params | ({"fresh": True} if args.fresh else {}))
    if args.json:
        _print_json(result)
    elif args.path or args.verbose:
        print(render_status.summary(result))
        if (board := render_status.dashboard(result)) and not args.path:
            print(board)
        for wt in result["worktrees"]:
            print()
            print(render_worktree(wt))
    else:
        paint = render_status.Painter.for_stream(sys.stdout, dict(os.environ))
        print(render_status.render_status(result, _cwd(), paint, _width()))
    return EXIT_OK


def _cwd() -> str | None:
    try:
        return current_dir()
    except (OSError, UsageError):  # the caller's directory was deleted: no mark
        return None


def _width() -> int:
    """The terminal's columns; the default width when output goes elsewhere."""
    from devd.render_status import WIDTH

    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() \
            else WIDTH
    except (OSError, ValueError):
        return WIDTH


def cmd_env(client: Client, args: argparse.Namespace) -> int:
    env = _env_reply(client, _abspath(args.path))["env"]
    if args.format == "json":
        _print_json(env)
    elif args.format == "dotenv":
        print("\n".join(dotenv.render(env)))
    else:
        import shlex

        print("\n".join(f"export {key}={shlex.quote(value)}" for key, value in env.items()))
    return EXIT_OK


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError("no command given", "usage: devd run [--path P] -- CMD [ARG...]")
    path = _abspath(args.path)
    result = _env_reply(client, path)
    from devd.watchers.run import run

    # Preflight warning on the watch budget, then exec with the output scanned for breaks.
    return run(client, path, argv, with_caller(result["env"]),
               run_dir(Path(result["worktree"])))


def run_dir(root: Path) -> str:
    """Where `devd run` runs: the caller's directory when it is inside the worktree (not in
    a checkout nested in it), else the worktree's root: never another checkout's code."""
    from devd.owners import inside

    here = _cwd()
    return here if here and inside(Path(here), root) else str(root)


def with_caller(env: dict[str, str]) -> dict[str, str]:
    """The caller's environment under devd's. With a database of devd's, the caller's other
    PG* go: PGHOSTADDR, PGSERVICE or PGPASSFILE from the main worktree's shell would lead
    libpq to another server whatever DATABASE_URL says."""
    drop = "DATABASE_URL" in env
    kept = {k: v for k, v in os.environ.items() if not (drop and k.startswith("PG"))}
    return kept | env


def _env_reply(client: Client, path: str) -> dict[str, Any]:
    """The `env` reply; what is wrong with the variables (a database that is not ready, so
    they point nowhere) goes to stderr, one line each, where it never mixes with output."""
    reply: dict[str, Any] = client.call("env", {"path": path})
    for warning in reply.get("warnings", []):
        print(safe(f"devd: warning: {warning}"), file=sys.stderr, flush=True)
    return reply


def cmd_watchers(client: Client, args: argparse.Namespace) -> int:
    from devd.watchers import render

    if args.restart:
        from devd.watchers.restart import restart

        plan = restart(client, _abspath(args.path) if args.path else None, args.force)
        print(json.dumps(plan, indent=2) if args.json else render.restarted(plan))
        return EXIT_ERROR if plan["skipped"] else EXIT_OK  # a refusal is not a success
    result = client.call("watchers")
    print(json.dumps(result, indent=2) if args.json else render.watchers(result))
    return EXIT_OK


def cmd_doctor(client: Client, args: argparse.Namespace) -> int:
    from devd.watchers import doctor, render

    result = doctor.localise(client.call("doctor"))
    if args.fix:
        result["applied"] = doctor.apply_fix(result)
    print(json.dumps(result, indent=2) if args.json else render.doctor(result))
    return EXIT_OK


def cmd_ports(client: Client, args: argparse.Namespace) -> int:
    from devd.render_status import render_ports

    rows = client.call("ports")
    if args.json:
        _print_json(rows)
    else:
        print(render_ports(rows, _width()))
    return EXIT_OK


def cmd_kill_port(client: Client, args: argparse.Namespace) -> int:
    result = client.call("kill_port", {"port": args.port, "path": _abspath(args.path)},
                         _progress)
    if args.json:
        _print_json(result)
    else:
        print(safe(f"port {result['port']}: pid {result['pid']} `{result['command']}` "
                   f"{result['outcome']}"))
    return EXIT_OK


def cmd_browser(client: Client, args: argparse.Namespace) -> int:
    import subprocess

    env = client.call("env", {"path": _abspath(args.path)})["env"]
    browser = find_browser()
    url = args.url or (f"http://localhost:{env['PORT']}/" if "PORT" in env else "about:blank")
    command = [*browser, f"--user-data-dir={env['DEVD_BROWSER_PROFILE']}", "--no-first-run",
               "--no-default-browser-check", url]
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise DevdError(f"cannot start the browser {browser[0]}: {exc.strerror}",
                        "install Chromium or Chrome, or set DEVD_BROWSER to a browser command "
                        "that accepts --user-data-dir", code="no_browser") from None
    _check_started(proc, browser[0])
    print(safe(f"opened {url} in {browser[0]} with profile {env['DEVD_BROWSER_PROFILE']}"))
    return EXIT_OK


def _check_started(proc: Any, name: str, grace: float = 0.5) -> None:
    """Raise if the browser failed at once. Exit 0 is a success: Chromium hands the URL
    to the instance already running on that profile and exits."""
    import subprocess

    try:
        code = proc.wait(grace)
    except subprocess.TimeoutExpired:  # still running: it opened
        return
    if code != 0:
        raise DevdError(f"the browser {name} exited at once (status {code})",
                        "run it by hand to see why, or set DEVD_BROWSER", code="browser_failed")


def find_browser() -> list[str]:
    """DEVD_BROWSER (a command line) wins; else the first Chromium or Chrome found."""
    import shlex
    import shutil

    configured = os.environ.get("DEVD_BROWSER")
    if configured:
        return shlex.split(configured)
    for candidate in BROWSERS:
        found = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
        if found:
            return [found]
    raise DevdError("no Chromium or Chrome found", "install one, or set DEVD_BROWSER to a "
                    "browser command that accepts --user-data-dir", code="no_browser")


def cmd_init(client: Client, args: argparse.Namespace) -> int:
    from importlib.resources import files
    target = Path(args.path) / "devd.toml"
    if target.exists():
        raise UsageError(f"{target} already exists", "edit it, or remove it to start over")
    try:
        target.write_text(files("devd.templates").joinpath("devd.toml").read_text())
    except OSError as exc:
        raise DevdError(f"cannot write {target}: {exc.strerror}",
                        "give an existing directory you can write to") from None
    print(f"wrote {target}")
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    from devd import hooks

    path = hooks.toplevel(Path(_abspath(args.path)))
    wt = hooks.wait_until(client, path, args.timeout)
    if args.json:
        _print_json(wt)
    else:
        print(render_worktree(wt))
    return EXIT_OK if wt["state"] == "ready" else EXIT_ERROR


def cmd_service(client: Client, args: argparse.Namespace) -> int:
    from devd import service

    action = {"install": service.install, "uninstall": service.uninstall,
              "status": service.status}[args.action]
    return action(dict(os.environ), lambda line: print(safe(line)))


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    from devd import service

    return service.stop_daemon(client.paths, lambda line: print(safe(line)))


def cmd_hook(client: Client, args: argparse.Namespace) -> int:
    from devd import hooks

    if args.hook.startswith("claude-"):
        return _claude_hook(client, args.hook)
    if args.hook == "post-checkout":  # never fails git: a problem is one line on stderr
        try:
            hooks.post_checkout(args.args, dict(os.environ), Path(current_dir()))
        except (OSError, DevdError) as exc:
            print(safe(f"devd: post-checkout: {exc}"), file=sys.stderr)
        return EXIT_OK
    from devd import mcpserver

    if not (args.git or args.claude or args.mcp):
        raise UsageError("say which hooks to install", "devd hook install --git --claude --mcp")
    path = Path(_abspath(args.path))
    git_hook = functools.partial(hooks.install_git_hook, global_hooks_path=args.global_hooks_path)
    for wanted, install in ((args.git, git_hook), (args.claude, hooks.install_claude_hooks),
                            (args.mcp, mcpserver.register)):
        if wanted:
            install(path, lambda line: print(safe(line)))
    return EXIT_OK


def _claude_hook(client: Client, hook: str) -> int:
    """A Claude Code hook: stdout is Claude's (a path, or context for the model), talk goes
    to stderr, and whatever goes wrong is one line there and an exit status, never a
    traceback (Claude shows a failed hook's stderr to the user)."""
    from devd import claude

    def say(line: str) -> None:
        print(safe(line), file=sys.stderr, flush=True)

    try:
        if hook == "claude-create":
            print(claude.claude_create(sys.stdin, dict(os.environ), client, say), flush=True)
        elif hook == "claude-remove":
            return claude.claude_remove(sys.stdin, dict(os.environ), client, say)
        elif note := claude.claude_env(sys.stdin, dict(os.environ), client, say):
            print(note, flush=True)
    except DevdError as exc:
        say(f"devd: error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""))
        return EXIT_USAGE if isinstance(exc, UsageError) else \
            EXIT_UNREACHABLE if isinstance(exc, DaemonUnreachable) else EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a hook must never show a traceback
        say(f"devd: error: {hook}: {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_skill(client: Client, args: argparse.Namespace) -> int:
    from devd.skill import install_skill

    install_skill(Path(_abspath(args.path)), lambda line: print(safe(line)))
    return EXIT_OK


def cmd_mcp(client: Client, args: argparse.Namespace) -> int:
    from devd import mcpserver

    return mcpserver.serve(client)
def cmd_db(client: Client, args: argparse.Namespace) -> int:
    from devd import cli_db

    return cli_db.run(client, args, _abspath, _progress)


COMMANDS = {
    "provision": cmd_provision, "release": cmd_release, "gc": cmd_gc, "status": cmd_status,
    "restore": cmd_restore, "compose": cmd_compose,
    "env": cmd_env, "run": cmd_run, "ports": cmd_ports, "kill-port": cmd_kill_port,
    "browser": cmd_browser, "init": cmd_init, "wait": cmd_wait, "service": cmd_service,
    "hook": cmd_hook, "stop": cmd_stop, "watchers": cmd_watchers, "doctor": cmd_doctor,
    "skill": cmd_skill, "mcp": cmd_mcp, "db": cmd_db,
}
