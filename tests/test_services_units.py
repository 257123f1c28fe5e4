"""Framework-aware port flags (what devd appends to each kind of dev-server command) and
service logs, without processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devd.services.portflags import inject

VITE = "--port 20001 --strictPort --host 127.0.0.1"


@pytest.mark.parametrize(("command", "added"), [
    ("vite", VITE),
    ("npx vite --open", VITE),
    ("NODE_ENV=development ./node_modules/.bin/vite dev", VITE),
    ("cd web && pnpm exec vite", VITE),
    ("react-router dev", VITE),
    ("remix vite:dev", VITE),
    ("astro dev", "--port 20001 --host 127.0.0.1"),
    ("ng serve", "--port 20001 --host 127.0.0.1"),
    ("storybook dev -s public", "--port 20001 --exact-port --host 127.0.0.1 --ci"),
    ("webpack serve --mode development", "--port 20001 --host 127.0.0.1"),
    ("python manage.py runserver", "127.0.0.1:20001"),
    ("uv run python manage.py runserver --noreload", "127.0.0.1:20001"),
    ("flask --debug run", "--port 20001 --host 127.0.0.1"),
    ("python -m uvicorn app:app --reload", "--port 20001 --host 127.0.0.1"),
    ("python3 -m http.server", "20001 --bind 127.0.0.1"),
    ("hugo server -D", "--port 20001 --bind 127.0.0.1"),
])
def test_flags_for_tools_that_ignore_port(command: str, added: str, tmp_path: Path) -> None:
    result = inject(command, 20001, tmp_path)
    assert result.added == added and result.command == f"{command} {added}"


@pytest.mark.parametrize("command", [
    "next dev", "nuxt dev", "gatsby develop", "parcel index.html", "rails server",
    "node server.js", "gunicorn app:app",  # read PORT themselves, or unknown
    "vite --port 3000", "vite --port=3000", "storybook dev -p 6006",  # the user's own port
    "python manage.py runserver 0:8000", "python -m http.server 8000",
    "vite > vite.log", "vite &", "vite | tee log", "echo 'unbalanced",  # the end is not it
])
def test_left_alone(command: str, tmp_path: Path) -> None:
    assert inject(command, 20001, tmp_path).command == command


def scripts(tmp_path: Path, **named: str) -> Path:
    (tmp_path / "package.json").write_text(json.dumps({"scripts": named}))
    return tmp_path


@pytest.mark.parametrize(("command", "expected"), [
    ("npm run dev", f"npm run dev -- {VITE}"),  # npm passes arguments after --
    ("npm run dev -- --mode x", f"npm run dev -- --mode x {VITE}"),
    ("npm start", f"npm start -- {VITE}"),
    ("pnpm dev", f"pnpm dev {VITE}"),  # pnpm would pass a -- on to vite
    ("pnpm run dev", f"pnpm run dev {VITE}"),
    ("yarn dev", f"yarn dev {VITE}"),
    ("bun run dev", f"bun run dev {VITE}"),
    ("npm run next", "npm run next"),  # next dev reads PORT
    ("npm run chained", f"npm run chained -- {VITE}"),
    ("npm run missing", "npm run missing"),
])
def test_package_scripts(command: str, expected: str, tmp_path: Path) -> None:
    cwd = scripts(tmp_path, dev="vite", start="vite", next="next dev",
                  chained="tsc -b && vite --mode dev")
    assert inject(command, 20001, cwd).command == expected


def test_port_arg_overrides(tmp_path: Path) -> None:
    cwd = scripts(tmp_path, dev="my-server")
    assert inject("npm run dev", 20001, cwd, "--listen :{port}").command == \
        "npm run dev -- --listen :20001"
    assert inject("vite", 20001, cwd, "").command == "vite"  # "": the command handles it


def test_log_rotation_keeps_an_appending_writer_going(tmp_path: Path) -> None:
    """copytruncate: the service's O_APPEND descriptor writes on at the new end."""
    import os

    from devd.services import logs

    path = tmp_path / "web.log"
    fd = logs.open_for_service(path)
    try:
        for n in range(logs.KEEP + 2):
            os.write(fd, f"run {n}\n".encode() * 100)
            assert logs.rotate_if_big(path, limit=10)
        os.write(fd, b"after\n")
    finally:
        os.close(fd)
    assert path.read_text() == "after\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["web.log", "web.log.1", "web.log.2", "web.log.3"]
    assert (tmp_path / "web.log.1").read_text().endswith(f"run {logs.KEEP + 1}\n")
    logs.note(path, "start `vite` in /x")
    with open(path, "a") as handle:
        handle.write("VITE ready\n")
    assert logs.output_of(logs.last_run(path)) == ["VITE ready"]


def test_listen_table_from_sock_diag_is_proc_net_tcps(monkeypatch: pytest.MonkeyPatch) -> None:
    """sock_diag (fast) and /proc/net/tcp{,6} (the fallback) name the same sockets, both
    families, with their addresses; a refused dump falls back."""
    import socket

    from devd import processes

    held = []
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family)
            sock.bind((address, 0))
        except OSError:
            continue  # no IPv6 loopback here
        sock.listen()
        held.append((sock, (address, sock.getsockname()[1])))
    wants = [want for _, want in held]
    try:
        fast = processes.listen_sockets()
        monkeypatch.setattr(processes, "_diag_listening", _refused)
        slow = processes.listen_sockets()
        assert fast is not None and slow is not None
        # The same (address, port) under the same socket inode either way.
        assert {w: i for i, w in fast.items() if w in wants} == \
            {w: i for i, w in slow.items() if w in wants} and len(wants) >= 1
        assert all(want in fast.values() for want in wants)
    finally:
        for sock, _ in held:
            sock.close()


def _refused() -> dict[str, tuple[str, int]]:
    raise OSError("sock_diag refused the dump")
