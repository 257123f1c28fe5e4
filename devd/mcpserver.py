"""`devd mcp`: devd as MCP tools over stdio, so a coding agent can ask instead of guessing.

An agent that meets EADDRINUSE should learn who holds the port, not kill it; one that
needs a port for a server devd.toml does not name should lease one. Each tool is one
daemon request; a devd error comes back as an MCP tool error carrying devd's message and
hint (the session goes on). The official SDK (`mcp`) is imported by `serve` alone: the
CLI imports this module for `hook install --mcp`, and must stay light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devd.client import Client
from devd.errors import DevdError, OwnershipConflict, UsageError

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

Say = Callable[[str], None]
CONFIG = ".mcp.json"
ENTRY = {"type": "stdio", "command": "devd", "args": ["mcp"]}
INSTRUCTIONS = (
    "devd gives every git worktree its own ports, database, .env and caches. Before "
    "starting a server, read `env` for this worktree's PORT and URLs. On EADDRINUSE, call "
    "`port_owner`: never kill another worktree's or session's process; `kill_port` refuses "
    "and names the owner. Need a port devd.toml does not name? `lease_port`. Every tool "
    "takes an optional `path` (default: the directory this server runs in).")


class Tools:
    """One method per tool: the daemon request it makes and the shape the agent gets."""

    def __init__(self, client: Client, cwd: str) -> None:
        self.client = client
        self.cwd = cwd

    def where(self, path: str | None) -> str:
        """`path` made absolute against the server's directory (an agent's own worktree)."""
        raw = os.path.expanduser(path) if path else self.cwd
        return os.path.normpath(os.path.join(self.cwd, raw))

    def status(self, path: str | None = None) -> dict[str, Any]:
        reply = self.client.call("status", {"path": self.where(path)})
        return dict(reply["worktrees"][0])

    def env(self, path: str | None = None) -> dict[str, Any]:
        wt = self.status(path)
        reply = self.client.call("env", {"path": wt["path"]})
        urls = {name: f"http://localhost:{port}/" for name, port in wt["ports"].items()}
        return {"worktree": wt["path"], "env": reply["env"], "urls": urls,
                "warnings": reply.get("warnings", [])}

    def port_owner(self, port: int) -> dict[str, Any]:
        reply: dict[str, Any] = self.client.call("port_owner", {"port": port})
        return reply | {"summary": owner_summary(reply)}

    def lease_port(self, name: str, path: str | None = None) -> dict[str, Any]:
        reply: dict[str, Any] = self.client.call("lease_port",
                                                 {"path": self.where(path), "name": name})
        return reply

    def kill_port(self, port: int, path: str | None = None) -> dict[str, Any]:
        reply: dict[str, Any] = self.client.call("kill_port",
                                                 {"port": port, "path": self.where(path)})
        return reply


def owner_summary(reply: dict[str, Any]) -> str:
    """One sentence an agent can act on."""
    port = reply["port"]
    lease = (f"leased by {reply['leased_by']} ({reply['lease_name']})" if reply["leased_by"]
             else "not leased by devd")
    if not reply["listening"]:
        return f"port {port} is {lease}; nothing listens on it"
    where = (f"worktree {reply['owner_worktree']}" + (" (gone)" if reply["owner_state"] == "gone"
                                                        else "")
             if reply["owner_worktree"] else "no worktree devd knows")
    holder = f"pid {reply['pid']} `{reply['command']}`" if reply["pid"] else "another user"
    return f"port {port} is {lease}; {holder} of {where} listens on it"


def error_text(exc: DevdError) -> str:
    """devd's message and hint, as the CLI prints them."""
    return f"devd: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else "") \
        + f"\n(code {exc.code})"


# Each tool: what it does, and whether it only reads (clients may run those unasked).
DESCRIPTIONS = {
    "status": ("This worktree's devd state: ports, resources, deps, database, errors.", True),
    "env": ("The worktree's environment (PORT, PORT_<NAME>, DATABASE_URL, ...) and its "
            "URLs.", True),
    "port_owner": ("Who holds a TCP port: the worktree that leased it and the process that "
                   "listens on it (pid, command, its worktree).", True),
    "lease_port": ("Lease a port for NAME (e.g. 'storybook') in this worktree: the same port "
                   "on every call, kept until the worktree is released.", False),
    "kill_port": ("Stop the process listening on PORT, only if it belongs to this worktree; "
                  "otherwise refused, naming the owner.", False),
}


def build(client: Client, cwd: str) -> MCPServer:
    """The MCP server with one tool per Tools method; errors become tool errors."""
    import functools

    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations

    from devd import __version__

    tools = Tools(client, cwd)
    server: MCPServer = MCPServer("devd", version=__version__, instructions=INSTRUCTIONS)

    def as_tool(method: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(method)
        def tool(*args: Any, **kwargs: Any) -> dict[str, Any]:
            try:
                return method(*args, **kwargs)
            except DevdError as exc:
                raise ToolError(error_text(exc)) from None
            except OSError as exc:
                raise ToolError(f"devd: {exc}") from None
        return tool

    for name, (description, read_only) in DESCRIPTIONS.items():
        hints = ToolAnnotations(read_only_hint=read_only, idempotent_hint=name != "kill_port",
                                destructive_hint=name == "kill_port")
        server.add_tool(as_tool(getattr(tools, name)), name=name, description=description,
                        annotations=hints)
    return server


def serve(client: Client) -> int:
    """`devd mcp`: serve on stdin/stdout until the client closes it."""
    build(client, os.getcwd()).run("stdio")
    return 0


# -- registration (`devd hook install --mcp`) ------------------------------------------


def register(path: Path, say: Say) -> Path:
    """Add devd to the repo's .mcp.json (Claude Code's project MCP servers)."""
    from devd.hooks import _json_object, _write_keeping_mode, toplevel

    target = toplevel(path) / CONFIG
    config = _json_object(target)
    servers = config.setdefault("mcpServers", {})
    if not isinstance(servers, dict):
        raise UsageError(f"{target}: \"mcpServers\" is not an object", "fix the file, then retry")
    current = servers.get("devd")
    if current == ENTRY:
        say(f"{target} already runs devd's MCP server")
        return target
    if current is not None:
        raise OwnershipConflict(f"{target} already has an MCP server named devd "
                                f"({json.dumps(current)[:200]})",
                                f"remove it, or make it {json.dumps(ENTRY)}")
    servers["devd"] = ENTRY
    _write_keeping_mode(target, json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                        target.stat().st_mode & 0o777 if target.exists() else 0o644)
    say(f"added the devd MCP server to {target} (`devd mcp`; other servers unchanged)")
    return target
