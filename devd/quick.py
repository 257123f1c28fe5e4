"""The `devd` command's entry point: `--version`, `--help` and `devd status [--json]` answered
without argparse, pathlib, typing, json or socket (each costs about as much as starting the
interpreter; a prompt may run `devd status` on every line). Everything else, and every case
this path does not cover exactly (no daemon to reach, an error reply, an unusual DEVD_HOME,
a terminal that is not 80 columns for --help), goes to devd.cli.main, so output and exit
codes are the same either way.

The daemon renders the text (`status_view`, docs/protocol.md): the reply is one JSON string,
decoded by the C scanner the json package itself uses.

`devd up` is sent from here before devd.cli is imported (its shapes that argparse reads
the same), and devd.cli then reads the reply on that connection: the imports overlap the
daemon's start of the services instead of delaying it.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing's own constant costs importing typing; mypy reads either
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable

PROTOCOL_VERSION = 1  # devd.protocol.VERSION (tests/test_status_fast.py checks)
MAX_SOCKET_PATH = 100  # devd.paths.MAX_SOCKET_PATH
WIDTH = 100  # devd.render_status.WIDTH
HELP_COLUMNS = 80  # the width devd/helptext.py was rendered at


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:
        from devd import __version__

        print(f"devd {__version__}")
        return 0
    if (not argv or argv in (["-h"], ["--help"])) and _help_columns() == HELP_COLUMNS:
        from devd.helptext import HELP

        # As argparse: help asked for goes to stdout (0); bare `devd` to stderr (usage, 2).
        print(HELP, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv in (["status"], ["status", "--json"]):
        try:
            code = _status("json" if argv[1:] else "rows")
        except _Lost as lost:  # said as the full path says it, without asking again
            from devd.cli import lost_daemon

            return lost_daemon(argv, lost.timeout, lost.dropped)
        if code is not None:
            return code
    # `up` goes out first: devd.cli's imports then overlap the daemon's work.
    sent = _send_up(argv[1:]) if argv[:1] == ["up"] else None
    from devd.cli import main as full

    return full(argv) if sent is None else full(argv, sent)


class _Lost(Exception):
    """The daemon had the request, then went silent for the timeout or closed (`dropped`)."""

    def __init__(self, timeout: float, dropped: OSError | None = None) -> None:
        self.timeout, self.dropped = timeout, dropped


def _status(view: str) -> int | None:
    """Print `devd status` as the daemon rendered it; None when the full path must answer
    (raises _Lost when the daemon took the request and then failed us)."""
    sock = socket_path(os.environ)
    timeout = _timeout(os.environ.get("DEVD_TIMEOUT", ""))
    if sock is None or timeout is None:
        return None
    params: dict[str, object] = {"view": view}
    if view == "rows":
        tty = sys.stdout.isatty()
        params |= {"cwd": _cwd(), "width": _width(tty), "home": os.path.expanduser("~"),
                   "colour": tty and not os.environ.get("NO_COLOR")
                   and os.environ.get("TERM") != "dumb"}
    try:
        text = _ask(sock, "status_view", params, timeout)
    except TimeoutError:  # connect (a full backlog) or read: as devd.client says it
        raise _Lost(timeout) from None
    except (OSError, ValueError, UnicodeError):  # unreachable, or a reply to read in full
        return None
    if text is None:
        return None
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `devd status | head`: as devd.cli.main
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


def _send_up(args: list[str]) -> int | None:
    """`devd up [--path P] [-v] [--json] [SERVICE...]`: send the request at once and return
    the connection's fd, so the CLI's imports (argparse and the rest: a few hundred ms on
    a loaded machine) run while the daemon starts the services. None for any other shape,
    or when the daemon is not simply there (the full path starts it, or says why)."""
    params = _up_params(args)
    sock_path = socket_path(os.environ)
    timeout = _timeout(os.environ.get("DEVD_TIMEOUT", ""))
    if params is None or sock_path is None or timeout is None:
        return None
    import _json
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        if _ours(sock):
            sock.sendall(_request("up", params, _json.encode_basestring).encode())
            return int(sock.detach())
    except OSError:
        pass
    sock.close()
    return None


def _up_params(args: list[str]) -> dict[str, object] | None:
    """The params devd.services.commands.cmd_up sends for `args`, or None for any shape
    argparse might read otherwise (or refuse: the request must never go out first)."""
    path, names, ended = ".", [], False
    rest = list(args)
    while rest:
        word = rest.pop(0)
        if word == "--path" and rest and not rest[0].startswith("-"):
            path = rest.pop(0)
        elif word in ("-v", "--verbose", "--json"):
            pass
        elif word[:1].isalnum() and word.isascii() and word.isprintable() and not ended:
            names.append(word)
            ended = bool(rest) and rest[0].startswith("-")  # argparse takes one run of them
            continue
        else:
            return None
        ended = ended or bool(names)
    try:
        where = os.path.abspath(os.path.join(os.getcwd(), path))
    except OSError:  # the current directory was removed: the full path says so
        return None
    if not where.isprintable():  # devd.paths.faithful's refusal comes from the full path
        return None
    params: dict[str, object] = {"path": where, "restart": False,
                                 "caller_path": os.environ.get("PATH", "")}
    return params | ({"services": names} if names else {})


def socket_path(environ: os._Environ[str] | dict[str, str]) -> str | None:
    """The socket devd.paths.Paths.resolve() names, when finding it needs neither
    platformdirs nor tempfile (DEVD_HOME, or XDG_RUNTIME_DIR); else None."""
    home = environ.get("DEVD_HOME")
    if home:
        # Path(home).absolute() keeps `..` where normpath would fold it: leave those to Paths.
        if not home.startswith("/") or ".." in home.split("/"):
            return None
        run = os.path.join(os.path.normpath(home), "run")
    else:
        xdg = environ.get("XDG_RUNTIME_DIR")
        if not xdg or sys.platform == "darwin" or not os.path.isdir(xdg):
            return None
        run = os.path.join(os.path.normpath(xdg), "devd")
    path = os.path.join(run, "devd.sock")
    return path if len(os.fsencode(path)) <= MAX_SOCKET_PATH else None


def _timeout(raw: str) -> float | None:
    """DEVD_TIMEOUT when it is a plain number in range; None leaves a bad one to the full
    path, which says what is wrong with it."""
    try:
        value = float(raw) if raw.strip() else 5.0
    except ValueError:
        return None
    return value if 0 < value <= 86400 else None


def _ask(path: str, method: str, params: dict[str, object], timeout: float) -> str | None:
    """One request on a fresh connection; the reply's `text`, or None for any reply but a
    success (the full path then asks again and reports it as usual)."""
    import _json
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        if not _ours(sock):
            return None
        sock.sendall(_request(method, params, _json.encode_basestring).encode())
        reader = _LineReader(sock)
        scan = _json.make_scanner(_Strict())  # type: ignore[arg-type]
        while True:
            try:
                line = reader.line()
            except ConnectionError as exc:
                raise _Lost(timeout, exc) from None
            message, _ = scan(line, 0)
            if not isinstance(message, dict):
                return None
            if message.get("event") is None:
                result = message.get("result") if message.get("ok") is True else None
                text = result.get("text") if isinstance(result, dict) else None
                return text if isinstance(text, str) else None
    finally:
        sock.close()


def _ours(sock: _socket.socket) -> bool:
    """The daemon answering runs as us (as devd.client.connect checks): SO_PEERCRED's uid.
    Where the kernel has no SO_PEERCRED, the full path checks its own way."""
    import _socket

    if not hasattr(_socket, "SO_PEERCRED"):
        return False
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder) == os.getuid()


def _request(method: str, params: dict[str, object], quote: Callable[[str], str]) -> str:
    """The request line (as devd.protocol.request writes it, heartbeats asked for)."""
    def value(v: object) -> str:
        if isinstance(v, list):
            return "[" + ",".join(map(value, v)) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        return "null" if v is None else quote(str(v))

    body = ",".join(f"{quote(k)}:{value(v)}" for k, v in params.items())
    return f'{{"v":{PROTOCOL_VERSION},"method":{quote(method)},"params":{{{body}}},' \
        '"heartbeat":true}\n'


class _Strict:
    """What the C scanner reads off json.JSONDecoder: strict, no hooks, and NaN/Infinity
    refused as devd.protocol.decode refuses them."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not JSON")


class _LineReader:
    """Lines off the socket; each waits at most the socket's timeout for the next bytes
    (the daemon says "heartbeat" every half second while it works)."""

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def line(self) -> str:
        end = self._buffer.find(b"\n")
        while end < 0:
            chunk = self._sock.recv(1 << 18)
            if not chunk:  # in devd.protocol.LineReader's words
                where = "in the middle of a message" if self._buffer else "before a message"
                raise ConnectionResetError(f"the connection closed {where}")
            seen = len(self._buffer)
            self._buffer += chunk
            end = self._buffer.find(b"\n", seen)
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        return line.decode()


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except FileNotFoundError:  # the caller's directory was deleted: no mark
        return None


def _width(tty: bool) -> int:
    """As devd.cli._width: the terminal's columns, the default width off a terminal."""
    if not tty:
        return WIDTH
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return WIDTH


def _help_columns() -> int:
    """The columns argparse formats help for (shutil.get_terminal_size, without shutil)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80
