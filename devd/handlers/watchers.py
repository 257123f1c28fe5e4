"""Requests about the watcher budget: thin glue to devd/watchers/api.py."""

from __future__ import annotations

from typing import Any

from devd.handlers.core import ServiceCore
from devd.provisioners import Progress
from devd.watchers import api as watchers_api


class WatcherRequests(ServiceCore):
    """The inotify budget: report, preflight, doctor, restart."""

    def do_watchers(self, progress: Progress) -> dict[str, Any]:
        return watchers_api.report(self)

    def do_watchers_preflight(self, progress: Progress, path: str,
                              max_watches: int | None = None, userns: str | None = None,
                              limit_name: str | None = None) -> dict[str, Any]:
        return watchers_api.preflight(self, path, max_watches, userns, limit_name)

    def do_doctor(self, progress: Progress) -> dict[str, Any]:
        return watchers_api.doctor(self)

    def do_watchers_restart(self, progress: Progress, path: str | None = None,
                            max_watches: int | None = None, userns: str | None = None,
                            force: bool = False) -> dict[str, Any]:
        return watchers_api.restart(self, path, max_watches, userns, force)
