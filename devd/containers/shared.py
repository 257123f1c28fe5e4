"""The Redis shared mode: one Redis server per devd instance, a database index per worktree.

Cheaper than a container each, isolated enough for caches and queues keyed by database
(BullMQ, Sidekiq, Celery take a /<db> in their URL). The index is recorded in the worktree's
`containers` resource, so the registry is the lease table; a lock makes choosing one atomic
within the daemon. Release saves the whole server's RDB (`redis-cli --rdb`, its phase 1) before
FLUSHDB of the worktree's index; the file is kept for inspection (a single index cannot be loaded
back into a live shared server without touching the others, so `devd restore` skips it).
gc removes the server (retire) once no worktree leases an index, keeping its volume first.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devd import instance
from devd.containers import compose, engine, volumes
from devd.errors import DevdError, OwnershipConflict
from devd.paths import Paths
from devd.provisioners.base import Context, Progress
from devd.provisioners.ports import is_free
from devd.registry import Registry

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

KIND = "redis-shared"
_choosing = threading.Lock()


def server_name() -> str:
    return f"devd-redis-shared-{instance.current()}"


def _labels() -> dict[str, str]:
    # No owner label: the server is the instance's, never a worktree's orphan.
    return {engine.LABEL_INSTANCE: instance.current(), engine.LABEL_KIND: KIND}


def ensure(ctx: Context, dk: DockerClient, name: str, spec: dict[str, Any],
           progress: Progress) -> dict[str, Any]:
    # Under the lock gc's retire takes: the server is never removed while an index is leased.
    with _choosing:
        container, port = _server(ctx, dk, spec, progress)
        engine.wait_ready(container, lambda: engine.ping(port), spec["timeout"])
        db = _lease_db(ctx, name, container)
    return {"container": container.name, "port": port, "image": spec["image"],
            "shared": True, "db": db, "env": engine.exported(spec["vars"], name, port, db)}


def _server(ctx: Context, dk: DockerClient, spec: dict[str, Any], progress: Progress
            ) -> tuple[Container, int]:
    import docker

    name = server_name()
    try:
        found: Container | None = dk.containers.get(name)
    except docker.errors.NotFound:
        found = None
    if found is not None:
        _refuse_foreign(found)
        if found.status != "running":
            found.start()
        bindings = found.attrs["HostConfig"]["PortBindings"]["6379/tcp"]
        return found, int(bindings[0]["HostPort"])
    # Its port is read back from the container: a port of its own, leased to no worktree.
    port = _free_port(ctx)
    engine.ensure_image(dk, spec["image"], progress, "containers")
    progress("containers", f"starting the shared Redis {name} on {engine.HOST}:{port}")
    try:
        volume = dk.volumes.get(name)
    except docker.errors.NotFound:
        volume = dk.volumes.create(name, labels=_labels())  # labelled: never an unmarked one
    if not _labelled(volume):
        raise OwnershipConflict(f"volume {name} exists but is not labelled as this devd's "
                                "shared Redis", "remove or rename it yourself")
    container = dk.containers.run(spec["image"], name=name, detach=True, labels=_labels(),
                                  ports={"6379/tcp": (engine.HOST, port)},
                                  command=spec["command"] or None,
                                  volumes={name: {"bind": "/data", "mode": "rw"}})
    return container, port


def _labelled(found: Any) -> bool:
    """The container or volume carries this devd's shared-Redis labels."""
    tags = engine.tags_of(found)
    return all(tags.get(key) == value for key, value in _labels().items())


def _refuse_foreign(container: Container) -> None:
    if not _labelled(container):
        raise OwnershipConflict(f"container {container.name} exists but is not labelled as "
                                "this devd's shared Redis; nothing was flushed",
                                "remove or rename it yourself")


def _free_port(ctx: Context) -> int:
    leased = ctx.registry.leased_ports()
    for port in reversed(ctx.settings.ports):  # from the top: [ports] lease from the bottom
        if port not in leased and is_free(port):
            return port
    raise DevdError("no free port for the shared Redis", "widen DEVD_PORT_RANGE",
                    code="ports_exhausted")


def _lease_db(ctx: Context, name: str, container: Container) -> int:
    """This worktree's index (kept if it has one), else the lowest one no worktree holds."""
    mine = ctx.recorded("containers").get("entries", {}).get(name, {})
    if "db" in mine:
        return int(mine["db"])
    taken = _leased(ctx.registry)
    total = _databases(container)
    free = [db for db in range(total) if db not in taken]
    if not free:
        raise DevdError(f"the shared Redis {container.name} has all of its {total} "
                        "database indexes leased to other worktrees",
                        "release worktrees you no longer need (`devd gc`), or set "
                        "shared = false for this repo's Redis (a container each)",
                        code="redis_full")
    # Recorded before the lock is let go: the next worktree's choice sees it.
    recorded = dict(ctx.recorded("containers").get("entries") or {})
    recorded[name] = {"container": container.name, "shared": True, "db": free[0], "port": 0}
    ctx.registry.set_resource(ctx.worktree.id, "containers", "pending", {"entries": recorded})
    return free[0]


def _leased(registry: Registry) -> set[int]:
    """The indexes worktrees hold (a worktree whose release failed still holds its own)."""
    return {int(entry["db"]) for found in registry.all_resources().values()
            for r in found if r.kind == "containers"
            for entry in (r.detail.get("entries") or {}).values()
            if entry.get("shared") and "db" in entry}


def _databases(container: Container) -> int:
    code, out = container.exec_run(["redis-cli", "CONFIG", "GET", "databases"])
    lines = out.decode().split() if code == 0 else []
    return int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else 16


def server_of(dk: DockerClient, entry: dict[str, Any]) -> Container | None:
    """The worktree's shared server, None if gone; a Redis that merely has its name (not
    this devd's labels) is a conflict: its data is never flushed."""
    import docker

    try:
        container = dk.containers.get(entry["container"])
    except docker.errors.NotFound:
        return None
    _refuse_foreign(container)
    return container


def back_up(dk: DockerClient, entry: dict[str, Any], folder: Path) -> None:
    """An --rdb backup of the whole server into `folder` (release's phase 1)."""
    container = server_of(dk, entry)
    if container is None:
        return  # the server is gone, and its data with it: nothing left to keep
    # A file of this backup's own: two worktrees' releases (each under its own lock) may
    # back the server up at once, and one shared name would have them write over each
    # other's; removed after, or each release would leave a whole RDB in the server.
    inside = f"/tmp/devd-backup-{folder.parent.name}-{folder.name}.rdb"
    target = folder / f"redis-shared-db{int(entry['db'])}.rdb.tar"
    try:
        _run(container, ["redis-cli", "--rdb", inside])
        stream, _ = container.get_archive(inside)
        with open(target, "wb") as out:
            for chunk in stream:
                out.write(chunk)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise DevdError(f"backup of the shared Redis {container.name} into {folder} failed: "
                        f"{exc}; nothing was flushed", "free disk space there, then release "
                        "again", code="backup_failed") from exc
    finally:
        container.exec_run(["rm", "-f", inside])


def flush(dk: DockerClient, entry: dict[str, Any]) -> None:
    """FLUSHDB of the worktree's index (after back_up, unless the release skips backups)."""
    container = server_of(dk, entry)
    if container is not None:
        _run(container, ["redis-cli", "-n", str(int(entry["db"])), "FLUSHDB"])


def _run(container: Container, argv: list[str]) -> None:
    code, out = container.exec_run(argv)
    if code != 0:
        raise DevdError(f"{' '.join(argv)} in {container.name} failed: "
                        f"{out.decode(errors='replace').strip()}; nothing was flushed",
                        f"see `docker logs {container.name}`", code="backup_failed")


def retire(paths: Paths, registry: Registry, backup: bool) -> dict[str, Any]:
    """gc: the server once no worktree leases an index, its RDB kept first (a tarball of its
    volume, in backups/redis-shared/), then the container and its volume removed; only
    what carries this devd's labels. {} when there is no server to retire; a failure is
    said in "reason" (gc's other results stand), the server left as it was."""
    if not engine.used(paths.state_dir):
        return {}
    with _choosing:
        if _leased(registry):
            return {}
        name = server_name()
        try:
            dk = engine.client(timeout=5)
        except DevdError:
            return {}  # the engine is down: like orphans, nothing to do until it is back
        found = [_get(dk.containers, name), _get(dk.volumes, name)]
        if not any(found):
            return {}
        foreign = [f"{kind} {name}" for kind, f in zip(("container", "volume"), found,
                                                      strict=True)
                   if f is not None and not _labelled(f)]
        if foreign:
            return {"name": name, "removed": False,
                    "reason": f"{' and '.join(foreign)} not labelled as this devd's shared "
                              "Redis: left alone"}
        try:
            kept = _remove(paths, dk, found[0], found[1], backup)
        except DevdError as exc:
            return {"name": name, "removed": False, "reason": exc.message}
        return {"name": name, "removed": True} | ({"backup": str(kept)} if kept else {})


def _remove(paths: Paths, dk: DockerClient, container: Container | None, volume: Any,
            backup: bool) -> Path | None:
    import docker

    if volume is not None:  # else the server would go and the volume's removal fail
        volumes.refuse_in_use(dk, volume.name, {container.id} if container else set(),
                              "of the shared Redis")
    try:
        kept = _keep_rdb(paths, dk, container, volume) if backup and volume else None
        engine.remove(container, volume)
    except docker.errors.APIError as exc:
        raise engine.api_error(exc, f"the shared Redis {server_name()}") from exc
    return kept


def _get(collection: Any, name: str) -> Any:
    import docker

    try:
        return collection.get(name)
    except docker.errors.NotFound:
        return None


def _keep_rdb(paths: Paths, dk: DockerClient, container: Container | None, volume: Any
              ) -> Path:
    """The volume as a tarball, the server stopped first (a clean stop writes its RDB out);
    a failed backup starts it again and removes nothing."""
    running = container is not None and container.status == "running"
    if container is not None:
        container.stop(timeout=10)
    # The server's image for the helper; any local one once the container is gone.
    image = str(container.attrs["Image"]) if container is not None else \
        compose.helper_image(dk, server_name())
    folder = volumes.new_backup_dir(paths, KIND, paths.state_dir / "backups" / KIND)
    try:
        return volumes.archive(dk, volume.name, volumes.tarball(folder, KIND), image, KIND)
    except BaseException:
        if running and container is not None:
            container.start()
        shutil.rmtree(folder, ignore_errors=True)
        raise
