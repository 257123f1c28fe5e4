"""The daemon: socket setup and permissions, serve loop, reconcile loop, graceful stop."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from devd import protocol, sdnotify
from devd.errors import DevdError, ProtocolError, UsageError, storage_error
from devd.handlers import Service
from devd.intake import Intake, Waiting, pending_limit
from devd.params import check as check_params
from devd.paths import Paths, ensure_private_dir
from devd.proxy import api as proxy
from devd.registry import Registry
from devd.settings import Settings, load_settings
from devd.watch import RepoWatcher
from devd.watchers import api as watchers_api
from devd.watchers.monitor import WatcherMonitor

log = logging.getLogger("devd")
# Requests run at once; beyond this a client is told `busy` (each one is two threads).
MAX_WORKERS = 32
SEND_TIMEOUT = 30.0
ACCEPT_BATCH = 64
BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
ACCEPT_BACKOFF = 0.5
# How often a daemon that bound its own socket checks that the path is still that socket.
# Another (devd.socket started by systemd, which unlinks and binds anew) may take the path;
# then nobody can reach this one, and it stops so the new one can take the lock.
SOCKET_CHECK = 0.5
# A socket-activated daemon waits this long for the lock: the daemon it replaces is
# finishing (it noticed its socket is gone) while systemd holds the clients' connections.
HANDOVER_WAIT = 20.0
FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# What a request's own path can make the OS say: the client's mistake, not a devd bug.
CLIENT_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP}


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
        self._socket_checked = 0.0
        self._slots = threading.BoundedSemaphore(MAX_WORKERS)
        self._paused_until = 0.0
        self._exhausted = False
        # Taken at once: only this process may notify systemd, never a child it spawns.
        self._notifier = sdnotify.Notifier.from_environ()

    def run(self) -> None:
        # First: a client may connect (and a supervisor signal) as soon as the socket exists,
        # and a stop asked for during startup must end in the same graceful shutdown.
        self._install_signals()
        self._take_lock(HANDOVER_WAIT if sdnotify.activated() else 0.0)
        # A daemon started by hand in a worktree must not lend it to a request's relative
        # path (or /proc/self/cwd), nor keep the directory busy.
        os.chdir("/")
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
            watchers_api.watch_services(service)
            adopted = self._adopt()
            self._listener = adopted or self._bind()
            service.manager = _manager(adopted is not None or bool(self._notifier.address))
            running.callback(self._unbind)
            service.services.start_watching()
            # Services stop with the daemon, before its socket goes: `devd stop` returns
            # once they are down.
            running.callback(service.services.close)
            watcher.start()
            running.callback(watcher.stop)
            budget.start()
            running.callback(budget.stop)
            service.snapshot.start()
            running.callback(service.snapshot.stop)
            # In the background: Docker may be slow to answer, and requests need not wait.
            threading.Thread(target=_logged(service.sweep_snapshot_leftovers), daemon=True,
                             name="devd-snapshot-sweep").start()
            proxy.start(service, running)  # named URLs and the dashboard (devd/proxy)
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

    def _take_lock(self, wait: float) -> None:
        """One daemon per DEVD_HOME: a lock held for the daemon's life, released by the kernel
        even on SIGKILL, so a stale socket is told from a live one without guessing. With
        `wait`, the holder is given that long to hand over (it is stopping)."""
        ensure_private_dir(self.paths.state_dir)
        fd = os.open(self.paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        deadline, waited = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if time.monotonic() >= deadline or self._stop.is_set():
                os.close(fd)
                raise AlreadyRunning(
                    f"another devd daemon (pid {other}) is already serving the state dir "
                    f"{self.paths.state_dir}",
                    "use it, or stop it first (`devd stop`, or `systemctl --user stop devd`)",
                ) from None
            if not waited:
                log.info("waiting for devd pid %s to hand over the state dir", other)
                self._notifier.notify(f"STATUS=waiting for devd pid {other} to hand over")
            waited = True
            time.sleep(0.1)
        if waited:
            log.info("took over the state dir from the previous daemon")
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
        sock.listen(BACKLOG)
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
            intake = Intake(selector, self.settings.request_timeout, pending_limit())
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    for key, _ in selector.select(self._select_timeout(intake)):
                        self._on_ready(key, selector, intake, service)
                    intake.expire()
                    self._resume(selector)
                    self._check_socket()
            finally:
                intake.close_all()

    def _select_timeout(self, intake: Intake) -> float | None:
        """Wake for the next request deadline, the end of an accept back-off, or the next
        look at our socket."""
        wakes = [t for t in (intake.next_deadline(), self._paused_until) if t]
        if self._socket_ino is not None:
            wakes.append(self._socket_checked + SOCKET_CHECK)
        return max(min(wakes) - time.monotonic(), 0.0) if wakes else None

    def _check_socket(self) -> None:
        """Stop once the socket path is no longer ours: a daemon nobody can reach must not
        keep the lock (a socket-activated successor waits for it, clients queued there)."""
        if self._socket_ino is None or time.monotonic() < self._socket_checked + SOCKET_CHECK:
            return
        self._socket_checked = time.monotonic()
        try:
            ours = self.paths.socket.stat().st_ino == self._socket_ino
        except OSError:
            ours = False
        if not ours:
            log.warning("%s is no longer this daemon's socket (replaced by devd.socket, or "
                        "removed): nobody can reach this daemon; stopping so the one serving "
                        "it can take over", self.paths.socket)
            self.stop()

    def _on_ready(self, key: selectors.SelectorKey, selector: selectors.BaseSelector,
                  intake: Intake, service: Service) -> None:
        if key.fileobj is self._listener:
            self._accept(selector, intake)
        elif key.fileobj == self._wake_r:
            os.read(self._wake_r, 64)
        elif (waiting := intake.ready(key.fd)) is not None:
            self._start(waiting, service)

    def _accept(self, selector: selectors.BaseSelector, intake: Intake) -> None:
        """Take what the backlog holds; out of fds, drop the oldest idle client or back off.
        No accept error ever ends the serve loop."""
        assert self._listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in FD_EXHAUSTED and intake.drop_oldest():
                    continue
                self._back_off(selector, exc)
                return
            self._exhausted = False
            try:
                self._admit(conn, intake)
            except OSError as exc:  # the client left before we looked at it
                log.debug("dropped a connection at accept: %s", exc)
                conn.close()

    def _admit(self, conn: socket.socket, intake: Intake) -> None:
        pid, uid = protocol.peer_creds(conn)
        if uid is not None and uid != os.getuid():
            log.warning("refused a connection from uid %d", uid)
            with conn, contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(protocol.encode({"ok": False, "error": ProtocolError(
                    f"uid {uid} may not use this daemon (owner uid {os.getuid()})",
                    "each user runs their own devd").to_dict()}))
            return
        intake.add(conn, pid)

    def _back_off(self, selector: selectors.BaseSelector, exc: OSError) -> None:
        """Stop selecting the listener for a moment (it stays readable: no busy loop)."""
        if not self._exhausted:
            log.warning("accept failed (%s); pausing new connections for %g s", exc,
                        ACCEPT_BACKOFF)
        self._exhausted = True
        self._paused_until = time.monotonic() + ACCEPT_BACKOFF
        assert self._listener is not None
        selector.unregister(self._listener)

    def _resume(self, selector: selectors.BaseSelector) -> None:
        if self._paused_until and time.monotonic() >= self._paused_until:
            self._paused_until = 0.0
            assert self._listener is not None
            selector.register(self._listener, selectors.EVENT_READ)

    def _start(self, waiting: Waiting, service: Service) -> None:
        """Hand a complete request to a handler thread; with every slot taken, say `busy`."""
        connection = Connection(waiting.sock, service, waiting.pid)
        if not self._slots.acquire(blocking=False):
            connection.refuse_busy()
            return
        try:
            threading.Thread(target=self._run, args=(connection, waiting.line), daemon=True,
                             name="devd-conn").start()
        except RuntimeError:  # out of threads (RLIMIT_NPROC): the loop must go on
            self._slots.release()
            connection.refuse_busy()

    def _run(self, connection: Connection, line: bytes) -> None:
        try:
            connection.handle(line)
        finally:
            self._slots.release()

    def _unbind(self) -> None:
        if self._listener is not None:
            self._listener.close()
        # Remove the socket only if it is still ours (a successor may have replaced it);
        # one systemd passed is never ours (_socket_ino stays None): systemd keeps listening.
        with contextlib.suppress(OSError):
            if self.paths.socket.stat().st_ino == self._socket_ino:
                self.paths.socket.unlink()


class Connection:
    """One request on one connection: parse its line, stream progress, write one reply."""

    def __init__(self, sock: socket.socket, service: Service, pid: int | None) -> None:
        self.sock = sock
        self.service = service
        self.pid = pid
        self._alive = True
        self._sending = threading.Lock()
        # A client that stops reading gets this long per reply before it is dropped.
        self.sock.settimeout(SEND_TIMEOUT)

    def handle(self, line: bytes) -> None:
        started, method, params = time.monotonic(), "?", dict[str, Any]()
        with self.sock:
            try:
                self.service.peer.pid = self.pid  # per thread: see Service.peer_pid
                self.service.peer.sock = self.sock
                message = protocol.decode(line)
                method, params = protocol.parse_request(message)
                with self._heartbeat(message.get("heartbeat") is True):
                    result = self._dispatch(method, params)
                if isinstance(result, protocol.Encoded):
                    self._write(result.reply())
                else:
                    self._send({"ok": True, "result": result})
                outcome = "ok"
            except DevdError as exc:
                self._send({"ok": False, "error": exc.to_dict()})
                outcome = f"error {exc.code}"
            except Exception as exc:  # a bug must not kill the daemon; log it and say so
                self._send({"ok": False, "error": _unexpected(exc)})
                outcome = "error internal"
        _log_request(method, params, self.pid, outcome, time.monotonic() - started)

    def refuse_busy(self) -> None:
        with self.sock:
            self._send({"ok": False, "error": DevdError(
                f"the daemon is busy: {MAX_WORKERS} requests are running",
                "retry in a moment", code="busy").to_dict()})

    def _dispatch(self, method: str, params: dict[str, Any]) -> Any:
        handler = self.service.handler(method)
        if handler is None:
            raise ProtocolError(f"unknown method {method!r}", "see docs/protocol.md")
        check_params(handler, method, params)
        return handler(self._progress, **params)

    @contextlib.contextmanager
    def _heartbeat(self, wanted: bool) -> Iterator[None]:
        """While the handler runs, a heartbeat line every few seconds, if the client asked."""
        if not wanted:
            yield
            return
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(done,), daemon=True, name="devd-beat")
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join()

    def _beat(self, done: threading.Event) -> None:
        """One at once (the client then knows they will come), then one per interval."""
        self._send({"event": "heartbeat"})
        while not done.wait(protocol.HEARTBEAT_SECONDS):
            self._send({"event": "heartbeat"})

    def _progress(self, phase: str, message: str, **extra: Any) -> None:
        self._send({"event": "progress", "phase": phase, "message": message, **extra})

    def _send(self, message: dict[str, Any]) -> None:
        self._write(protocol.encode(message))

    def _write(self, line: bytes) -> None:
        """A client that disconnected mid-request loses its replies; the work goes on."""
        with self._sending:
            if not self._alive:
                return
            try:
                self.sock.sendall(line)
            except OSError as exc:
                log.debug("client went away: %s", exc)
                self._alive = False


def _log_request(method: str, params: dict[str, Any], pid: int | None, outcome: str,
                 seconds: float) -> None:
    """One INFO line per request: method, worktree, caller, outcome. Never other parameters
    or error messages (they can carry a dump path's or a URL's secrets); names are repr'd
    where they could forge a log line."""
    path = params.get("path")
    where = f" {_loggable(path)}" if isinstance(path, str) else ""
    log.info("request %s%s (pid %s): %s in %.0f ms", _loggable(method), where, pid or "?",
             outcome, seconds * 1000)


def _loggable(text: str) -> str:
    return text if text.isprintable() and len(text) < 300 else repr(text[:300])


def _unexpected(exc: Exception) -> dict[str, str]:
    """A full or read-only disk, or a path no file system takes, is said plainly; anything
    else is a devd bug."""
    if isinstance(exc, OSError) and exc.errno in CLIENT_ERRNOS:
        return UsageError(f"{str(exc.filename)[:200]}: {exc.strerror}",
                          "pass the path of a real worktree").to_dict()
    storage = storage_error(exc)
    if storage is not None:
        log.error("%s", storage.message)
        return storage.to_dict()
    log.error("internal error: %s", traceback.format_exc())
    # The type and a short message only: a repr can carry file contents.
    return {"code": "internal", "message": f"internal error: {type(exc).__name__}: "
            f"{str(exc)[:200]}", "hint": "this is a devd bug; the daemon log has the traceback"}


def _manager(systemd: bool) -> str | None:
    """Which service manager runs this daemon: `devd stop` leaves stopping to it."""
    from devd.service import LABEL

    if systemd:
        return "systemd"
    return "launchd" if os.environ.get("XPC_SERVICE_NAME") == LABEL else None


def _logged(task: Callable[[], object]) -> Callable[[], None]:
    """`task` for a thread of its own: a failure is logged, never a traceback on stderr."""
    def run() -> None:
        try:
            task()
        except Exception:
            log.exception("%s failed", getattr(task, "__name__", "a background task"))
    return run


def main(paths: Paths | None = None) -> int:
    """`devd daemon`: run in the foreground, log to stderr."""
    logging.basicConfig(level=os.environ.get("DEVD_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s devd[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    paths = paths or Paths.resolve()
    try:
        Daemon(load_settings(paths), paths).run()
    except DevdError as exc:
        return _report(exc)
    except OSError as exc:  # a read-only or full state dir, said plainly
        if (storage := storage_error(exc)) is None:
            raise
        return _report(storage)
    return 0


def _report(exc: DevdError) -> int:
    print(f"devd daemon: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return 1


