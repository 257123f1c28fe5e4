"""`devd status` from state the daemon keeps current, not re-checked per request.

A prompt may call `devd status` on every keystroke; re-checking every resource of 100
worktrees (reading each .env, a /proc pass for who listens) took ~50-150 ms a call. So:

- a background pass every `status_interval` seconds (5; sooner after a change) runs every
  resource check, the listener pass, the scan of gone worktrees' processes and the orphan
  scan; the answer says when (`checked_at`). It rests while nobody asks for status (a
  minute after the last request: checks connect to database servers); the first request
  after that checks at once;
- a request only stats each worktree's directory (a deleted one reads gone at once) and,
  when the registry changed since the last answer (devd provisioned, released, leased a
  port, saw a worktree go), re-describes just the worktrees whose records changed: what
  devd itself does shows at once;
- `status PATH` (one worktree) and `fresh` still check at once;
- a request finding the last pass old (the cadence rested, or a pass is slow: a hung Docker
  engine, a server that does not answer) has one run and waits for it CATCH_UP_SECONDS at
  most; past that it answers from the last pass, which says when it ran (`checked_at`),
  and a pass that failed says why (`check_error`);
- before the first pass ends, a request does not wait for it (a burst right after the
  daemon starts would fill the handler slots): a worktree no pass has described yet is
  answered from the registry alone (`"checked": false`, no resource checked).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from devd import leftovers, processes, protocol
from devd.handlers.holders import ForeignHolders
from devd.proxy import api as proxy_api
from devd.services import supervisor
from devd.watchers import api as watchers_api

if TYPE_CHECKING:
    from devd.handlers import Service
    from devd.registry import Resource, Worktree

log = logging.getLogger("devd")
SETTLE_SECONDS = 0.5  # after a change, the next pass waits this long for the burst to end
IDLE_SECONDS = 60.0  # the cadence rests this long after the last status request
ORPHAN_SCAN_MAX_AGE = 30.0  # it connects to servers: one that is down costs its timeout
CATCH_UP_SECONDS = 2.0  # a request waits this long at most for a pass it asked for
FIRST_PASS_SECONDS = 30.0  # ... or for the first one, without which it has nothing to show
FRESH_WAIT_SECONDS = 5.0  # `fresh` waits this long at most for a pass under way to end


class StatusSnapshot:
    """Described worktrees (each with the records it was described from), the listening
    ports and gone worktrees' processes of the last pass, and the answer built from them."""

    def __init__(self, service: Service, refresh: float) -> None:
        self._service = service
        self._refresh = refresh
        self._lock = threading.Lock()  # guards the fields below; never held while checking
        self._passing = threading.Lock()  # held for a full pass: one at a time
        self._described: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._listening: set[int] = set()
        self._running: dict[str, list[dict[str, Any]]] = {}
        self._holders = ForeignHolders()
        self._foreign: dict[str, list[dict[str, Any]]] = {}  # see holders.py
        self._checked_at: float | None = None
        self._failure: str | None = None  # why the last pass failed, if it did
        self._passing = threading.Lock()  # one pass at a time
        self._passed = threading.Condition()  # notified with each pass's end
        self._passes = 0  # passes ended (guarded by _passed)
        self._hurry = False  # a request waits for the next pass: no settling first
        self._answer: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        # ^ (what _version() said, the answer built then)
        # Per form (json_text, encoded): (the answer it was made of, it).
        self._forms: dict[str, tuple[dict[str, Any], Any]] = {}
        self._asked = -math.inf  # when status was last asked (time.monotonic())
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="devd-status", daemon=True)

    # -- the cadence ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self._asked < IDLE_SECONDS:
                self.check_all()
            if self._wake.wait(self._refresh) and not self._stop.is_set() and not self._hurry:
                self._stop.wait(SETTLE_SECONDS)
            self._hurry = False
            self._wake.clear()

    def check_all(self, wait: float = -1) -> None:
        """One full pass, one at a time (`wait`: seconds at most for the one under way, else
        none is run); a pass that fails keeps the last one's answer and says why: the daemon
        and `devd status` must outlive a check that throws."""
        if not self._passing.acquire(timeout=wait):
            return  # one is stuck: the answer is the last pass's, and says when it ran
        try:
            self._check_all()
            failure = None
        except Exception as exc:  # the log has the traceback
            log.exception("status pass failed")
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            self._passing.release()
        with self._lock:
            if failure != self._failure:
                self._answer = None
            self._failure = failure
        with self._passed:
            self._passes += 1
            self._passed.notify_all()

    def _catch_up(self) -> None:
        """Have the cadence run a pass now and wait for it, CATCH_UP_SECONDS at most: a slow
        pass must not hold up every `devd status` (the answer then says when it was checked)."""
        with self._passed:
            ended = self._passes
            self._hurry = True
            self._wake.set()
            self._passed.wait_for(lambda: self._passes != ended, CATCH_UP_SECONDS
                                  if self._checked_at is not None else FIRST_PASS_SECONDS)

    def _check_all(self) -> None:
        """Every check, every /proc pass; then the answer is rebuilt."""
        service = self._service
        worktrees, resources = service.registry.worktrees(), service.registry.all_resources()
        described = {}
        for wt in worktrees:
            described[wt.id] = self._describe(wt, resources.get(wt.id, []))
            time.sleep(0)  # let a waiting request have the GIL: this pass is in no hurry
        listening = processes.all_listening_ports()
        running = leftovers.running([w for w in worktrees if w.state == "gone"],
                                    service.registry)
        foreign = self._holders.scan(worktrees, {
            wt.id: described[wt.id][1].get("ports", {}) for wt in worktrees
            if wt.state != "gone"}, service.registry)
        service.orphans(max_age=ORPHAN_SCAN_MAX_AGE)
        with self._lock:
            self._described, self._listening, self._running = described, listening, running
            self._foreign = foreign
            self._checked_at = time.time()
            self._answer = None

    # -- requests --------------------------------------------------------------------

    def status(self, path: str | None = None, fresh: bool = False) -> dict[str, Any]:
        """The answer to `status`: all worktrees from the snapshot, or one checked now."""
        service = self._service
        service.notice_missing()  # a stat each: a deleted directory reads gone at once
        if (fresh or path is not None) and service.watchers is not None:
            service.watchers.refresh(max_age=0.0 if fresh else 2.0)  # as status did
        self._asked = time.monotonic()
        if fresh and path is None:
            self.check_all(wait=FRESH_WAIT_SECONDS)
        elif self._stale() and not (self._checked_at is None and self._passing.locked()):
            self._catch_up()  # (the first pass under way: answered unchecked, see _current)
        if path is not None:  # one worktree, checked now, as `devd wait` needs
            wt = service.find(path)
            running = leftovers.running([wt] if wt.state == "gone" else [], service.registry)
            return self._assemble([wt], {wt.id: self._describe(
                wt, service.registry.resources(wt.id))}, running)
        version = self._version()
        with self._lock:
            if self._answer is not None and self._answer[0] == version:
                return self._answer[1]
        answer = self._current()
        with self._lock:
            self._answer = (version, answer)
        return answer

    def json_text(self) -> str:
        """`devd status --json`'s text of the current answer (indenting is slow in pure
        Python: made once per answer)."""
        return self._memo("json", lambda answer: json.dumps(answer, indent=2,
                                                             ensure_ascii=False))

    def encoded(self) -> protocol.Encoded:
        """The current answer as the wire carries it, encoded once per answer."""
        return self._memo("wire", protocol.Encoded)

    def _memo(self, form: str, make: Callable[[dict[str, Any]], Any]) -> Any:
        answer = self.status()
        with self._lock:
            made = self._forms.get(form)
            if made is not None and made[0] is answer:
                return made[1]
        value = make(answer)
        with self._lock:
            self._forms[form] = (answer, value)
        return value

    def forget(self, wt_id: str) -> None:
        """Describe the worktree again in the next answer, though its records read the same
        (a provision that fixed a hand-edited .env or a stopped server rewrites none)."""
        with self._lock:
            self._described.pop(wt_id, None)
            self._answer = None

    def _version(self) -> tuple[Any, ...]:
        """What the answer is built from, besides this pass: the registry's generation, the
        watcher monitor's latest full pass, the services' states and the proxy's."""
        service = self._service
        monitor, proxy = service.watchers, service.proxy
        view = monitor.peek() if monitor is not None else None  # never waits for a pass
        return (service.registry.generation, view.sample.at if view else None,
                supervisor.CHANGES, repr(proxy.status()) if proxy is not None else None)

    def _stale(self) -> bool:
        """No pass yet, or none for a while (the cadence rests while nobody asks)."""
        checked = self._checked_at
        return checked is None or time.time() - checked > 2 * self._refresh + SETTLE_SECONDS

    def _current(self) -> dict[str, Any]:
        """The snapshot brought up to the registry: a worktree whose records changed since
        its last description is described again (its checks run now), the rest reused."""
        service = self._service
        worktrees, resources = service.registry.worktrees(), service.registry.all_resources()
        with self._lock:
            described = dict(self._described)
        changed = False
        first = self._checked_at is None  # no pass yet: it is under way (see status)
        for wt in worktrees:
            records = resources.get(wt.id, [])
            if wt.id not in described and first:
                described[wt.id] = _key(wt, records), service.describe(wt, records, check=False)
            elif wt.id not in described or described[wt.id][0] != _key(wt, records):
                described[wt.id] = self._describe(wt, records)
                changed = True
        if changed:
            self._wake.set()  # the listener and process passes follow soon
            with self._lock:  # the checked ones only: a pass replaces the unchecked
                self._described = {**self._described, **{
                    k: v for k, v in described.items() if v[1].get("checked", True)}}
        return self._assemble(worktrees, described)

    def _describe(self, wt: Worktree, records: list[Resource]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _key(wt, records), self._service.describe(wt, records)

    def _assemble(self, chosen: list[Worktree],
                  described: dict[str, tuple[tuple[Any, ...], dict[str, Any]]],
                  running: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
        """The wire shape: ISO times, `listening` per port name, the watcher summary
        without its top list (`devd watchers` shows that); copies, so the cached
        descriptions are never changed."""
        from devd.handlers import services as services_api  # it imports core, which us

        service = self._service
        with self._lock:
            listening, checked_at, failure = self._listening, self._checked_at, self._failure
            foreign = self._foreign
            running = self._running if running is None else running
        checked = all(described[wt.id][1].get("checked", True) for wt in chosen)
        # ^ False: answered before the first pass, which must not be waited on here
        entries = []
        for wt in chosen:
            entry = dict(described[wt.id][1])
            entry["gone_at"] = iso_utc(entry.get("gone_at"))
            entry["listening"] = {name: port in listening
                                  for name, port in entry.get("ports", {}).items()}
            if wt.id in running:
                entry["processes"] = running[wt.id]
            if wt.id in foreign and wt.state != "gone":
                entry["foreign_holders"] = foreign[wt.id]
            entries.append(entry)
        result = proxy_api.add_to_status(service, watchers_api.add_to_status(service, {
            "schema": STATUS_SCHEMA,
            "checked_at": iso_utc(checked_at),
            "check_error": failure,
            "check_interval_seconds": self._refresh,
            "daemon": service.daemon_info(),
            "worktrees": services_api.add_to_status(service, entries, chosen),
            "orphans": service.orphans(max_age=math.inf, scan=checked),
        }, wait=checked))
        budget = result.get("watchers")
        if budget:
            budget.pop("top", None)
            budget["sampled_at"] = iso_utc(budget.get("sampled_at"))
        return result


def _key(wt: Worktree, records: list[Resource]) -> tuple[Any, ...]:
    """What a description depends on in the registry: the worktree's row and records."""
    return wt, repr(records)


STATUS_SCHEMA = 1  # bumped only when a key of `status --json` changes meaning or goes


def iso_utc(epoch: float | None) -> str | None:
    """An epoch time as ISO 8601 UTC (`2026-12-03T15:14:03Z`), None kept."""
    if epoch is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds") \
        .replace("+00:00", "Z")
