"""The daemon: socket setup and permissions, serve loop, reconcile loop, graceful stop."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import traceback
from typing import Any

from devd import protocol, sdnotify
from devd.errors import DevdError, ProtocolError
from devd.handlers import Service
from devd.paths import Paths, ensure_private_dir
from devd.registry import Registry
from devd.settings import Settings, load_settings
from devd.watch import RepoWatcher
from devd.watchers.monitor import WatcherMonitor

log = logging.getLogger("devd")
# A client gets this long to send its request line; a silent one must not hold a thread.
REQUEST_TIMEOUT = 10.0


class AlreadyRunning(DevdError):
    code = "already_running"


class Daemon:
    """startup → serve until a signal → shutdown, with the socket removed in `finally`."""

    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.settings = settings
        self.paths = paths
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        self._socket_ino: int | None = None
        # Taken at once: only this process may notify systemd, never a child it spawns.
        self._notifier = sdnotify.Notifier.from_environ()

    def run(self) -> None:
        self._take_lock()
        # Each part is stopped only if it was started, in reverse order, whatever fails.
        with contextlib.ExitStack() as running:
            registry = Registry(self.paths.registry)
            running.callback(registry.close)
            if interrupted := registry.mark_interrupted():
                log.warning("%d provision(s) were interrupted by the last stop", interrupted)
            service = Service(self.settings, self.paths, registry)
            running.callback(service.join_background, timeout=5.0)
            watcher = RepoWatcher(service, self.settings.reconcile_interval)
            service.on_register = watcher.nudge
            budget = WatcherMonitor(registry, self.settings)
            service.watchers = budget
            self._listener = self._adopt() or self._bind()
            running.callback(self._unbind)
            self._install_signals()
            watcher.start()
            running.callback(watcher.stop)
            budget.start()
            running.callback(budget.stop)
            running.callback(self._notifier.notify, "STOPPING=1", "STATUS=stopping")
            running.callback(log.info, "devd daemon stopping")
            log.info("devd daemon pid %d listening on %s", os.getpid(), self.paths.socket)
            self._notifier.notify("READY=1", f"STATUS=serving on {self.paths.socket}")
            self._serve(service)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- startup ---------------------------------------------------------------

    def _take_lock(self) -> None:
        """One daemon per DEVD_HOME: a lock held for the daemon's life, released by the kernel
        even on SIGKILL, so a stale socket is told from a live one without guessing."""
        ensure_private_dir(self.paths.state_dir)
        fd = os.open(self.paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another devd daemon (pid {other}) is already serving {self.paths.socket}",
                "use it, or stop it first (kill the pid, or `systemctl --user stop devd`)",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _adopt(self) -> socket.socket | None:
        """The socket systemd bound for us (socket activation): it stays systemd's to unlink."""
        passed = sdnotify.listen_fds()
        if not passed:
            return None
        sock, extra = passed[0], passed[1:]
        for unused in extra:
            unused.close()
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise DevdError(f"systemd passed a {sock.family.name}/{sock.type.name} socket",
                            "devd.socket must have ListenStream= with a path", code="config")
        name = sock.getsockname()
        if name != str(self.paths.socket):
            log.warning("systemd passed socket %s, but clients look for %s", name,
                        self.paths.socket)
        sock.setblocking(False)
        log.info("using the socket passed by systemd (%s)", name)
        return sock

    def _bind(self) -> socket.socket:
        ensure_private_dir(self.paths.runtime_dir)
        path = self.paths.socket
        if path.exists() or path.is_symlink():
            log.info("replacing stale socket %s", path)
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(128)
        sock.setblocking(False)
        self._socket_ino = path.stat().st_ino
        return sock

    def _install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    # -- serving -----------------------------------------------------------------

    def _serve(self, service: Service) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._listener:
                        self._accept(service)

    def _accept(self, service: Service) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        threading.Thread(target=Connection(conn, service).handle, daemon=True,
                         name="devd-conn").start()

    def _unbind(self) -> None:
        if self._listener is not None:
            self._listener.close()
        # Remove the socket only if it is still ours (a successor may have replaced it);
        # one systemd passed is never ours (_socket_ino stays None): systemd keeps listening.
        with contextlib.suppress(OSError):
            if self.paths.socket.stat().st_ino == self._socket_ino:
                self.paths.socket.unlink()


class Connection:
    """One request on one connection: read a line, stream progress, write one reply."""

    def __init__(self, sock: socket.socket, service: Service) -> None:
        self.sock = sock
        self.service = service
        self._alive = True

    def handle(self) -> None:
        with self.sock:
            try:
                self._check_peer()
                self.sock.settimeout(REQUEST_TIMEOUT)
                line = protocol.LineReader(self.sock, protocol.MAX_REQUEST_BYTES).readline()
                self.sock.settimeout(None)
                method, params = protocol.parse_request(protocol.decode(line))
                result = self._dispatch(method, params)
                self._send({"ok": True, "result": result})
            except DevdError as exc:
                self._send({"ok": False, "error": exc.to_dict()})
            except (TimeoutError, ConnectionError) as exc:
                log.debug("client went away: %s", exc)
            except Exception as exc:  # a bug must not kill the daemon; log it and say so
                log.error("internal error: %s", traceback.format_exc())
                self._send({"ok": False, "error": {
                    "code": "internal",
                    # The type and a short message only: a repr can carry file contents.
                    "message": f"internal error: {type(exc).__name__}: {str(exc)[:200]}",
                    "hint": "this is a devd bug; the daemon log has the traceback"}})

    def _check_peer(self) -> None:
        pid, uid = protocol.peer_creds(self.sock)
        self.service.peer.pid = pid  # per thread: see Service.peer_pid
        if uid is not None and uid != os.getuid():
            log.warning("refused a connection from uid %d", uid)
            raise ProtocolError(f"uid {uid} may not use this daemon (owner uid {os.getuid()})",
                                "each user runs their own devd")

    def _dispatch(self, method: str, params: dict[str, Any]) -> Any:
        handler = self.service.handler(method)
        if handler is None:
            raise ProtocolError(f"unknown method {method!r}", "see docs/protocol.md")
        try:
            return handler(self._progress, **params)
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            raise ProtocolError(f"bad parameters for {method!r}: {exc}",
                                "see docs/protocol.md") from exc

    def _progress(self, phase: str, message: str, **extra: Any) -> None:
        self._send({"event": "progress", "phase": phase, "message": message, **extra})

    def _send(self, message: dict[str, Any]) -> None:
        """A client that disconnected mid-request loses its replies; the work goes on."""
        if not self._alive:
            return
        try:
            self.sock.sendall(protocol.encode(message))
        except OSError:
            self._alive = False


def main(paths: Paths | None = None) -> int:
    """`devd daemon`: run in the foreground, log to stderr."""
    logging.basicConfig(level=os.environ.get("DEVD_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s devd[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    paths = paths or Paths.resolve()
    try:
        Daemon(load_settings(paths), paths).run()
    except DevdError as exc:
        print(f"devd daemon: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    return 0


