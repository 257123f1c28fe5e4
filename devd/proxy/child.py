"""Caddy as the daemon's child: started with the daemon, sent the whole config whenever the
route table changes, restarted with a growing back-off when it dies, stopped with the daemon.
Whatever happens to it, ports and the rest of devd go on; `status()` says what broke."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devd.errors import DevdError
from devd.paths import Paths, ensure_private_dir, write_atomic
from devd.provisioners.ports import is_free
from devd.proxy import caddy
from devd.proxy.config import Dials, caddy_config
from devd.proxy.names import DASHBOARD, host
from devd.proxy.routes import Table, base_url, build, sites
from devd.registry import Registry
from devd.settings import Settings

log = logging.getLogger("devd")
# Seconds between looks at the route table and the listen table (a listener that went or
# came is verified again: devd/proxy/verify.py); a nudge comes sooner.
POLL = 0.5
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0  # between attempts: never a loop that spins a CPU
STABLE = 30.0  # up this long, a crash counts as the first again
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
LOG_MAX = 1 << 20


class CaddyProxy:
    """One Caddy per daemon; its admin API on a unix socket in the private runtime dir."""

    def __init__(self, settings: Settings, paths: Paths, registry: Registry,
                 dashboard: Path, dashboard_key: str = "",
                 token: str = "",
                 dials: Callable[[list[tuple[tuple[str, str], int]]], Dials] = lambda _: {}
                 ) -> None:
        self.port, self.tls, self._configured = settings.proxy_port, settings.proxy_tls, \
            settings.caddy
        self._registry = registry
        self.admin_socket = paths.runtime_dir / "caddy-admin.sock"
        self.dashboard, self._key = dashboard, dashboard_key
        # Where each route's port is the worktree's own listener; the rest get a page.
        self._token, self._dials = token, dials
        self._config_file = paths.runtime_dir / "caddy.json"
        self.log_path = paths.state_dir / "caddy.log"
        self._data = paths.data_dir / "caddy"
        self._proc: subprocess.Popen[bytes] | None = None
        self._binary: Path | None = None
        self._pushed: dict[str, Any] | None = None
        self._failures = 0
        self._next_try = 0.0
        self._up_since = 0.0
        self.restarts = 0
        self._state: dict[str, Any] = {"state": "starting", "error": None, "hint": None}
        self._guard = threading.Lock()
        self._passes, self._passed = 0, threading.Condition()  # see settle()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="devd-proxy", daemon=True)

    # -- the daemon's side -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=STOP_TIMEOUT + READY_TIMEOUT)

    def nudge(self) -> None:
        """Routes may have changed: push them now rather than at the next poll."""
        self._wake.set()

    def settle(self, timeout: float = 2.0) -> None:
        """Return once routes as they are now have been pushed (or tried): a pass that was
        under way may have read them before the change, so two passes from now."""
        with self._passed:
            until = self._passes + 2
            self._wake.set()
            self._passed.wait_for(lambda: self._passes >= until or self._stop.is_set(),
                                  timeout)

    def table(self) -> Table:
        return build(sites(self._registry), base_url(self.port, self.tls))

    def status(self) -> dict[str, Any]:
        with self._guard:
            state = dict(self._state)
        proc = self._proc
        if state["state"] == "running" and (proc is None or proc.poll() is not None):
            state = {"state": "crashed", "error": "caddy exited; devd restarts it",
                     "hint": f"see {self.log_path}"}
        return state | {
            "enabled": True, "port": self.port, "tls": self.tls, "restarts": self.restarts,
            "backoff": self._backoff(self._failures - 1) if self._failures else 0.0,
            "pid": proc.pid if proc is not None and proc.poll() is None else None,
            "binary": str(self._binary) if self._binary else None,
            "dashboard": base_url(self.port, self.tls).format(host(DASHBOARD)) + f"/{self._key}/",
            "log": str(self.log_path),
            "admin_socket": str(self.admin_socket),
        } | ({"trust": f"{self._binary or 'caddy'} trust --address unix/{self.admin_socket}"}
             if self.tls else {})

    # -- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:  # the proxy must never take the daemon's threads down
                    log.exception("proxy: unexpected failure")
                with self._passed:
                    self._passes += 1
                    self._passed.notify_all()
                self._wake.wait(self._wait())
                self._wake.clear()
        finally:
            self._terminate()

    def _wait(self) -> float:
        if self._proc is None:
            return max(0.05, min(POLL, self._next_try - time.monotonic()))
        return POLL

    def _step(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._exited()
        if self._proc is None:
            if time.monotonic() >= self._next_try:
                self._launch()
            return
        if self._failures and time.monotonic() - self._up_since > STABLE:
            self._failures = 0
        self._push()

    def _launch(self) -> None:
        self._binary = caddy.find_binary(self._configured)
        if self._binary is None:
            self._fail("binary_missing", "no caddy binary found", caddy.MISSING_HINT)
            return
        if not self._stop_leftover():
            return
        if not is_free(self.port):
            self._fail("port_taken", f"port {self.port} is taken{_holder(self.port)}",
                       "stop what listens there, or set proxy_port in config.toml "
                       "(DEVD_PROXY_PORT)")
            return
        config = self._config()
        ensure_private_dir(self._data)
        write_atomic(self._config_file, json.dumps(config).encode())
        if not self._failures:  # a retry keeps saying what went wrong until it is up
            self._set("starting")
        if dies_with_daemon() and not keeps_pdeathsig(self._binary):
            log.warning("proxy: %s has file capabilities (setcap): the kernel drops the "
                        "parent-death signal as it starts, so a daemon killed -9 leaves it "
                        "running until the next daemon stops it", self._binary)
        with _log_file(self.log_path) as out:
            self._proc = subprocess.Popen(
                [*dies_with_daemon(), str(self._binary), "run", "--config",
                 str(self._config_file)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self._env(),
                start_new_session=True,  # a ^C in the daemon's terminal is the daemon's
                umask=0o077)  # its sockets, keys and certificates: the owner's only
        if self._ready():
            self._pushed, self._up_since = config, time.monotonic()
            self._set("running")
            log.info("proxy: caddy pid %d on port %d", self._proc.pid, self.port)
        elif self._proc is not None and not self._stop.is_set():
            # Alive but deaf (DEVD_CADDY a wrapper that never execs caddy, a hung start):
            # stopped and retried, never left "starting" for ever with no warning.
            self._terminate_child()
            self._fail("not_answering", f"caddy did not answer on its admin socket within "
                       f"{READY_TIMEOUT:.0f} s", f"see {self.log_path}; devd retries")

    def _ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self._stop.is_set():
            assert self._proc is not None
            if self._proc.poll() is not None:
                self._exited()
                return False
            if caddy.answers(self.admin_socket):
                return True
            time.sleep(0.05)
        return False

    def _exited(self) -> None:
        assert self._proc is not None
        code, self._proc, self._pushed = self._proc.returncode, None, None
        self.restarts += 1
        tail = _last_error(self.log_path)
        if "address already in use" in tail:
            self._fail("port_taken", f"port {self.port} is taken{_holder(self.port)}",
                       "stop what listens there, or set proxy_port in config.toml")
        else:
            self._fail("crashed", f"caddy exited with status {code}: {tail or 'no message'}",
                       f"see {self.log_path}; devd restarts it")
        log.warning("proxy: %s", self._state["error"])

    def _push(self) -> None:
        config = self._config()
        if config == self._pushed:
            return
        try:
            caddy.load(self.admin_socket, config)
        except (OSError, DevdError) as exc:
            log.warning("proxy: pushing routes failed: %s", exc)
            # Its own state, so `devd status` warns: Caddy still serves the old routes.
            self._set("stale", f"pushing routes failed: {exc}", f"see {self.log_path}")
            return
        self._pushed = config
        self._set("running")

    def _config(self) -> dict[str, Any]:
        table = self.table()
        dials = self._dials([((r.wt_id, r.name), r.port) for r in table.routes])
        return caddy_config(table, port=self.port, tls=self.tls,
                            admin=self.admin_socket, storage=self._data / "storage",
                            dashboard=self.dashboard, dials=dials, token=self._token)

    def _env(self) -> dict[str, str]:
        """Caddy's own dirs under devd's: never the user's ~/.local/share/caddy."""
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self._data),
                "XDG_DATA_HOME": str(self._data / "data"),
                "XDG_CONFIG_HOME": str(self._data / "config")}

    def _fail(self, state: str, error: str, hint: str) -> None:
        self._next_try = time.monotonic() + self._backoff(self._failures)
        self._failures += 1
        self._set(state, error, hint)

    @staticmethod
    def _backoff(failures: int) -> float:
        """Seconds before the next attempt after `failures` earlier ones in a row."""
        return min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 16))

    def _set(self, state: str, error: str | None = None, hint: str | None = None) -> None:
        with self._guard:
            self._state = {"state": state, "error": error, "hint": hint}

    def _stop_leftover(self) -> bool:
        """A Caddy of an earlier daemon of this DEVD_HOME (killed -9) still serving on our
        admin socket is stopped; one whose config is not ours (its storage is not devd's
        dir: a user's `caddy run` pointed at this path) is left alone and reported."""
        if caddy.answers(self.admin_socket):
            if not self._ours():
                self._fail("admin_socket_taken", f"a caddy devd did not start answers on "
                           f"{self.admin_socket}", "stop it (devd never stops a caddy it "
                           "did not start), or remove the socket")
                return False
            log.info("proxy: stopping the caddy an earlier daemon left running")
            with contextlib.suppress(OSError):
                caddy.admin(self.admin_socket, "POST", "/stop")
            deadline = time.monotonic() + STOP_TIMEOUT
            while not is_free(self.port) and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()
        return True

    def _ours(self) -> bool:
        try:
            status, body = caddy.admin(self.admin_socket, "GET", "/config/storage/root",
                                       timeout=1.0)
            return status == 200 and json.loads(body) == str(self._data / "storage")
        except (OSError, ValueError):
            return False

    def _terminate(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._config_file.unlink()
        self._terminate_child()

    def _terminate_child(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # Its whole process group (its own session): a wrapper script's caddy goes too.
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def dies_with_daemon() -> list[str]:
    """A prefix that makes Caddy get SIGTERM when the daemon dies, kill -9 included (an
    orphan would serve the old routes to ports others may take by now): util-linux's
    setpriv sets PR_SET_PDEATHSIG, then execs it. The signal comes when the *thread* that
    forked it ends; that is the proxy's own thread, which lives as long as the daemon's
    proxy does (and stops Caddy on its way out anyway). No setpriv (macOS): nothing, and
    the next daemon stops the orphan (_stop_leftover). A preexec_fn calling prctl would
    do the same without setpriv but is unsafe in a process with threads."""
    found = shutil.which("setpriv") if os.uname().sysname == "Linux" else None
    return [found, "--pdeathsig", "TERM", "--"] if found and _sets_pdeathsig(found) else []


def keeps_pdeathsig(binary: Path) -> bool:
    """False for a binary with file capabilities (`setcap cap_net_bind_service`, which
    Caddy's docs suggest for ports below 1024) started by anyone but root: exec clears
    PR_SET_PDEATHSIG for it (prctl(2))."""
    if os.geteuid() == 0:
        return True
    try:
        os.getxattr(binary, "security.capability")
    except OSError:  # none (ENODATA), or no xattrs here at all
        return True
    return False


@functools.cache
def _sets_pdeathsig(setpriv: str) -> bool:
    """util-linux's setpriv before 2.33 (CentOS 7, Amazon Linux 2) and busybox's have no
    --pdeathsig: Caddy would never start through them. Tried once per binary."""
    try:
        # It execs itself: the one program surely there whatever the PATH.
        tried = subprocess.run([setpriv, "--pdeathsig", "TERM", "--", setpriv, "--version"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if tried.returncode != 0:
        log.warning("proxy: %s cannot set the parent-death signal (%s): a daemon killed -9 "
                    "leaves Caddy to the next daemon", setpriv,
                    tried.stderr.decode(errors="replace").strip()[:200])
    return tried.returncode == 0


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # start_new_session: the group is the child's and ours


def _holder(port: int) -> str:
    from devd import processes  # psutil

    holder = processes.listeners().get(port)
    return f" by pid {holder.pid} `{holder.command}`" if holder else ""


@contextlib.contextmanager
def _log_file(path: Path) -> Any:
    """Caddy's output, appended; past LOG_MAX the old half goes to caddy.log.1."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_MAX:
            os.replace(path, path.with_name(path.name + ".1"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def _last_error(path: Path) -> str:
    """The message of Caddy's last log line (JSON lines, or plain text)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            return line.strip()[:300]
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            return str(entry.get("error") or entry.get("msg"))[:300]
    return lines[-1][:300] if lines else ""
