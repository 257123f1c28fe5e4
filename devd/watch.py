"""Notice worktree removal: watchdog on each repo's <git-common-dir>/worktrees, plus a timer."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from devd import agents

if TYPE_CHECKING:
    from devd.handlers import Service

log = logging.getLogger("devd")
# Several events arrive per `git worktree add/remove`; one reconcile after they settle.
DEBOUNCE = 0.2


class _Nudge(FileSystemEventHandler):
    """Wakes the reconcile loop for events under <common>/worktrees, ignoring git's other files."""

    def __init__(self, wake: threading.Event, common: Path) -> None:
        self._wake = wake
        self._dir = common / "worktrees"

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = Path(str(event.src_path))
        if path == self._dir or self._dir in path.parents:
            self._wake.set()


class RepoWatcher:
    """A stoppable thread that reconciles on a timer and whenever git's worktree list changes."""

    def __init__(self, service: Service, interval: float) -> None:
        self._service = service
        self._interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._observer = Observer()
        self._watches: dict[Path, ObservedWatch] = {}
        self._thread = threading.Thread(target=self._loop, name="devd-reconcile", daemon=True)

    def start(self) -> None:
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._observer.stop()
        self._observer.join(timeout=5)

    def nudge(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sync_watches()
            if self._wake.wait(self._interval) and not self._stop.is_set():
                self._stop.wait(DEBOUNCE)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._service.reconcile()
                self._service.notice_missing()
                agents.sweep(self._service, self._service.settings.agent_grace_seconds)
            except Exception:  # the loop must survive a bad repo; the log says what happened
                log.exception("reconcile failed")

    def _sync_watches(self) -> None:
        """Watch <common>/worktrees of each known repo, and <common> until that dir exists."""
        wanted: dict[Path, Path] = {}
        for common in self._service.registry.repos():
            worktrees = common / "worktrees"
            wanted[worktrees if worktrees.is_dir() else common] = common
        for path in set(self._watches) - set(wanted):
            self._observer.unschedule(self._watches.pop(path))
        for path in set(wanted) - set(self._watches):
            if path.is_dir():
                try:
                    handler = _Nudge(self._wake, wanted[path])
                    self._watches[path] = self._observer.schedule(handler, str(path))
                except OSError as exc:  # e.g. inotify budget exhausted: the timer still works
                    log.warning("cannot watch %s: %s", path, exc)
