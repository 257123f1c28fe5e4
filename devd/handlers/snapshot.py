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
- one pass at a time: a request that finds the snapshot stale while a pass is under way
  (a burst right after the daemon starts) does not wait for it nor start its own; it
  answers from the last pass, and a worktree no pass has described yet from the registry
  alone (`"checked": false`, no resource checked), so a burst never fills the handler slots.
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
        self._checked_at: float | None = None
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
            try:
                if time.monotonic() - self._asked < IDLE_SECONDS:
                    self.check_all()
            except Exception:  # the daemon must outlive a bad pass; the log says what
                log.exception("status pass failed")
            if self._wake.wait(self._refresh) and not self._stop.is_set():
                self._stop.wait(SETTLE_SECONDS)
            self._wake.clear()

    def check_all(self, wait: bool = True) -> bool:
        """One full pass: every check, every /proc pass; then the answer is rebuilt.
        With `wait=False` nothing is done while another pass is under way (False)."""
        if not self._passing.acquire(blocking=wait):
            return False
        try:
            self._pass()
        finally:
            self._passing.release()
        return True

    def _pass(self) -> None:
        service = self._service
        worktrees, resources = service.registry.worktrees(), service.registry.all_resources()
        described = {}
        for wt in worktrees:
            described[wt.id] = self._describe(wt, resources.get(wt.id, []))
            time.sleep(0)  # let a waiting request have the GIL: this pass is in no hurry
        listening = processes.all_listening_ports()
        running = leftovers.running([w for w in worktrees if w.state == "gone"],
                                    service.registry)
        service.orphans(max_age=ORPHAN_SCAN_MAX_AGE)
        with self._lock:
            self._described, self._listening, self._running = described, listening, running
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
            self.check_all()
        elif self._stale():
            self.check_all(wait=False)  # under way already: answer from what is known
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
            listening, checked_at = self._listening, self._checked_at
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
            entries.append(entry)
        result = proxy_api.add_to_status(service, watchers_api.add_to_status(service, {
            "schema": STATUS_SCHEMA,
            "checked_at": iso_utc(checked_at),
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
