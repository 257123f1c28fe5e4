"""`devd mcp` through the SDK's own client over stdio, against a real daemon: every tool,
and what an agent meets when things go wrong (a foreign port owner, a bad path, a bad
name, the daemon gone), always as a tool error with devd's message, never a dead session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Devd, Repo, wait_for

pytest.importorskip("mcp")

from mcp import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

TOOLS = {"status", "env", "port_owner", "lease_port", "kill_port"}


def _listen(cwd: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "import http.server, sys; "
                             "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), "
                             "http.server.BaseHTTPRequestHandler).serve_forever()", str(port)],
                            cwd=cwd)
    import socket

    def up() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0
    wait_for(up, what=f"listener on {port}")
    return proc


class Session:
    """Tool calls on one MCP session, answers as (is_error, structured or text)."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call(self, tool: str, /, **arguments: Any) -> tuple[bool, Any]:
        result = await self.session.call_tool(tool, arguments)
        text = "\n".join(getattr(block, "text", "") for block in result.content)
        return result.is_error, (text if result.is_error
                                 else result.structured_content or json.loads(text))


async def _scenario(devd: Devd, repo: Repo, feat: Path, other: Path) -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "devd", "mcp"],
                                   env={**devd.env, "DEVD_NO_AUTOSTART": "1"}, cwd=str(feat))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        listed = await session.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        read_only = {t.name for t in listed.tools if t.annotations and t.annotations.read_only_hint}
        assert read_only == {"status", "env", "port_owner"}
        s = Session(session)

        failed, wt = await s.call("status")
        assert not failed and wt["path"] == str(feat) and wt["state"] == "ready"
        failed, env = await s.call("env")
        assert not failed and env["env"]["PORT"] == str(wt["ports"]["web"])
        assert env["urls"]["web"] == f"http://localhost:{wt['ports']['web']}/"

        failed, lease = await s.call("lease_port", name="storybook")
        assert not failed and lease["port"] not in wt["ports"].values()
        assert (await s.call("lease_port", name="storybook"))[1]["port"] == lease["port"]
        devd.run("provision", str(feat))  # provisioning keeps an ad hoc lease
        assert (await s.call("lease_port", name="storybook"))[1]["port"] == lease["port"]
        assert "PORT_STORYBOOK" not in (await s.call("env"))[1]["env"]
        failed, text = await s.call("lease_port", name="Bad Name")
        assert failed and "not allowed" in text and "hint:" in text

        theirs = devd.worktree(other)["ports"]["web"]
        foreign, own = _listen(other, theirs), _listen(feat, lease["port"])
        try:
            failed, owner = await s.call("port_owner", port=theirs)
            assert not failed and owner["owner_worktree"] == str(other)
            assert owner["leased_by"] == str(other) and str(other) in owner["summary"]
            failed, text = await s.call("kill_port", port=theirs)
            assert failed and str(other) in text and "code not_owner" in text
            assert foreign.poll() is None  # refused: still running
            failed, killed = await s.call("kill_port", port=lease["port"])
            assert not failed and killed["pid"] == own.pid
            own.wait(timeout=15)
        finally:
            for proc in (foreign, own):
                proc.kill()
                proc.wait()

        failed, text = await s.call("status", path=str(repo.main.parent / "nowhere"))
        assert failed and "devd: " in text and "does not exist" in text
        failed, text = await s.call("port_owner", port=70000)
        assert failed and "out of range" in text

        devd.stop()  # the daemon goes away; the session must not
        failed, text = await s.call("status")
        assert failed and "no devd daemon answers" in text
        assert {tool.name for tool in (await session.list_tools()).tools} == TOOLS


def test_mcp_tools_over_stdio(devd: Devd, repo: Repo) -> None:
    feat, other = repo.worktree("shop-feat", "feat"), repo.worktree("shop-other", "other")
    for path in (feat, other):
        devd.run("provision", str(path))
    anyio.run(_scenario, devd, repo, feat, other)


def test_hook_install_mcp_registers_once_and_keeps_other_servers(devd_home: Devd,
                                                                 repo: Repo) -> None:
    config = repo.main / ".mcp.json"
    config.write_text(json.dumps({"mcpServers": {"db": {"command": "x"}}}))
    first = devd_home.run("hook", "install", "--mcp", str(repo.main))
    assert "added the devd MCP server" in first.stdout
    again = devd_home.run("hook", "install", "--mcp", str(repo.main))
    assert "already runs" in again.stdout
    servers = json.loads(config.read_text())["mcpServers"]
    assert servers == {"db": {"command": "x"},
                       "devd": {"type": "stdio", "command": "devd", "args": ["mcp"]}}
    servers["devd"] = {"command": "something-else"}
    config.write_text(json.dumps({"mcpServers": servers}))
    clash = devd_home.run("hook", "install", "--mcp", str(repo.main), check=False)
    assert clash.returncode == 1 and "already has an MCP server named devd" in clash.stderr
