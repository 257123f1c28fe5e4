"""`devd service install|uninstall|status`: run the daemon as a user service.

Linux: systemd user units (devd.socket + devd.service, socket activation, Type=notify).
macOS: a LaunchAgent (RunAtLoad, KeepAlive unless it exits cleanly). Elsewhere, or where no
user manager runs (containers, WSL without systemd), devd keeps working through the CLI's
autostart and these commands say so. Light imports only: the CLI calls this module.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from devd.errors import DaemonUnreachable, DevdError, OwnershipConflict
from devd.paths import Paths

if TYPE_CHECKING:
    from devd.signals import Target

UNITS = ("devd.socket", "devd.service")
LABEL = "dev.devd"
MARKER = "# devd: written by `devd service install`"
PLIST_MARKER = "<!-- devd: written by `devd service install` -->"
# Carried into the service so it sees the same tools and the same state as the shell.
PASSED_ENV = ("PATH", "DEVD_HOME")
Say = Callable[[str], None]


def template(name: str) -> str:
    """A service file template shipped with devd (systemd/, launchd/ in the source tree)."""
    return files("devd.templates").joinpath(name).read_text(encoding="utf-8")


# -- rendering -------------------------------------------------------------------


def render_systemd(python: str, environ: Mapping[str, str]) -> dict[str, str]:
    """devd.socket and devd.service with this interpreter, socket path and PATH filled in."""
    env_lines = [f"Environment={_unit_quote(f'{key}={environ[key]}')}"
                 for key in PASSED_ENV if environ.get(key)]
    values = {"@SOCKET@": _socket_spec(environ), "@PYTHON@": _unit_quote(python, exec_=True),
              "@ENVIRONMENT@": "\n".join(env_lines)}
    rendered = {}
    for name in UNITS:
        text = template(name)
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        rendered[name] = text
    return rendered


def _socket_spec(environ: Mapping[str, str]) -> str:
    """%t (the user's runtime dir) unless DEVD_HOME moves the socket: where clients look."""
    if environ.get("DEVD_HOME"):
        return str(Paths.resolve(dict(environ)).socket).replace("%", "%%")
    return "%t/devd/devd.sock"


def _unit_quote(value: str, exec_: bool = False) -> str:
    """Quote for a unit file: % starts a specifier, and in ExecStart= $ a variable."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if exec_:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def render_launchd(python: str, environ: Mapping[str, str], home: Path) -> bytes:
    """The LaunchAgent plist: absolute interpreter, explicit PATH, logs in ~/Library/Logs."""
    plist = plistlib.loads(template(f"{LABEL}.plist").encode())
    plist["ProgramArguments"][0] = python
    plist["EnvironmentVariables"] = {key: environ[key] for key in PASSED_ENV if environ.get(key)}
    log = str(home / "Library" / "Logs" / "devd.log")
    plist["StandardOutPath"] = plist["StandardErrorPath"] = log
    header, _, body = plistlib.dumps(plist).decode().partition("<plist")
    return f"{header}{PLIST_MARKER}\n<plist{body}".encode()


# -- where and how -----------------------------------------------------------------


def systemd_unit_dir(environ: Mapping[str, str]) -> Path:
    config = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(config).expanduser() / "systemd" / "user"


def launch_agents_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME", "~")).expanduser() / "Library" / "LaunchAgents"


def no_user_systemd(environ: Mapping[str, str]) -> str | None:
    """Why no user systemd manager can be used here, or None when one answers."""
    if not shutil.which("systemctl"):
        return "systemctl is not installed"
    if not os.path.isdir("/run/systemd/system"):  # sd_booted(3): PID 1 is not systemd
        return "this system was not booted with systemd (a container, or WSL without systemd)"
    result = _run(["systemctl", "--user", "show-environment"])
    if result.returncode != 0:
        return f"no user systemd manager answers ({result.stderr.strip() or 'no session bus'})"
    return None


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


def _must(argv: list[str], say: Say) -> None:
    result = _run(argv)
    if result.returncode != 0:
        raise DevdError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}",
                        "see `devd service status` and the service manager's log",
                        code="service_failed")
    say(f"ran `{' '.join(argv)}`")


def _write_owned(target: Path, content: bytes, marker: str, say: Say) -> bool:
    """Write a service file unless a file of the user's (no marker) is there; True if changed."""
    if target.exists() or target.is_symlink():
        current = target.read_bytes() if target.is_file() else b""
        if marker.encode() not in current:
            raise OwnershipConflict(f"{target} exists and was not written by devd",
                                    "move it away (devd never overwrites your files)")
        if current == content:
            say(f"{target} is up to date")
            return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.devd-tmp")
    tmp.write_bytes(content)
    os.replace(tmp, target)
    say(f"wrote {target}")
    return True


def _remove_owned(target: Path, marker: str, say: Say) -> None:
    if not target.is_file():
        return
    if marker.encode() not in target.read_bytes():
        say(f"left {target} alone: it was not written by devd")
        return
    target.unlink()
    say(f"removed {target}")


def cli_daemon(paths: Paths, say: Say) -> Target | None:
    """The daemon listening now if the CLI started it (no service manager runs it): the
    process the kernel says listens on the socket, and only if it says that pid itself."""
    from devd.client import Client

    try:
        reply = Client(paths, autostart=False).call("ping")
    except DaemonUnreachable:
        return None
    if reply.get("manager"):
        return None
    meant = _listening(paths, int(reply["pid"]))
    if meant is None:
        say(_not_the_listener(paths, reply["pid"]))
    return meant


def _not_the_listener(paths: Paths, pid: object) -> str:
    return (f"did not stop the daemon on {paths.socket}: it says it is pid {pid}, which is "
            "not the process listening there (another pid namespace, or a service "
            "manager's socket); stop it yourself")


def hand_over(old: Target, say: Say, grace: float = 5.0, timeout: float = 15.0) -> None:
    """Once the service manager holds the socket, the CLI-started daemon notices (its path
    is no longer its socket) and stops; clients wait in the manager's socket meanwhile.
    One too old to notice gets SIGTERM after `grace`."""
    from devd import signals

    if not signals.exited_within(old, grace):
        try:
            signals.send_once(old, signal.SIGTERM)
        except signals.Refused:
            return
        if not signals.exited_within(old, timeout):
            say(f"the daemon the CLI had started (pid {old.pid}) is still finishing after "
                f"SIGTERM; the service's daemon takes over once it exits")
            return
    say(f"the daemon the CLI had started (pid {old.pid}) stopped; the service manager's "
        "daemon serves the socket now")


def stop_autostarted(paths: Paths, say: Say) -> None:
    """Stop a daemon the CLI started, so the service manager's daemon can own the socket."""
    old = cli_daemon(paths, say)
    if old is not None and _terminate(paths, old.pid, say):
        say(f"stopped the daemon the CLI had started (pid {old.pid}); the service manager runs "
            "it now")


def stop_daemon(paths: Paths, say: Say) -> int:
    """`devd stop`: SIGTERM to the verified daemon, then wait for its socket to go. One a
    service manager runs is left to that manager: it would start it again on the next
    request (socket activation, KeepAlive) and its own state would say "failed"."""
    from devd.client import Client

    try:
        reply = Client(paths, autostart=False).call("ping")
    except DaemonUnreachable:
        say(f"no daemon running on {paths.socket}")
        return 0
    if reply.get("manager"):
        raise DevdError(f"the daemon (pid {reply['pid']}) runs under {reply['manager']}",
                        f"stop it there: {MANAGER_STOP[reply['manager']]}", code="managed")
    if not _terminate(paths, int(reply["pid"]), say):
        return 1
    say(f"stopped the daemon (pid {reply['pid']})")
    return 0


MANAGER_STOP = {"systemd": "`systemctl --user stop devd.socket devd.service`",
                "launchd": f"`launchctl bootout gui/$(id -u)/{LABEL}`"}


def _terminate(paths: Paths, pid: int, say: Say, timeout: float = 15.0) -> bool:
    """SIGTERM to `pid` only if it is the process the kernel says listens on the socket;
    True once the socket is gone (the daemon removes it as its last act)."""
    from devd import signals

    meant = _listening(paths, pid)
    try:
        sent = meant is not None and signals.send_once(meant, signal.SIGTERM)
    except signals.Refused:
        sent = False
    if not sent:
        say(_not_the_listener(paths, pid))
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and paths.socket.exists():
        time.sleep(0.1)
    if paths.socket.exists():
        say(f"sent SIGTERM to the daemon (pid {pid}); it is still finishing after "
            f"{timeout:g} s (see {paths.daemon_log})")
        return False
    return True


def _listening(paths: Paths, pid: int) -> Target | None:
    """`pid` as a process to signal, if it is the one that listens on the socket (asked
    after reading its start time, so that start time is the listener's)."""
    import psutil

    from devd import protocol, signals
    from devd.client import connect

    try:
        meant = signals.target(psutil.Process(pid))
        with connect(paths) as sock:
            listener = protocol.peer_creds(sock)[0]
    except (psutil.Error, OSError, DevdError):
        return None
    return meant if listener == pid else None


# -- commands --------------------------------------------------------------------


def install(environ: Mapping[str, str], say: Say) -> int:
    """Install and start the user service, or explain the autostart fallback."""
    if sys.platform == "darwin":
        return _install_launchd(environ, say)
    reason = no_user_systemd(environ)
    if reason:
        return _fallback(reason, environ, say)
    unit_dir = systemd_unit_dir(environ)
    changed = False
    for name, text in render_systemd(sys.executable, environ).items():
        changed |= _write_owned(unit_dir / name, text.encode(), MARKER, say)
    old = cli_daemon(Paths.resolve(dict(environ)), say)
    _must(["systemctl", "--user", "daemon-reload"], say)
    # The socket first: systemd takes the path, new clients wait there, and the daemon the
    # CLI started sees its socket replaced and stops; the service's daemon then takes the
    # state dir (it waits for the lock) and answers them. No moment without a socket.
    _must(["systemctl", "--user", "enable", "--now", "devd.socket"], say)
    if old is not None:
        hand_over(old, say)
    _must(["systemctl", "--user", "enable", "--now", *UNITS], say)
    if changed:
        _must(["systemctl", "--user", "try-restart", "devd.service"], say)
    say("devd runs as a systemd user service: started at login and on first use, "
        "restarted on failure (logs: `journalctl --user -u devd`)")
    return 0


def _fallback(reason: str, environ: Mapping[str, str], say: Say) -> int:
    say(f"no user service installed: {reason}.")
    say("devd works without one: the devd CLI (and the git and Claude Code hooks, which call "
        "it) start the daemon on first use, in the background, logging to "
        f"{Paths.resolve(dict(environ)).daemon_log}.")
    if environ.get("DEVD_NO_AUTOSTART", "") not in ("", "0"):
        say("warning: DEVD_NO_AUTOSTART is set, so nothing starts the daemon: run `devd daemon` "
            "yourself (e.g. from your shell's profile or the container's entrypoint).")
    return 0


def _install_launchd(environ: Mapping[str, str], say: Say) -> int:
    home = Path(environ.get("HOME", "~")).expanduser()
    target = launch_agents_dir(environ) / f"{LABEL}.plist"
    content = render_launchd(sys.executable, environ, home)
    (home / "Library" / "Logs").mkdir(parents=True, exist_ok=True)
    changed = _write_owned(target, content, PLIST_MARKER, say)
    domain = f"gui/{os.getuid()}"
    loaded = _run(["launchctl", "print", f"{domain}/{LABEL}"]).returncode == 0
    if loaded and not changed:
        say(f"{LABEL} is already loaded and up to date")
        return 0
    if loaded:
        _must(["launchctl", "bootout", f"{domain}/{LABEL}"], say)
    stop_autostarted(Paths.resolve(dict(environ)), say)
    _must(["launchctl", "bootstrap", domain, str(target)], say)
    say(f"devd runs as a LaunchAgent: started at login, restarted unless it exits cleanly "
        f"(logs: {home / 'Library' / 'Logs' / 'devd.log'})")
    return 0


def uninstall(environ: Mapping[str, str], say: Say) -> int:
    """Stop and remove the user service; state and registry are kept."""
    if sys.platform == "darwin":
        domain = f"gui/{os.getuid()}"
        if _run(["launchctl", "print", f"{domain}/{LABEL}"]).returncode == 0:
            _must(["launchctl", "bootout", f"{domain}/{LABEL}"], say)
        _remove_owned(launch_agents_dir(environ) / f"{LABEL}.plist", PLIST_MARKER, say)
        return 0
    reason = no_user_systemd(environ)
    if reason is None:
        _run(["systemctl", "--user", "disable", "--now", *UNITS])
        say("stopped and disabled devd.socket and devd.service")
    for name in UNITS:
        _remove_owned(systemd_unit_dir(environ) / name, MARKER, say)
    if reason is None:
        _must(["systemctl", "--user", "daemon-reload"], say)
    else:
        say(f"no user systemd here ({reason}); nothing to stop")
    return 0


def status(environ: Mapping[str, str], say: Say) -> int:
    """What is installed, what the manager says, and whether a daemon answers."""
    if sys.platform == "darwin":
        target = launch_agents_dir(environ) / f"{LABEL}.plist"
        loaded = _run(["launchctl", "print", f"gui/{os.getuid()}/{LABEL}"]).returncode == 0
        say(f"LaunchAgent {target}: {'installed' if target.is_file() else 'not installed'}, "
            f"{'loaded' if loaded else 'not loaded'}")
    else:
        _systemd_status(environ, say)
    say(f"daemon: {_daemon_state(Paths.resolve(dict(environ)))}")
    return 0


def _systemd_status(environ: Mapping[str, str], say: Say) -> None:
    reason = no_user_systemd(environ)
    for name in UNITS:
        path = systemd_unit_dir(environ) / name
        line = f"{name}: {path if path.is_file() else 'not installed'}"
        if reason is None:
            enabled = _run(["systemctl", "--user", "is-enabled", name]).stdout.strip()
            active = _run(["systemctl", "--user", "is-active", name]).stdout.strip()
            line += f" ({enabled or 'unknown'}, {active or 'unknown'})"
        say(line)
    if reason:
        say(f"no user systemd: {reason}; the CLI starts the daemon on first use")


def _daemon_state(paths: Paths) -> str:
    """Who runs the daemon, or why none answers though one holds the state dir."""
    from devd.client import Client, daemon_pid
    from devd.paths import flock_held

    try:
        reply = Client(paths, autostart=False).call("ping")
    except DaemonUnreachable:
        if flock_held(paths.lock_file):
            pid = daemon_pid(paths) or "?"
            return (f"pid {pid} holds the state dir but nothing answers on {paths.socket} "
                    "(its socket was replaced or removed: it stops by itself within a "
                    f"second; if it does not, `kill {pid}`)")
        return f"not running (nothing answers on {paths.socket})"
    by = f"run by {reply['manager']}" if reply.get("manager") else \
        "started by the CLI, not by a service manager (`devd service install` hands it over)"
    return f"running, pid {reply['pid']}, {by}, socket {paths.socket}"
