"""Snapshots: a consistent copy of a running Postgres cluster, taken without stopping it.

pg_basebackup is PostgreSQL's own online copy: it runs under the backup API, so the source's
sessions go on undisturbed, and `-X stream` brings the WAL that makes the copy consistent.
For a devd container it runs in a helper container from the source's own image (its client
matches its server, and it connects over the source's loopback, which the image trusts for
replication); for a URL, the host's pg_basebackup does. The copy is then started once in a
helper container and shut down cleanly: the snapshot is validated by a real server, and a
clone of it starts at once, without replaying WAL.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devd import instance
from devd.errors import DevdError, OwnershipConflict, UsageError
from devd.naming import SNAPSHOT_NAME
from devd.paths import Paths
from devd.postgres import datadirs, dump, names
from devd.provisioners.base import Progress
from devd.render_status import size_text

if TYPE_CHECKING:
    from docker import DockerClient

log = logging.getLogger(__name__)

IN_CONTAINER = "/var/lib/postgresql/data"
# This daemon process's own mark on its helper containers and partial copies. One daemon
# serves an instance at a time (its lock), so one of this instance with another run's mark
# was left by a daemon that died mid-snapshot (kill -9, a crash): nothing still works on it.
# Partial copies carry the instance's marker too: a data dir may be shared by two instances.
RUN = secrets.token_hex(8)
LABEL_RUN = "devd.run"
STOPPED = ("created", "exited", "dead")  # a helper's states that run nothing
UNLABELLED_AGE = 30 * 60  # seconds: a run-less helper younger than this may be in use
HELPER = "snapshot"  # devd.kind of the helper containers
_LEFTOVER = re.compile(r"\.(.+)\.(partial|dropping)-([0-9a-f]+)")
BACKUP_TIMEOUT = 6 * 3600
READY_LINE = "database system is ready to accept connections"
# A cluster whose configuration lives elsewhere (Debian keeps it in /etc) comes without
# these; a container needs them to start and to be reachable over its published port.
DEFAULT_CONF = "listen_addresses = '*'\n"
# A snapshot's own access rules, whatever its source had: trust only on the container's
# local socket (what `docker exec psql` uses); every TCP login, from 127.0.0.1 too (a clone
# may share the host's network), needs its password.
CLONE_HBA = ("# devd: a snapshot's clones. Local socket: inside the container only.\n"
             "local all all trust\nlocal replication all trust\n"
             "host all all all scram-sha-256\nhost replication all all scram-sha-256\n")


def check_name(name: str) -> str:
    if not SNAPSHOT_NAME.fullmatch(name):
        raise UsageError(f"{name!r} is not a snapshot name",
                         "use lower-case letters, digits, '.', '_' and '-' (up to 63)")
    return name


def run_as() -> str | None:
    """The uid the helper and clone containers run as: a non-root daemon's own, so the files
    stay its; for root, the image's default (its entrypoint hands the data to postgres)."""
    return None if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"


def snapshot_dir(paths: Paths, name: str) -> Path:
    return datadirs.postgres_dir(paths, "snapshots") / check_name(name)


def find(paths: Paths, name: str) -> dict[str, Any]:
    """A snapshot's marker fields with its `path`, or an error naming the ones there are."""
    where = snapshot_dir(paths, name)
    marker = datadirs.read_marker(where, datadirs.SNAPSHOT_MARKER)
    if marker is None:
        known = ", ".join(s["name"] for s in listing(paths)) or "none yet"
        raise DevdError(f"no snapshot named {name!r} (snapshots: {known})",
                        "take one: devd db snapshot NAME", code="snapshot_not_found")
    return marker | {"path": str(where), "pgdata": str(where / datadirs.PGDATA)}


def listing(paths: Paths) -> list[dict[str, Any]]:
    """Every snapshot of this devd, oldest first, with its size on disk."""
    found = []
    for where in sorted(datadirs.postgres_dir(paths, "snapshots").iterdir()):
        if where.name.startswith(".") or not (where / datadirs.SNAPSHOT_MARKER).exists():
            continue
        try:
            marker = datadirs.read_marker(where, datadirs.SNAPSHOT_MARKER) or {}
        except OwnershipConflict:
            continue  # a link, or another instance's: not a snapshot of this devd
        found.append(_public(marker) | {"path": str(where)})
    return sorted(found, key=lambda s: s.get("created", 0))


def take(dk: DockerClient, paths: Paths, name: str, source: Source, image: str,
         progress: Progress) -> dict[str, Any]:
    """Back up `source` into a new snapshot `name`; on any failure nothing is kept."""
    target = snapshot_dir(paths, name)
    if target.exists():
        raise DevdError(f"snapshot {name!r} already exists ({target})",
                        f"drop it first (devd db drop-snapshot {name}) or pick another name",
                        code="snapshot_exists")
    # One daemon per instance and one request per name at a time: any partial copy of this
    # name and instance is a crashed run's.
    for stale in target.parent.iterdir():
        if (found := _LEFTOVER.fullmatch(stale.name)) and found[1] == name and _ours(stale):
            _remove_copy(stale)
    partial = target.with_name(f".{name}.partial-{RUN}")
    partial.mkdir(mode=0o700)
    started = time.monotonic()
    try:
        # Marked at once: the sweep removes only a partial copy with this instance's marker,
        # never a user's directory of a look-alike name, nor another instance's copy under
        # way (two state dirs may share one data dir: XDG_STATE_HOME and XDG_DATA_HOME differ).
        datadirs.write_marker(partial, datadirs.SNAPSHOT_MARKER, name=name, partial=RUN)
        source.backup(dk, partial, progress)
        pgdata = partial / datadirs.PGDATA
        _complete_config(pgdata)
        progress("postgres", "starting the copy once to make it consistent and validate it")
        password = names.new_password()
        _finalize(dk, pgdata, source.image or image, password)
        datadirs.write_marker(partial, datadirs.SNAPSHOT_MARKER, name=name,
                              source=source.label, pg_major=datadirs.major_version(pgdata),
                              image=source.image or image, created=time.time(),
                              bytes=datadirs.allocated(pgdata), password=password)
        os.rename(partial, target)
    except BaseException as exc:
        _remove_copy(partial)
        if type(exc).__module__.startswith("docker"):
            raise DevdError(f"Docker refused while taking snapshot {name!r}: {exc}; nothing "
                            "was kept", "check the engine and the image", code="docker_error"
                            ) from exc
        raise
    seconds = round(time.monotonic() - started, 2)
    return _public(find(paths, name)) | {"seconds": seconds}


def _public(marker: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as replies show it: everything but its superuser's password."""
    return {k: v for k, v in marker.items() if k != "password"}


class Source:
    """Where a snapshot comes from: a devd container, or any server reachable by URL."""

    def __init__(self, label: str, *, container: str = "", url: str = "", image: str = "",
                 max_rate: str = "", password: str = "") -> None:
        self.label, self.container, self.url, self.image = label, container, url, image
        self.max_rate, self.password = max_rate, password

    def _argv(self, target: str) -> list[str]:
        # fast: a checkpoint now rather than at the next scheduled one; stream: the WAL
        # written meanwhile comes along, so the copy is consistent on its own.
        argv = ["-D", target, "-X", "stream", "-c", "fast", "--no-password"]
        return argv + (["--max-rate", self.max_rate] if self.max_rate else [])

    def backup(self, dk: DockerClient, partial: Path, progress: Progress) -> None:
        progress("postgres", f"pg_basebackup of {self.label} (its sessions go on)")
        if self.container:
            self._in_helper(dk, partial, progress)
        else:
            self._on_host(partial, progress)

    def _in_helper(self, dk: DockerClient, partial: Path, progress: Progress) -> None:
        source = dk.containers.get(self.container)
        # In the source's network namespace (a clone's is the host's, on its own port).
        env = dict(item.split("=", 1) for item in source.attrs["Config"].get("Env") or [])
        argv = ["pg_basebackup", "-h", "127.0.0.1", "-p", env.get("PGPORT", "5432"),
                "-U", "postgres", *self._argv(f"/backup/{datadirs.PGDATA}")]
        helper = dk.containers.run(
            self.image, argv, detach=True, user=run_as(), entrypoint=[],
            network_mode=f"container:{source.id}", labels=_helper_labels(),
            environment={"PGPASSWORD": self.password},
            volumes={str(partial): {"bind": "/backup", "mode": "rw"}})
        try:
            code = _wait(lambda: _exited(helper), partial, progress)
            logs = helper.logs().decode(errors="replace").strip()
        finally:
            helper.remove(force=True)
        if code != 0:
            raise _source_failed(self.label, logs)

    def _on_host(self, partial: Path, progress: Progress) -> None:
        import subprocess

        from psycopg.conninfo import conninfo_to_dict

        conninfo, env = dump.libpq_args(self.url, "postgres")
        if self.password and not conninfo_to_dict(self.url).get("password"):
            env["PGPASSWORD"] = self.password  # the caller's (the CLI sends its PGPASSWORD)
        argv = [dump.binary("pg_basebackup"), "-d", conninfo,
                *self._argv(str(partial / datadirs.PGDATA))]
        with subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) as proc:
            code = _wait(proc.poll, partial, progress)
            logs = proc.stderr.read().strip() if proc.stderr else ""
        if code != 0:
            raise _source_failed(self.label, logs)


def _helper_labels() -> dict[str, str]:
    return {names.LABEL_KIND: HELPER, names.LABEL_INSTANCE: instance.current(), LABEL_RUN: RUN}


def leftovers(paths: Paths) -> list[dict[str, str]]:
    """What a daemon killed mid-snapshot left: its helper containers (labelled with this
    instance and another run; another instance's, or an unlabelled one, is never listed)
    and its partial copies in the snapshots dir. Listed by status as orphans."""
    found = [{"kind": "snapshot helper", "name": name, "worktree_id": "", "where": "docker"}
             for name, _ in _dead_helpers(paths).values()]
    return found + [{"kind": "partial snapshot", "name": str(where), "worktree_id": "",
                     "where": "data dir"} for where in _partial_copies(paths)]


def remove_leftovers(paths: Paths) -> list[str]:
    """Remove what leftovers() lists (the next daemon does at start, and `devd gc`); returns
    what went. A Docker that does not answer leaves its helpers for the next time."""
    import docker
    import requests

    gone = []
    if helpers := _dead_helpers(paths):
        try:
            api = docker.from_env(timeout=10).api
            for ident, (name, force) in helpers.items():  # by id: never a name reused since
                try:
                    api.remove_container(ident, force=force)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:  # an unlabelled one started meanwhile
                    log.warning("snapshot helper %s not removed: %s", name, exc)
                    continue
                gone.append(name)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            log.warning("snapshot helpers %s not removed: %s", list(helpers.values()), exc)
    for where in _partial_copies(paths):
        _remove_copy(where)
        gone.append(str(where))
    if gone:
        log.info("removed what a daemon killed mid-snapshot left: %s", ", ".join(gone))
    return gone


def _snapshots_root(paths: Paths) -> Path | None:
    """The snapshots dir if this devd ever took one (no helper can exist otherwise)."""
    root = paths.data_dir / "postgres" / "snapshots"
    return root if root.is_dir() and not root.is_symlink() else None


def _dead_helpers(paths: Paths) -> dict[str, tuple[str, bool]]:
    """{container id: (name, force)} of this instance's helpers that another daemon run
    started. One without a run label (an older devd's) is taken only once it has stopped
    and is older than any snapshot's helper lives (UNLABELLED_AGE), and removed without
    force: the engine refuses to remove it if it was started since (checked as it goes)."""
    import docker
    import requests

    if _snapshots_root(paths) is None:
        return {}
    mine = {"label": [f"{names.LABEL_KIND}={HELPER}",
                      f"{names.LABEL_INSTANCE}={instance.current()}"]}
    try:  # the raw listing: no inspect each, which fails on a helper removed meanwhile
        listed = docker.from_env(timeout=5).api.containers(all=True, filters=mine)
    except (docker.errors.DockerException, requests.RequestException):
        return {}  # an engine that does not answer: nothing we could remove now
    found = {}
    for c in listed:
        run = (c.get("Labels") or {}).get(LABEL_RUN)
        if run is None and (c.get("State") not in STOPPED
                            or c.get("Created", time.time()) > time.time() - UNLABELLED_AGE):
            continue
        if run != RUN:
            found[c["Id"]] = (c["Names"][0].lstrip("/"), run is not None)
    return found


def _partial_copies(paths: Paths) -> list[Path]:
    root = _snapshots_root(paths)
    if root is None:
        return []
    return sorted(where for where in root.iterdir()
                  if (found := _LEFTOVER.fullmatch(where.name)) and found[3] != RUN
                  and _ours(where))


def _ours(where: Path) -> bool:
    """A partial or dropped copy this instance made: a directory (not a link) with its
    snapshot marker. Anything else of a look-alike name is not devd's to remove."""
    try:
        return where.is_dir() and datadirs.read_marker(where, datadirs.SNAPSHOT_MARKER) is not None
    except OwnershipConflict:
        return False


def _exited(helper: Any) -> int | None:
    helper.reload()
    if helper.status in ("exited", "dead"):
        return int(helper.attrs["State"]["ExitCode"])
    return None


def _wait(done: Callable[[], int | None], partial: Path, progress: Progress) -> int:
    """Poll until the backup ends, saying how much it has copied once a second."""
    deadline, last = time.monotonic() + BACKUP_TIMEOUT, time.monotonic()
    while (code := done()) is None:
        if time.monotonic() > deadline:
            raise DevdError("pg_basebackup did not finish in 6 hours; nothing was kept",
                            "check the source server", code="snapshot_failed")
        if time.monotonic() - last >= 1:
            last = time.monotonic()
            progress("postgres", f"copied {size_text(datadirs.allocated(partial))}")
        time.sleep(0.1)
    return code


def _source_failed(label: str, logs: str) -> DevdError:
    tail = " / ".join(logs.splitlines()[-3:]) or "no output"
    if "No space left" in logs:
        hint = "free space on devd's data dir (`df -h`), then take the snapshot again"
    elif "incompatible server version" in logs:
        hint = "take it with a client of the server's major version (its own image)"
    elif "pg_hba.conf" in logs or "REPLICATION" in logs or "replication" in logs:
        hint = ("pg_basebackup connects for replication: give the URL's role REPLICATION and "
                "allow it in the server's pg_hba.conf (host replication ROLE ADDRESS "
                "scram-sha-256), then reload")
    else:
        hint = "check that the source is up and reachable, then take the snapshot again"
    return DevdError(f"pg_basebackup of {label} failed: {tail}; nothing was kept", hint,
                     code="snapshot_failed")


def _complete_config(pgdata: Path) -> None:
    if not (pgdata / "postgresql.conf").exists():
        (pgdata / "postgresql.conf").write_text(DEFAULT_CONF)
    (pgdata / "pg_hba.conf").write_text(CLONE_HBA)


def _finalize(dk: DockerClient, pgdata: Path, image: str, password: str) -> None:
    """Start a server on the copy (it replays the streamed WAL), give its superuser the
    snapshot's own password, then a clean shutdown. A clone's first connection uses that
    password to set the worktree's (one round trip, where a `docker exec` costs ~0.4 s)."""
    # logging_collector off: its log on stderr, where the ready line is awaited (a source
    # that collects its own log into files would leave nothing to wait for), not in the data.
    helper = dk.containers.run(
        image, ["postgres", "-c", "listen_addresses=", "-c", "logging_collector=off"],
        detach=True, user=run_as(),
        labels=_helper_labels(),
        volumes={str(pgdata): {"bind": IN_CONTAINER, "mode": "rw"}})
    try:
        deadline = time.monotonic() + 600
        while READY_LINE not in (logs := helper.logs().decode(errors="replace")):
            if _exited(helper) is not None or time.monotonic() > deadline:
                raise version_error(logs, image) or DevdError(
                    f"the snapshot's copy did not start in {image}: "
                    f"{' / '.join(logs.strip().splitlines()[-3:])}; nothing was kept",
                    "check the image and the source", code="snapshot_failed")
            time.sleep(0.1)
        code, output = helper.exec_run(
            ["psql", "-X", "-U", "postgres", "-d", "postgres", "-c",
             f"ALTER ROLE postgres PASSWORD '{names.scram_verifier(password)}'"],
            user="postgres")
        if code != 0:
            raise DevdError("the snapshot has no superuser named postgres: "
                            f"{output.decode(errors='replace').strip()}; nothing was kept",
                            "container mode expects the superuser postgres (as the official "
                            "images make it)", code="snapshot_failed")
        helper.kill(signal="SIGINT")  # fast shutdown: a checkpoint, then exit
        helper.wait(timeout=600)
    finally:
        helper.remove(force=True)


def version_error(logs: str, image: str) -> DevdError | None:
    """The server's refusal of a data dir made by another major version, as a DevdError."""
    found = re.search(r"initialized by PostgreSQL version (\d+)[^\n]*compatible with "
                      r"this version ([\d.]+)", logs)
    if not found:
        return None
    return DevdError(f"the data was made by PostgreSQL {found[1]}, and {image} runs "
                     f"{found[2]}", f"use an image of PostgreSQL {found[1]} ([postgres] image)",
                     code="snapshot_version")


def drop(paths: Paths, name: str, users: list[str]) -> dict[str, Any]:
    """Remove a snapshot no worktree's clone comes from (`users`: the paths of those that do)."""
    found = find(paths, name)
    if users:
        raise DevdError(f"snapshot {name!r} is in use by {len(users)} worktree(s): "
                        + ", ".join(users), "release them first (devd release --yes PATH), "
                        "or point their [postgres] snapshot elsewhere and `devd db reset`",
                        code="snapshot_in_use")
    where = Path(found["path"])
    # Renamed aside first: a failure half-way leaves no half snapshot under the real name.
    doomed = where.with_name(f".{name}.dropping-{RUN}")
    os.rename(where, doomed)
    if doomed.is_symlink():  # swapped for a link since find(): rmtree would refuse it anyway
        os.rename(doomed, where)
        raise OwnershipConflict(f"{where} became a symlink while being dropped; nothing was "
                                "removed", "devd never follows a link out of its data dir")
    _remove_copy(doomed)
    return {"dropped": name, "path": str(where)}


def _remove_copy(where: Path) -> None:
    """A snapshot's directory removed data first: one killed meanwhile (a large one takes
    seconds) keeps its marker, so the sweep still knows it as this instance's."""
    datadirs.remove_tree(where / datadirs.PGDATA)
    datadirs.remove_tree(where)
