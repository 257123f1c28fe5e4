"""The real Claude Code CLI, driven offline: an npm install cached per version, and a local
stand-in for the Messages API that answers with scripted tool calls.

Claude Code fires WorktreeCreate (for `--worktree`) before any model call; everything after
(EnterWorktree, ExitWorktree, subagents with `isolation: "worktree"`, the Bash tool) needs a
model turn, which the stand-in supplies: each request that offers tools takes the next step
of the script (a list of content blocks); requests without tools (titles, summaries) and
requests past the script's end get a plain "done". Every request is kept, so a test can read
the tool results Claude sent back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import machine_lock

# Pinned: the native behaviour the tests compare against is this version's.
VERSION = "2.1.197"
REQUIRED = os.environ.get("DEVD_REQUIRE_INTEGRATION") == "1"


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (DEVD_REQUIRE_INTEGRATION=1: the Claude Code tests must run)")
    pytest.skip(reason)


def install_cli() -> Path:
    """`claude` from the npm registry, installed once per machine and version (about 25 s,
    235 MB) under the temp dir; a half-done install is redone."""
    if not shutil.which("npm"):
        unavailable("npm is not installed")
    where = Path(tempfile.gettempdir()) / f"devd-test-claude-code-{VERSION}"
    binary = where / "node_modules" / ".bin" / "claude"
    with machine_lock(where):
        if (where / "done").exists() and binary.exists():
            return binary
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                               f"@anthropic-ai/claude-code@{VERSION}"], cwd=where,
                              capture_output=True, text=True, timeout=600)
        if done.returncode or not binary.exists():
            unavailable(f"npm install @anthropic-ai/claude-code failed: {done.stderr[-300:]}")
        (where / "done").write_text(VERSION)
    return binary


def tool_use(name: str, tool_input: dict[str, Any], ident: str | None = None
             ) -> dict[str, Any]:
    return {"type": "tool_use", "id": ident or f"toolu_{name}_{abs(hash(str(tool_input)))}",
            "name": name, "input": tool_input}


class StandIn:
    """A Messages API on 127.0.0.1 that plays `script`, one step per tool-offering request."""

    def __init__(self) -> None:
        self.script: list[list[dict[str, Any]]] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                stand_in.answer(self, body)

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def play(self, *steps: list[dict[str, Any]]) -> None:
        with self._lock:
            self.script = list(steps)
            self.requests.clear()

    def next_step(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            if body.get("tools") and self.script:
                return self.script.pop(0)
        return [{"type": "text", "text": "done"}]

    def answer(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if "count_tokens" in handler.path:
            return _json(handler, {"input_tokens": 1})
        content = self.next_step(body)
        stop = "tool_use" if any(c["type"] == "tool_use" for c in content) else "end_turn"
        message = {"id": "msg_standin", "type": "message", "role": "assistant",
                   "model": body.get("model", "standin"), "content": [], "stop_reason": None,
                   "usage": {"input_tokens": 1, "output_tokens": 1}}
        if not body.get("stream"):
            return _json(handler, message | {"content": content, "stop_reason": stop})
        events = [("message_start", {"type": "message_start", "message": message})]
        for index, block in enumerate(content):
            events += _block_events(index, block)
        events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop},
                                      "usage": {"output_tokens": 1}}),
                   ("message_stop", {"type": "message_stop"})]
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.end_headers()
        for name, data in events:
            handler.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

    def tool_results(self) -> dict[str, str]:
        """Every tool result Claude sent back, by tool_use id (text joined)."""
        found: dict[str, str] = {}
        for body in self.requests:
            for message in body.get("messages", []):
                for block in message.get("content") if isinstance(message.get("content"),
                                                                  list) else []:
                    if isinstance(block, dict) and block.get("type") == "tool_result":
                        found[block["tool_use_id"]] = _text_of(block.get("content"))
        return found


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if block["type"] == "text":
        start = {"type": "text", "text": ""}
        delta = {"type": "text_delta", "text": block["text"]}
    else:
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
    return [("content_block_start", {"type": "content_block_start", "index": index,
                                     "content_block": start}),
            ("content_block_delta", {"type": "content_block_delta", "index": index,
                                     "delta": delta}),
            ("content_block_stop", {"type": "content_block_stop", "index": index})]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(c.get("text", "") for c in content or [] if isinstance(c, dict))


def _json(handler: BaseHTTPRequestHandler, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    handler.send_response(200)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class Claude:
    """Runs the CLI against the stand-in, with its own config dir and no outside traffic."""

    def __init__(self, binary: Path, stand_in: StandIn, config_dir: Path) -> None:
        self.binary = binary
        self.stand_in = stand_in
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("ANTHROPIC_", "CLAUDE"))} | {
            "ANTHROPIC_BASE_URL": stand_in.url, "ANTHROPIC_API_KEY": "sk-devd-test",
            "CLAUDE_CONFIG_DIR": str(config_dir), "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_ERROR_REPORTING": "1",
            # bypassPermissions (tools run unasked) is refused to root outside a sandbox.
            "IS_SANDBOX": "1"}

    def run(self, cwd: Path, *args: str, prompt: str = "go", env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args, "-p", prompt,
                               "--permission-mode", "bypassPermissions"],
                              cwd=cwd, env=self.env | (env or {}), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def claude_binary() -> Path:
    return install_cli()


@pytest.fixture(scope="session")
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


@pytest.fixture
def claude_cli(claude_binary: Path, stand_in: StandIn, tmp_path: Path) -> Claude:
    config = tmp_path / "claude-config"
    config.mkdir()
    return Claude(claude_binary, stand_in, config)
