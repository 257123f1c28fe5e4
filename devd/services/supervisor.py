"""The daemon's services: one unit per (worktree, service), watched by one thread.

States: `starting` (spawned, not yet ready), `running` (ready: listening on its port, or
answering its HTTP path), `backoff` (exited; restarted after a delay), `crashed` (exited
MAX_FAILURES times in a row, each within STABLE seconds: left down, with its log tail),
`failed` (never came up: exited at once, never listened, or listened elsewhere),
`stopping`, `stopped`, `idle` (stopped by idle_stop; starting it again is `start`).

The watch thread owns every transition after a spawn: exits, readiness, restarts,
rotation, idle stops. `devd up` only waits for a unit to leave `starting`. When the daemon
stops, it stops every service (TERM to each group, a grace, then KILL), as honcho and
overmind do when they exit: a service outliving its supervisor has nobody to restart it,
rotate its log or stop it when its worktree goes.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devd import processes
from devd.errors import DevdError
from devd.services import groups, logs
from devd.watchers.signatures import LineScanner, Signature

log = logging.getLogger("devd")
MAX_FAILURES = 5
STABLE = 10.0  # a run this long resets the failure count
BACKOFF = (0.25, 30.0)  # first delay, doubled per failure up to the cap
SETTLE = 2.0  # listening elsewhere this long (and not on its port) fails it
# While a service starts, each tick reads the listen table alone (sock_diag: under a
# millisecond); its group's sockets (every process's group id: tens of ms on a loaded
# machine) are looked at once its port shows up, and every LOOK_EVERY regardless, to see
# it listen elsewhere. FAST_TICK is how late `up` may notice it is ready.
FAST_TICK, SLOW_TICK, IDLE_EVERY, LOOK_EVERY = 0.02, 0.5, 2.0, 1.0
UP = ("starting", "running", "backoff")


@dataclass
class Spec:
    """Everything needed to (re)start one service, resolved by the handler."""

    wt_id: str
    name: str
    command: str
    cwd: Path
    env: dict[str, str]
    log: Path
    port: int | None = None
    port_name: str | None = None
    url: str | None = None
    ready: str = "port"
    timeout: float = 60.0
    idle: float = 0.0
    tool: str | None = None


CHANGES = 0  # grows with every state any unit takes (devd/handlers/snapshot.py reads it)


@dataclass
class Unit:
    spec: Spec
    state: str = "stopped"
    group: groups.Group | None = None
    started: float = 0.0  # monotonic time of the last spawn
    ever_ready: bool = False
    restarts: int = 0
    failures: int = 0
    next_start: float = 0.0
    elsewhere_since: float | None = None
    looked: float = 0.0  # monotonic time its group's sockets were last read (_probe)
    error: str | None = None
    dial: str | None = None  # where its listener is (groups.dial_host): verified once ready
    last_used: float = field(default_factory=time.monotonic)
    changed: threading.Condition = field(default_factory=threading.Condition)
    scanned: int = 0  # how far into its log this run's output was scanned for breaks
    scanner: LineScanner = field(default_factory=LineScanner)

    @property
    def key(self) -> tuple[str, str]:
        return self.spec.wt_id, self.spec.name

    @property
    def pid(self) -> int | None:
        return self.group.pgid if self.group and self.state in UP else None

    def set(self, state: str, error: str | None = None) -> None:
        global CHANGES
        with self.changed:
            self.state, self.error = state, error
            CHANGES += 1  # a status answer built before this is out of date
            self.changed.notify_all()



class Supervisor:
    """Start, watch, restart and stop the services of every worktree."""

    def __init__(self, state_dir: Path, kill_timeout: float) -> None:
        self.root = state_dir / "services"
        self.kill_timeout = kill_timeout
        self._units: dict[tuple[str, str], Unit] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="devd-services", daemon=True)
        self._idle_checked = 0.0
        # Set by the daemon to the proxy's nudge: an idle stop sends the service's name to
        # the wake handler, readiness sends it back to the service.
        self.on_change: Callable[[], None] = lambda: None
        # Set by the daemon to the watcher monitor's: each spawn is recorded as a
        # devd-started run, and a break line in its output (a Vite that ran out of inotify
        # watches, whatever its --logLevel: node prints the error it dies of) marks it
        # broken, as `devd run`'s scanner does for what it runs.
        self.on_spawn: Callable[[Unit], None] = lambda unit: None
        self.on_break: Callable[[Unit, Signature, str], None] = lambda unit, sig, line: None

    def start_watching(self) -> None:
        """Stop what a previous daemon left, then watch."""
        if groups.sweep(self.root, self.kill_timeout):
            log.info("services: cleared the records a previous daemon left")
        self._thread.start()

    def close(self) -> None:
        """The daemon stops: every service goes with it (see the module docstring)."""
        with self._guard:
            self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._stop_many(list(self._units.values()))

    # -- requests --------------------------------------------------------------------

    def unit(self, wt_id: str, name: str) -> Unit | None:
        return self._units.get((wt_id, name))

    def units(self, wt_id: str) -> list[Unit]:
        return [u for (w, _), u in list(self._units.items()) if w == wt_id]

    def serving(self) -> dict[tuple[str, str], int | None]:
        """(worktree id, port name) → the group id of the service serving it once it is
        ready (running), None while it is up but not (booting, backing off, stopping):
        the proxy dials only a listener of that group, and only once it is ready."""
        return {(u.spec.wt_id, u.spec.port_name): u.group.pgid if u.state == "running" and
                u.group else None for u in list(self._units.values())
                if u.state in UP + ("stopping",) and u.spec.port_name}

    def start(self, spec: Spec) -> Unit:
        """Spawn the service unless it is already up (idempotent); the watch thread takes it
        from there. The clean entry point for whoever wakes a service (the proxy)."""
        with self._guard:  # two `up`s at once: one spawns, the other gets its unit
            if self._stop.is_set():  # close() has listed what it stops: nothing new now
                raise DevdError("the daemon is stopping", "run `devd up` again in a moment",
                                code="busy")
            unit = self._units.get((spec.wt_id, spec.name))
            if unit is not None and unit.state in UP + ("stopping",):
                return unit
            unit = Unit(spec)
            self._spawn(unit)
            self._units[unit.key] = unit
        self._wake.set()
        return unit

    def wait(self, unit: Unit, deadline: float, tick: Callable[[Unit], None]) -> None:
        """Block until the unit is up or down for good (or the deadline, a safety net: the
        watch thread fails it at its own timeout); `tick` each second meanwhile."""
        with unit.changed:
            while unit.state in ("starting", "stopping", "backoff") and \
                    time.monotonic() < deadline:
                unit.changed.wait(1.0)
                if unit.state in ("starting", "backoff"):
                    tick(unit)

    def stop(self, wt_id: str, names: list[str] | None = None) -> list[tuple[Unit, str]]:
        """Stop the worktree's services (all, or those named); (unit, outcome) each."""
        chosen = [u for u in self.units(wt_id) if names is None or u.spec.name in names]
        return self._stop_many(chosen)

    def forget(self, wt_id: str) -> None:
        """A released worktree: stop its services, drop them and their logs."""
        self.stop(wt_id)
        with self._guard:
            for key in [k for k in self._units if k[0] == wt_id]:
                del self._units[key]
        shutil.rmtree(logs.log_dir(self.root.parent, wt_id), ignore_errors=True)

    def mark_used(self, wt_id: str) -> None:
        """A request through the proxy counts as use for idle_stop. (Use is otherwise an
        established connection to the port: Caddy keeps its upstream connections open for
        a while after each request, so requests through the proxy count as well.)"""
        for unit in self.units(wt_id):
            unit.last_used = time.monotonic()

    # -- spawning and stopping ------------------------------------------------------

    def _spawn(self, unit: Unit) -> None:
        spec = unit.spec
        logs.rotate_if_big(spec.log)
        logs.note(spec.log, f"start `{spec.command}` in {spec.cwd}"
                  + (f" on port {spec.port}" if spec.port else ""))
        scan_from = logs.size(spec.log)  # before it runs: its first line may come at once
        fd = logs.open_for_service(spec.log)
        try:
            unit.group = groups.spawn(spec.command, spec.cwd, spec.env, fd)
        except OSError as exc:
            unit.set("failed", f"cannot start `{spec.command}`: {exc.strerror or exc}")
            return
        finally:
            os.close(fd)
        groups.record(self._record(unit), unit.group)
        unit.started = unit.last_used = time.monotonic()
        unit.elsewhere_since = None
        unit.scanned, unit.scanner = scan_from, LineScanner()
        unit.dial = None  # verified again at readiness
        unit.set("starting")
        self._tell(self.on_spawn, unit)
        self.on_change()

    def _record(self, unit: Unit) -> Path:
        return unit.spec.log.with_suffix(".pid")

    def _stop_many(self, chosen: list[Unit]) -> list[tuple[Unit, str]]:
        """Stop several at once (20 services stop in one grace, not twenty)."""
        results: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i, u=u: results.__setitem__(
            i, self._stop_one(u)), name="devd-service-stop") for i, u in enumerate(chosen)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [(u, results.get(i, "?")) for i, u in enumerate(chosen)]

    def _stop_one(self, unit: Unit, state: str = "stopped") -> str:
        """Stop a running or starting unit (a pending restart is cancelled, an idle one
        stopped by `down` is no longer woken by a request; a crashed or failed one keeps
        its state and reason)."""
        with unit.changed:  # no restart can slip in between this check and `stopping`
            group = unit.group
            if unit.state == "backoff" or (unit.state == "idle" and state != "idle"):
                unit.set(state)
                self.on_change()
            if group is None or unit.state not in ("starting", "running"):
                return "not running"
            unit.set("stopping")
            self.on_change()  # its route goes to devd's page before its listener goes
        outcome = group.stop(self.kill_timeout)
        groups.forget(self._record(unit))
        logs.note(unit.spec.log, f"stopped by devd ({outcome})" + (
            ": idle (a request to its URL starts it again)" if state == "idle" else ""))
        unit.set(state)
        self.on_change()
        return outcome

    # -- the watch thread --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            units = list(self._units.values())
            try:
                self._tick(units)
            except Exception:  # the thread must survive a bad tick; the log says why
                log.exception("services: watch tick failed")
            busy = any(u.state == "starting" for u in units)
            self._wake.wait(FAST_TICK if busy else SLOW_TICK)
            self._wake.clear()

    def _tick(self, units: list[Unit]) -> None:
        now = time.monotonic()
        seen = groups.Listeners() if any(u.state == "starting" for u in units) else None
        for unit in units:
            with unit.changed:  # a stop in another thread waits for this unit's turn
                self._tick_one(unit, now, seen)
        if now - self._idle_checked >= IDLE_EVERY:
            self._idle_checked = now
            self._idle([u for u in units if u.state == "running" and u.spec.idle])

    def _tick_one(self, unit: Unit, now: float, seen: groups.Listeners | None) -> None:
        if unit.state in ("starting", "running"):
            self._scan(unit)
            self._check_exit(unit, now)
        if unit.state == "starting" and seen is not None:
            self._probe(unit, now, seen)
        elif unit.state == "backoff" and now >= unit.next_start:
            unit.restarts += 1
            self._spawn(unit)
        if unit.state in UP and logs.size(unit.spec.log) > logs.MAX_BYTES:
            self._scan(unit, limit=logs.MAX_BYTES)  # what the copy-truncate takes unread
            if logs.rotate_if_big(unit.spec.log):
                unit.scanned = 0

    def _check_exit(self, unit: Unit, now: float) -> None:
        assert unit.group is not None
        status = unit.group.exit_status()
        if status is None:
            return
        try:
            self._exited(unit, now, status)
        finally:
            self.on_change()  # its route goes to devd's page, whatever comes next

    def _exited(self, unit: Unit, now: float, status: int) -> None:
        assert unit.group is not None
        threading.Thread(target=unit.group.stop, args=(self.kill_timeout,), daemon=True,
                         name="devd-service-reap").start()  # its leftovers, then the zombie
        groups.forget(self._record(unit))
        self._scan(unit, last=True)  # what it wrote before it exited
        logs.note(unit.spec.log, f"exited with status {status}")
        how = f"exited with status {status}" if status >= 0 else f"killed by signal {-status}"
        if not unit.ever_ready and unit.restarts == 0:
            unit.set("failed", f"{how} before it was ready")
            return
        unit.failures = unit.failures + 1 if now - unit.started < STABLE else 1
        if unit.failures >= MAX_FAILURES:
            unit.set("crashed", f"{how}; {unit.failures} failures in a row, not restarted")
            return
        unit.next_start = now + min(BACKOFF[0] * 2 ** (unit.failures - 1), BACKOFF[1])
        unit.set("backoff", how)

    def _scan(self, unit: Unit, last: bool = False, limit: int = 1 << 20) -> None:
        """Feed what the run added to its log since the last tick to its break scanner
        (`limit` bytes at most: a service printing a flood costs the daemon little)."""
        chunk, unit.scanned = logs.read_from(unit.spec.log, unit.scanned, limit)
        hits = unit.scanner.feed(chunk) + (unit.scanner.close() if last else [])
        for signature, line in hits:
            self._tell(self.on_break, unit, signature, line)

    @staticmethod
    def _tell(hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:  # the watcher monitor's trouble must not stop the services
            log.exception("services: watcher hook failed")

    def _probe(self, unit: Unit, now: float, seen: groups.Listeners) -> None:
        """Ready once its group listens on its port (and its path answers); failed if it
        listens only elsewhere, or another process holds its port, for SETTLE seconds, or
        it does not listen by its timeout."""
        spec, group = unit.spec, unit.group
        assert group is not None
        if spec.port is None:
            return self._ready(unit)
        every = seen.every
        if spec.port not in every and now - unit.looked < LOOK_EVERY and \
                now - unit.started <= spec.timeout:
            return None  # nothing new to see: its port is not in the table yet
        unit.looked = now
        mine = seen.of_group(group.pgid)
        if spec.port in mine:
            unit.dial = groups.dial_host(seen.addresses_of(group.pgid, spec.port))
            others = {groups.dial_host({a}) for a in seen.others_at(group.pgid, spec.port)}
            if unit.dial is not None and unit.dial in others:
                # SO_REUSEPORT: the kernel would hand the other process part of its
                # requests (all of them, bound more narrowly): never called ready.
                unit.elsewhere_since = unit.elsewhere_since or now
                if now - unit.elsewhere_since >= SETTLE:
                    return self._fail(unit, shared(spec.port, unit.dial))
            elif spec.ready == "port" or _answers(spec.port, spec.ready, unit.dial):
                return self._ready(unit)
        elif spec.port in every:
            unit.elsewhere_since = unit.elsewhere_since or now
            if now - unit.elsewhere_since >= SETTLE:
                return self._fail(unit, taken(spec.port))
        elif mine:
            unit.elsewhere_since = unit.elsewhere_since or now
            if now - unit.elsewhere_since >= SETTLE:
                return self._fail(unit, wrong_port(spec, mine))
        if now - unit.started > spec.timeout:
            return self._fail(unit, f"did not {_what(spec)} within {spec.timeout:g} s"
                              + (f"; it listens on {_ports(mine)}" if mine else ""))
        return None

    def _ready(self, unit: Unit) -> None:
        unit.ever_ready = True
        logs.note(unit.spec.log, f"ready after {time.monotonic() - unit.started:.1f} s")
        unit.set("running")
        self.on_change()

    def _fail(self, unit: Unit, why: str) -> None:
        """A start that went wrong: stop what it started, keep the reason."""
        unit.set("stopping")
        self.on_change()
        threading.Thread(target=self._stop_then, args=(unit, why), daemon=True,
                         name="devd-service-fail").start()

    def _stop_then(self, unit: Unit, why: str) -> None:
        assert unit.group is not None
        unit.group.stop(self.kill_timeout)
        groups.forget(self._record(unit))
        logs.note(unit.spec.log, f"failed: {why}")
        unit.set("failed", why)

    def _idle(self, units: list[Unit]) -> None:
        if not units:
            return
        used = processes.established_ports()
        now = time.monotonic()
        for unit in units:
            if unit.spec.port in used:
                unit.last_used = now
            elif now - unit.last_used >= unit.spec.idle:
                log.info("service %s of %s idle for %.0f s: stopping", unit.spec.name,
                         unit.spec.wt_id, now - unit.last_used)
                threading.Thread(target=self._stop_one, args=(unit, "idle"), daemon=True,
                                 name="devd-service-idle").start()


def taken(port: int) -> str:
    holder = processes.listeners().get(port)
    who = f"pid {holder.pid} `{holder.command}`" if holder and holder.pid else "a process " \
        "devd may not inspect"
    return f"port {port} was taken by another process ({who}) while it started"


def shared(port: int, dial: str) -> str:
    return f"a process outside the service listens on {dial}:{port} too (SO_REUSEPORT): " \
        "requests would reach either; stop it, or give the service another port"


def wrong_port(spec: Spec, mine: set[int]) -> str:
    return f"listens on {_ports(mine)} instead of its port {spec.port} ({spec.port_name}): " \
        "it ignored the port devd gave it"


def _what(spec: Spec) -> str:
    return f"listen on port {spec.port}" if spec.ready == "port" else \
        f"answer http://127.0.0.1:{spec.port}{spec.ready}"


def _ports(ports: set[int]) -> str:
    return ", ".join(map(str, sorted(ports)))


def _answers(port: int, path: str, host: str | None) -> bool:
    """Does http://HOST:port/path (the address it listens on) answer below 500?"""
    import urllib.error  # only services with a ready path need it, not the daemon's start
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host or '127.0.0.1'}:{port}{path}",
                                    timeout=0.5) as reply:
            return int(reply.status) < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False
