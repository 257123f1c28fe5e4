"""Which dev server a command runs, and the flags that make it serve on devd's port.

Many dev servers ignore PORT (Vite and everything built on it, Astro, Angular, Storybook,
webpack-dev-server, Django, Flask, uvicorn, Hugo): started plainly they land on their
default port, and a second worktree then collides or silently takes the next one. devd
reads the command (and for `npm|pnpm|yarn|bun run X`, package.json's script X), finds the
tool the last command of it runs, and appends that tool's flags: the port, no fallback to
another port where the tool has such a flag, and the loopback address. Tools that read
PORT (Next.js, Nuxt, Gatsby, Parcel, Remix's own server, Rails, gunicorn) get nothing.
A command that already names a port flag is left alone, and `port_arg` overrides it all.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

VITE = ("--port", "{port}", "--strictPort", "--host", "127.0.0.1")
HOST_PORT = ("--port", "{port}", "--host", "127.0.0.1")


@dataclass(frozen=True)
class Tool:
    """A dev server: how to recognise it, the flags it takes, the flags that name a port."""

    name: str
    words: tuple[str, ...]  # the command words that start it, after runners and env
    flags: tuple[str, ...]  # appended; {port} is the leased port
    port_flags: tuple[str, ...] = ("--port",)
    positional: bool = False  # the port is a positional argument (Django's addrport)


# First match wins: more specific words before the plain tool name.
TOOLS = (
    Tool("Vite (SvelteKit, Qwik, Vue, React, Solid on Vite)", ("vite",), VITE),
    Tool("React Router", ("react-router", "dev"), VITE),
    Tool("Remix (Vite)", ("remix", "vite:dev"), VITE),
    Tool("Astro", ("astro", "dev"), HOST_PORT),
    Tool("Angular", ("ng", "serve"), HOST_PORT),
    Tool("Angular", ("ng", "s"), HOST_PORT),
    Tool("Storybook", ("storybook", "dev"),
         ("--port", "{port}", "--exact-port", "--host", "127.0.0.1", "--ci"), ("--port", "-p")),
    Tool("webpack-dev-server", ("webpack", "serve"), HOST_PORT),
    Tool("webpack-dev-server", ("webpack-dev-server",), HOST_PORT),
    Tool("SolidStart (vinxi)", ("vinxi", "dev"), HOST_PORT),
    Tool("Django", ("manage.py", "runserver"), ("127.0.0.1:{port}",), positional=True),
    Tool("Django", ("django-admin", "runserver"), ("127.0.0.1:{port}",), positional=True),
    Tool("Flask", ("flask", "run"), HOST_PORT, ("--port", "-p")),
    Tool("uvicorn", ("uvicorn",), HOST_PORT),
    Tool("Python http.server", ("http.server",), ("{port}", "--bind", "127.0.0.1"),
         positional=True),
    Tool("Hugo", ("hugo", "server"), ("--port", "{port}", "--bind", "127.0.0.1"),
         ("--port", "-p")),
)
# Words that only run the next one: npx vite, uv run uvicorn, python -m flask run, ...
RUNNERS = {"npx", "bunx", "exec", "dlx", "x", "run", "uv", "poetry", "pipenv", "pdm",
           "python", "python3", "node", "-m", "env", "cross-env", "time", "nohup"}
SCRIPT_RUNNERS = {"npm", "pnpm", "yarn", "bun"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = ("<", ">")


@dataclass(frozen=True)
class Injection:
    """What devd appends to a command, and why (shown by `devd up -v` and the logs)."""

    command: str
    tool: str | None
    added: str


def inject(command: str, port: int, cwd: Path, port_arg: str | None = None) -> Injection:
    """The command with the port flags its tool needs appended (unchanged when it needs
    none, names its own port, or cannot be read)."""
    words = last_command(command)
    if words is None:
        return Injection(command, None, "")
    script, after_dash = script_of(words, cwd)
    target = shlex.split(script) if script is not None else words
    tool = detect(target) if script is None else detect(last_command(script) or [])
    if port_arg is not None:
        flags = port_arg.replace("{port}", str(port))
    elif tool is None or names_port(tool, target):
        return Injection(command, tool.name if tool else None, "")
    else:
        flags = " ".join(shlex.quote(f.replace("{port}", str(port))) for f in tool.flags)
    if not flags:
        return Injection(command, tool.name if tool else None, "")
    # npm passes arguments to a script only after `--`; pnpm, yarn and bun pass them as is
    # (pnpm would hand a `--` on to the script, and Vite would then ignore the flags).
    dash = "-- " if script is not None and words[0] == "npm" and not after_dash else ""
    return Injection(f"{command} {dash}{flags}", tool.name if tool else None, dash + flags)


def last_command(command: str) -> list[str] | None:
    """The words of the command's last simple command, or None when appending to the end
    would not reach it (a redirection, a trailing `&`, unbalanced quotes)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return None
    if not tokens or tokens[-1] in SEPARATORS:
        return None
    start = max((i + 1 for i, t in enumerate(tokens) if t in SEPARATORS), default=0)
    words = tokens[start:]
    if any(w.startswith(REDIRECTS) for w in words):
        return None
    return words


def script_of(words: list[str], cwd: Path) -> tuple[str | None, bool]:
    """For `npm run X` (and pnpm/yarn/bun), package.json's script X and whether the command
    already has a `--`; (None, False) for any other command."""
    if not words or words[0] not in SCRIPT_RUNNERS:
        return None, False
    rest = [w for w in words[1:] if not w.startswith("-")]
    if rest[:1] in (["run"], ["run-script"]):
        rest = rest[1:]
    if not rest or rest[0] in ("exec", "dlx", "x"):  # a package's binary, not a script
        return None, False
    scripts = _scripts(cwd)
    name = rest[0]
    if name not in scripts and words[0] == "npm" and name not in ("start", "test"):
        return None, False
    return scripts.get(name), "--" in words


def _scripts(cwd: Path) -> dict[str, str]:
    try:
        data = json.loads((cwd / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    scripts = data.get("scripts") if isinstance(data, dict) else None
    return {k: v for k, v in scripts.items() if isinstance(v, str)} \
        if isinstance(scripts, dict) else {}


def detect(words: list[str]) -> Tool | None:
    """The tool a simple command runs: its first word after env assignments and runners,
    with a tool's sub-command where it has one (`astro dev`, `ng serve`)."""
    rest = [w for w in words if "=" not in w.split("/")[0] or w.startswith("-")]
    while rest and (_base(rest[0]) in RUNNERS | SCRIPT_RUNNERS or rest[0].startswith("-")):
        rest = rest[1:]
    if not rest:
        return None
    head = [_base(rest[0]), *(w for w in rest[1:] if not w.startswith("-"))]
    for tool in TOOLS:
        if head[:len(tool.words)] == list(tool.words):
            return tool
    return None


def _base(word: str) -> str:
    """`./node_modules/.bin/vite` → vite; `./manage.py` → manage.py."""
    return word.rsplit("/", 1)[-1]


def names_port(tool: Tool, words: list[str]) -> bool:
    """Does the command already say which port? Then it is the user's choice."""
    if tool.positional:
        after = words[[_base(w) for w in words].index(tool.words[-1]) + 1:]
        return any(not w.startswith("-") for w in after)
    return any(w == f or w.startswith(f + "=") for w in words for f in tool.port_flags)
