"""`devd --help` as argparse prints it at 80 columns, for devd/quick.py to print without
argparse. Generated: after changing the CLI, `python -m devd.helptext` rewrites it
(tests/test_status_fast.py fails until then)."""

HELP = """\
usage: devd [-h] [--version] COMMAND ...

One isolated environment per git worktree: ports, caches, browser profile and
.env, kept by a user daemon.

positional arguments:
  COMMAND
    daemon    run the daemon in the foreground (logs to stderr)
    provision
              register a worktree and ensure all its resources
    release   tear down what devd made for a worktree
    gc        release worktrees that have been gone longer than the grace
    restore   load a worktree's last Postgres dump (or --dump FILE) back
    compose   bring the worktree's Compose project up or down
    status    show registered worktrees and their resources
    env       print a worktree's environment
    run       run a command with the worktree's environment
    watchers  inotify watch budget: limits, use, top consumers per worktree
    doctor    diagnose watcher pressure and print the exact fix
    ports     list leased ports and who holds them
    kill-port
              stop the process holding a port, if it is this worktree's
    browser   open Chromium/Chrome with the worktree's own profile
    init      write a commented starter devd.toml
    wait      block until a worktree's (background) provisioning ends
    stop      stop the daemon gracefully (SIGTERM); one a service manager runs
              is left to it
    service   install, remove or inspect devd's user service
    hook      install hooks; entry points called by git and Claude Code
    skill     install the devd skill for Claude Code (.claude/skills/devd)
    mcp       serve devd's tools to a coding agent over MCP (stdio)
    up        start the worktree's declared services and wait until ready
    down      stop the worktree's services
    restart   stop and start the worktree's services
    logs      print a service's log (its output and devd's notes)
    db        Postgres snapshots: take, list, drop; reset a worktree's data

options:
  -h, --help  show this help message and exit
  --version   show program's version number and exit
"""  # end of HELP


def _rewrite() -> None:
    import os
    from pathlib import Path

    os.environ["COLUMNS"] = "80"
    from devd.cli import build_parser

    help_text = build_parser().format_help()
    assert "\\" not in help_text and '"""' not in help_text, "quote it another way"
    here = Path(__file__)
    text = here.read_text()
    start = text.index('HELP = """\\\n') + len('HELP = """\\\n')
    end = text.index('"""  # end of HELP')
    here.write_text(text[:start] + help_text + text[end:])


if __name__ == "__main__":
    _rewrite()
