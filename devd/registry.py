"""The machine-wide registry: repos, worktrees, their resources, port leases and processes.

SQLite in WAL mode: crash-safe, and the port lease table's primary key makes a port
impossible to lease twice, whatever the threads or processes above it do.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A worktree's error while its release runs (set before the backups), and what the next
# daemon makes of it if that release never ended.
RELEASING = "releasing: backups under way (containers stopped, Postgres logins closed)"
RELEASE_INTERRUPTED = (
    "interrupted: a release stopped mid-way, its backups may have stopped containers and "
    "closed Postgres logins; run `devd release --yes` again to finish it, or `devd "
    "provision` to start them again")

# Each entry migrates the schema from version i to i + 1; never edit a released one.
MIGRATIONS = [
    """
    CREATE TABLE repos (
        id INTEGER PRIMARY KEY,
        common_dir TEXT NOT NULL UNIQUE,
        main_path TEXT NOT NULL,
        name TEXT NOT NULL
    );
    CREATE TABLE worktrees (
        id TEXT PRIMARY KEY,
        repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        path TEXT NOT NULL UNIQUE,
        branch TEXT,
        state TEXT NOT NULL CHECK (state IN ('provisioning', 'ready', 'failed', 'gone')),
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        gone_at REAL
    );
    CREATE TABLE resources (
        worktree_id TEXT NOT NULL REFERENCES worktrees(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'failed')),
        detail TEXT NOT NULL DEFAULT '{}',
        updated_at REAL NOT NULL,
        PRIMARY KEY (worktree_id, kind)
    );
    CREATE TABLE port_leases (
        port INTEGER PRIMARY KEY,
        worktree_id TEXT NOT NULL REFERENCES worktrees(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        UNIQUE (worktree_id, name)
    );
    CREATE TABLE processes (
        pid INTEGER NOT NULL,
        create_time REAL NOT NULL,
        worktree_id TEXT NOT NULL REFERENCES worktrees(id) ON DELETE CASCADE,
        argv TEXT NOT NULL,
        started_at REAL NOT NULL,
        PRIMARY KEY (pid, create_time)
    );
    """,
    # Watcher budget (devd/watchers): what each `devd run` ran and where, so a failed watcher
    # can be restarted; its break records (broken / partial / stopped for idleness), so
    # they survive a daemon restart.
    """
    CREATE TABLE watcher_runs (
        pid INTEGER NOT NULL,
        create_time REAL NOT NULL,
        worktree_id TEXT NOT NULL REFERENCES worktrees(id) ON DELETE CASCADE,
        argv TEXT NOT NULL,
        cwd TEXT NOT NULL,
        PRIMARY KEY (pid, create_time)
    );
    CREATE TABLE watcher_breaks (
        pid INTEGER NOT NULL,
        create_time REAL NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('broken', 'partial', 'stopped')),
        worktree_id TEXT NOT NULL REFERENCES worktrees(id) ON DELETE CASCADE,
        signature TEXT NOT NULL,
        budget TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (pid, create_time, kind)
    );
    """,
]


@dataclass(frozen=True)
class Worktree:
    """A registered worktree, joined with its repo."""

    id: str
    path: Path
    branch: str | None
    state: str
    error: str | None
    gone_at: float | None
    repo_common_dir: Path
    repo_main_path: Path
    repo_name: str


@dataclass(frozen=True)
class Resource:
    """One provisioned thing of a worktree, as recorded."""

    kind: str
    state: str
    detail: dict[str, Any]


class Registry:
    """All registry access; one connection, serialised by a lock (queries take microseconds)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work: committed whole or rolled back whole."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                self._db.executescript(f"BEGIN;{script};PRAGMA user_version={number};COMMIT;")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @property
    def generation(self) -> int:
        """Grows with every row devd writes (the one connection's change count): an answer
        built from the registry is current while this has not moved."""
        with self._lock:
            return self._db.total_changes

    # -- repos and worktrees -------------------------------------------------

    def register(self, wt_id: str, path: Path, branch: str | None, common_dir: Path,
                 main_path: Path, repo_name: str) -> Worktree:
        """Insert or refresh a worktree (and its repo); a gone one comes back as provisioning."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO repos (common_dir, main_path, name) VALUES (?, ?, ?) "
                "ON CONFLICT (common_dir) DO UPDATE SET main_path = excluded.main_path",
                (str(common_dir), str(main_path), repo_name),
            )
            repo_id = db.execute("SELECT id FROM repos WHERE common_dir = ?",
                                 (str(common_dir),)).fetchone()[0]
            db.execute(
                "INSERT INTO worktrees (id, repo_id, path, branch, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'provisioning', ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "branch = excluded.branch, state = 'provisioning', error = NULL, gone_at = NULL, "
                "updated_at = excluded.updated_at",
                (wt_id, repo_id, str(path), branch, now, now),
            )
        found = self.worktree(wt_id)
        assert found is not None
        return found

    def set_state(self, wt_id: str, state: str, error: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE worktrees SET state = ?, error = ?, updated_at = ?, "
                "gone_at = CASE WHEN ? = 'gone' THEN coalesce(gone_at, ?) ELSE NULL END "
                "WHERE id = ?",
                (state, error, time.time(), state, time.time(), wt_id),
            )

    def mark_interrupted(self) -> int:
        """At daemon start: work that was in flight when the last daemon died is failed, so
        status tells the truth; the next provision finishes it (ensure adopts what exists).
        A release in flight had its backups stop containers and close logins: said too."""
        with self.transaction() as db:
            db.execute("UPDATE resources SET state = 'failed', detail = json_set(detail, "
                       "'$.error', 'interrupted: the daemon stopped mid-way') "
                       "WHERE state = 'pending'")
            released = db.execute("UPDATE worktrees SET error = ? WHERE error = ?",
                                  (RELEASE_INTERRUPTED, RELEASING)).rowcount
            return released + db.execute(
                "UPDATE worktrees SET state = 'failed', error = 'interrupted: the daemon "
                "stopped mid-way; run `devd provision` again' WHERE state = 'provisioning'"
            ).rowcount

    def worktree(self, wt_id: str) -> Worktree | None:
        rows = self._worktrees("WHERE w.id = ?", (wt_id,))
        return rows[0] if rows else None

    def worktree_at(self, path: Path) -> Worktree | None:
        rows = self._worktrees("WHERE w.path = ?", (str(path),))
        return rows[0] if rows else None

    def worktrees(self) -> list[Worktree]:
        return self._worktrees("ORDER BY r.name, w.path", ())

    def _worktrees(self, where: str, args: tuple[Any, ...]) -> list[Worktree]:
        with self._lock:
            rows = self._db.execute(
                "SELECT w.*, r.common_dir, r.main_path, r.name AS repo_name FROM worktrees w "
                f"JOIN repos r ON r.id = w.repo_id {where}", args,
            ).fetchall()
        return [
            Worktree(row["id"], Path(row["path"]), row["branch"], row["state"], row["error"],
                     row["gone_at"], Path(row["common_dir"]), Path(row["main_path"]),
                     row["repo_name"])
            for row in rows
        ]

    def live_paths(self) -> list[tuple[str, str]]:
        """(id, path) of every worktree not gone: what a stat per request needs, no more."""
        with self._lock:
            return [(row[0], row[1]) for row in self._db.execute(
                "SELECT id, path FROM worktrees WHERE state != 'gone'")]

    def repos(self) -> list[Path]:
        """Common dirs of repos that still have registered worktrees."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT r.common_dir FROM repos r JOIN worktrees w ON w.repo_id = r.id"
            ).fetchall()
        return [Path(row[0]) for row in rows]

    def forget(self, wt_id: str) -> None:
        """Drop a worktree and everything recorded for it (leases, resources, processes)."""
        with self.transaction() as db:
            db.execute("DELETE FROM worktrees WHERE id = ?", (wt_id,))
            db.execute("DELETE FROM repos WHERE id NOT IN (SELECT repo_id FROM worktrees)")

    # -- resources -----------------------------------------------------------

    def set_resource(self, wt_id: str, kind: str, state: str,
                     detail: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO resources (worktree_id, kind, state, detail, updated_at) "
                "VALUES (?, ?, ?, coalesce(?, '{}'), ?) ON CONFLICT (worktree_id, kind) DO UPDATE "
                "SET state = excluded.state, updated_at = excluded.updated_at, "
                "detail = CASE WHEN ? IS NULL THEN resources.detail ELSE excluded.detail END",
                (wt_id, kind, state, _dump(detail), time.time(), _dump(detail)),
            )

    def resources(self, wt_id: str) -> list[Resource]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, state, detail FROM resources WHERE worktree_id = ? ORDER BY rowid",
                (wt_id,),
            ).fetchall()
        return [Resource(row[0], row[1], json.loads(row[2])) for row in rows]

    def all_resources(self) -> dict[str, list[Resource]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT worktree_id, kind, state, detail FROM resources ORDER BY rowid"
            ).fetchall()
        result: dict[str, list[Resource]] = {}
        for row in rows:
            result.setdefault(row[0], []).append(Resource(row[1], row[2], json.loads(row[3])))
        return result

    def drop_resource(self, wt_id: str, kind: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM resources WHERE worktree_id = ? AND kind = ?",
                             (wt_id, kind))

    # -- port leases ---------------------------------------------------------

    def leases(self, wt_id: str | None = None) -> list[tuple[int, str, str]]:
        """(port, name, worktree id) rows, for one worktree or all."""
        query = "SELECT port, name, worktree_id FROM port_leases"
        args: tuple[Any, ...] = ()
        if wt_id is not None:
            query, args = query + " WHERE worktree_id = ?", (wt_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY port", args).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    def try_lease(self, wt_id: str, name: str, port: int) -> bool:
        """Lease one port; False if it is taken (the primary key decides, not the caller)."""
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO port_leases (port, worktree_id, name) VALUES (?, ?, ?)",
                    (port, wt_id, name),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def leased_ports(self) -> set[int]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT port FROM port_leases")}

    def release_leases(self, wt_id: str, names: set[str] | None = None) -> None:
        """Free a worktree's ports: those named, or all of them."""
        with self.transaction() as db:
            for port, name, _ in self.leases(wt_id):
                if names is None or name in names:
                    db.execute("DELETE FROM port_leases WHERE port = ?", (port,))

    # -- processes started by `devd run` --------------------------------------

    def add_process(self, pid: int, create_time: float, wt_id: str, argv: list[str]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO processes VALUES (?, ?, ?, ?, ?)",
                (pid, create_time, wt_id, json.dumps(argv), time.time()),
            )

    def processes(self) -> list[tuple[int, float, str]]:
        with self._lock:
            rows = self._db.execute("SELECT pid, create_time, worktree_id FROM processes")
            return [(row[0], row[1], row[2]) for row in rows]

    def drop_process(self, pid: int, create_time: float) -> None:
        with self._lock:
            self._db.execute("DELETE FROM processes WHERE pid = ? AND create_time = ?",
                             (pid, create_time))

    # -- watcher runs and their break records (devd/watchers) -------------------------

    def add_watcher_run(self, pid: int, create_time: float, wt_id: str, argv: list[str],
                        cwd: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO watcher_runs VALUES (?, ?, ?, ?, ?)",
                             (pid, create_time, wt_id, json.dumps(argv), cwd))

    def watcher_runs(self) -> list[tuple[int, float, str, list[str], str]]:
        """(pid, create_time, worktree id, argv, cwd) of every recorded run."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM watcher_runs").fetchall()
        return [(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def add_watcher_break(self, pid: int, create_time: float, kind: str, wt_id: str,
                          signature: str, budget: str, reason: str) -> None:
        """Record (or refresh) one break of one run; the latest reason wins."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO watcher_breaks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, create_time, kind, wt_id, signature, budget, reason, time.time()))

    def watcher_breaks(self) -> list[sqlite3.Row]:
        """Every break record, oldest first."""
        with self._lock:
            return self._db.execute("SELECT * FROM watcher_breaks ORDER BY at").fetchall()

    def drop_watcher_run(self, pid: int, create_time: float, kinds: tuple[str, ...] = (),
                         keep_run: bool = False) -> None:
        """Forget a run's break records (only `kinds`, if given) and, unless `keep_run`, the
        run itself."""
        marks = ",".join("?" * len(kinds))
        only = f" AND kind IN ({marks})" if kinds else ""
        with self.transaction() as db:
            db.execute(f"DELETE FROM watcher_breaks WHERE pid = ? AND create_time = ?{only}",
                       (pid, create_time, *kinds))
            if not keep_run:
                db.execute("DELETE FROM watcher_runs WHERE pid = ? AND create_time = ?",
                           (pid, create_time))


def _dump(detail: dict[str, Any] | None) -> str | None:
    return None if detail is None else json.dumps(detail)
