"""One method per request (`do_<method>`), grouped by family; the only place that
orchestrates provisioners.

    core.py       the shared state: registry, provisioners, locks, find/describe a worktree
    worktrees.py  status, provision, release, restore, gc, env
    processes.py  ports, kill-port, the records of `devd run`
    services.py   up, down, logs: the declared dev servers
    watchers.py   the watcher budget
    snapshots.py  Postgres snapshots and reset (devd db ...)
"""

from devd.handlers.core import default_provisioners
from devd.handlers.processes import ProcessRequests
from devd.handlers.services import ServiceRequests
from devd.handlers.snapshots import SnapshotRequests
from devd.handlers.watchers import WatcherRequests


class Service(SnapshotRequests, ProcessRequests, ServiceRequests, WatcherRequests):
    """The daemon's state and every request handler."""


__all__ = ["Service", "default_provisioners"]
