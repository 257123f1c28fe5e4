"""Container mode: one Postgres container per worktree through the Docker SDK.

A named volume holds the data, labels mark devd's ownership and the worktree id, the port is
a leased devd port published on 127.0.0.1 only. The docker package is imported lazily so a
daemon whose repos never use container mode does not pay for it.
"""

from __future__ import annotations

import io
import logging
import sys
import tarfile
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from devd import instance
from devd.containers import engine, volumes
from devd.errors import DevdError
from devd.postgres import clones, datadirs, dump, names, server, snapshots
from devd.postgres.records import mark_dropping, record_intent
from devd.provisioners.base import Context, Health, Progress
from devd.provisioners.ports import lease_internal

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

log = logging.getLogger(__name__)

PORT_LEASE = "_postgres"
DATA_DIR = "/var/lib/postgresql/data"
READY_TIMEOUT = 90.0
SUPERUSER = DBNAME = "postgres"


def client() -> DockerClient:
    return engine.client(hint='or use [postgres] mode "schema" or "database" with a running '
                         "server")


def ours(tags: dict[str, str], wt_id: str) -> bool:
    """Labelled for this worktree by this instance, or by a devd from before instance labels
    (Docker cannot relabel, so such a container or volume keeps its old labels)."""
    return tags.get(names.LABEL_OWNER) == wt_id and \
        tags.get(names.LABEL_INSTANCE, instance.current()) == instance.current()


def ensure(ctx: Context, progress: Progress) -> dict[str, Any]:
    import docker

    dk, wt_id = client(), ctx.worktree.id
    name, port = names.docker_name(wt_id), lease_internal(ctx, PORT_LEASE)
    server.remember(ctx.paths, server.DOCKER)
    recorded, snapshot = ctx.recorded("postgres"), ctx.config.postgres.snapshot
    if bool(recorded.get("snapshot")) != bool(snapshot) and recorded.get("initialized"):
        raise _data_source_changed(recorded, snapshot)
    # Read before record_intent names the volume: a first provision has no data to lose.
    had_data = _had_data(recorded)
    record_intent(ctx, mode="container", name=name, container=name, port=port,
                  host="127.0.0.1", image=ctx.config.postgres.image,
                  **({"snapshot": snapshot} if snapshot else {"volume": name}))
    try:
        # Every name claimed before anything is made: a conflict leaves nothing behind.
        container = _owned(dk.containers, name, wt_id)
        if container is not None and _published_port(container) != port:
            progress("postgres", f"container {name} publishes another port: recreating it "
                     "(the data stays in its volume)")
            container.remove(force=True)
            container = None
        password = _password(container) or ctx.recorded("postgres").get("password") \
            or names.new_password()
        record_intent(ctx, password=password)
        if snapshot:
            container = _on_clone(dk, ctx, container, password, progress)
        elif _owned(dk.volumes, name, wt_id) is None:
            if had_data:
                progress("postgres", f"volume {name} was deleted: starting with an empty one",
                         level="warning")
            dk.volumes.create(name, labels=engine.labels(wt_id, "postgres"))
        if container is None:
            container = _create(dk, ctx, ctx.recorded("postgres"), password, progress)
        elif container.status == "created":  # made beside the clone, not started yet
            progress("postgres", f"starting container {name} from {ctx.config.postgres.image} "
                     f"on 127.0.0.1:{port}")
            container.start()
        elif container.status != "running":
            progress("postgres", f"starting stopped container {name}")
            container.start()
    except docker.errors.APIError as exc:
        raise _api_error(exc, name, port) from exc
    recorded = ctx.recorded("postgres")
    _wait_ready(container, port, password, progress, recorded.get("snapshot_password"),
                fresh=bool(recorded.get(clones.FRESH)))
    # "initialized": the server came up on this volume once, so it may hold data to dump.
    return {"mode": "container", "name": name, "host": "127.0.0.1", "port": port,
            "user": SUPERUSER, "database": DBNAME, "password": password,
            "image": ctx.config.postgres.image, "container": name, "initialized": True} | {
        key: recorded[key] for key in ("volume", *clones.FIELDS) if key in recorded}


def _on_clone(dk: DockerClient, ctx: Context, container: Container | None, password: str,
              progress: Progress) -> Container | None:
    """The worktree's clone of its snapshot (made if it has none), and its container: one
    that is missing is created (not started) meanwhile, `docker create` and the clone each
    taking ~0.2-0.7 s on a loaded machine. If the clone fails, that container goes too."""
    image = ctx.config.postgres.image
    major = image_major(dk, image)
    if container is not None:
        record_intent(ctx, **clones.ensure(ctx, major, progress))
        return container
    ensure_image(dk, image, progress)  # first: a pull's progress is the request thread's
    detail = ctx.recorded("postgres") | {
        "data_dir": str(clones.clone_root(ctx.paths, ctx.worktree.id) / datadirs.PGDATA)}
    with ThreadPoolExecutor(1, thread_name_prefix="devd-pg-create") as pool:
        made = pool.submit(_new, dk, ctx, detail, password)
        try:
            record_intent(ctx, **clones.ensure(ctx, major, progress))
        except BaseException:
            _discard(made)
            raise
        return made.result()


def _discard(made: Future[Container]) -> None:
    """Remove the container `made` created, once it has."""
    try:
        created = made.result()
    except Exception:  # noqa: BLE001 - the create failed too: nothing was made
        return
    try:
        created.remove(force=True)
    except Exception:  # logged: it is labelled ours, and the next provision reuses it
        log.exception("container %s, created beside a failed clone, was not removed",
                      created.name)


def _data_source_changed(recorded: dict[str, Any], snapshot: str) -> DevdError:
    now = f"snapshot {snapshot!r}" if snapshot else "a volume of its own"
    was = f"snapshot {recorded.get('snapshot')!r}" if recorded.get("snapshot") else "a volume"
    return DevdError(f"this worktree's container keeps its data in {was}; devd.toml now says "
                     f"{now}", "run `devd release --yes` first (a dump is kept), then "
                     "provision again", code="config")


def image_major(dk: DockerClient, image: str) -> str | None:
    """The PostgreSQL major version an image runs, if it says (PG_MAJOR, as the official
    images set it); None if unknown, and the server's own refusal will say."""
    import docker

    try:
        env = dk.images.get(image).attrs.get("Config", {}).get("Env") or []
    except docker.errors.ImageNotFound:
        return None
    found = [item.split("=", 1)[1] for item in env if item.startswith("PG_MAJOR=")]
    return found[0] if found else None


def _mount(detail: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The data's source: the worktree's clone (a host path) or its named volume."""
    source = detail.get("data_dir") if detail.get("snapshot") else detail["container"]
    return {str(source): {"bind": DATA_DIR, "mode": "rw"}}


def _had_data(recorded: dict[str, Any]) -> bool:
    """A volume was recorded and a server came up on it: its loss is news, not a first run."""
    return bool(recorded.get("volume") and recorded.get("initialized"))


def _owned(collection: Any, name: str, wt_id: str) -> Any:
    """The container or volume named `name` if it carries our label; None if absent."""
    return engine.owned(collection, name, wt_id, accept=ours)


def _published_port(container: Container) -> int | None:
    if container.attrs.get("HostConfig", {}).get("NetworkMode") == "host":
        env = dict(item.split("=", 1) for item in container.attrs["Config"].get("Env") or [])
        return int(env.get("PGPORT") or 0) or None
    bindings = container.attrs.get("HostConfig", {}).get("PortBindings") or {}
    for binding in bindings.get("5432/tcp") or []:
        return int(binding.get("HostPort") or 0) or None
    return None


def _password(container: Container | None) -> str | None:
    if container is None:
        return None
    for item in container.attrs.get("Config", {}).get("Env") or []:
        if item.startswith("POSTGRES_PASSWORD="):
            return str(item.split("=", 1)[1])
    return None


def _create(dk: DockerClient, ctx: Context, detail: dict[str, Any], password: str,
            progress: Progress) -> Container:
    image, name, port = ctx.config.postgres.image, detail["container"], int(detail["port"])
    ensure_image(dk, image, progress)
    progress("postgres", f"starting container {name} from {image} on 127.0.0.1:{port}")
    container = _new(dk, ctx, detail, password)
    container.start()
    return container


def _new(dk: DockerClient, ctx: Context, detail: dict[str, Any], password: str) -> Container:
    """The worktree's container, created (not started) on its data."""
    return dk.containers.create(
        ctx.config.postgres.image, name=detail["container"],
        labels=engine.labels(ctx.worktree.id, "postgres"), volumes=_mount(detail),
        user=snapshots.run_as() if detail.get("snapshot") else None,
        **_network(dk, detail, {"POSTGRES_PASSWORD": password, "POSTGRES_USER": SUPERUSER,
                                "POSTGRES_DB": DBNAME}))


def _network(dk: DockerClient, detail: dict[str, Any], environment: dict[str, str]
             ) -> dict[str, Any]:
    """How the server is reached on 127.0.0.1:port. A snapshot's clone shares the host's
    network and listens on 127.0.0.1:port itself: no bridge endpoint and no proxy process to
    set up, ~0.3-0.5 s of each start on a loaded machine; the snapshot's own pg_hba.conf
    asks every TCP login for its password. Elsewhere, and where the engine's host network is
    not this machine's (Docker Desktop, rootless Docker), a port published on 127.0.0.1."""
    port = int(detail["port"])
    if detail.get("snapshot") and _host_network_is_ours(dk):
        # PGPORT: the server's default port, and psql's and pg_dump's in `docker exec`.
        return {"network_mode": "host", "environment": environment | {"PGPORT": str(port)},
                "command": ["postgres", "-c", "listen_addresses=127.0.0.1", "-c",
                            f"port={port}"]}
    # Listen on the container's interface whatever the image's postgresql.conf says.
    return {"ports": {"5432/tcp": ("127.0.0.1", port)}, "environment": environment,
            "command": ["postgres", "-c", "listen_addresses=*"]}


def _host_network_is_ours(dk: DockerClient) -> bool:
    # libpq 16's require_auth: the readiness probe's only way to tell the clone from
    # whatever else may listen on its port meanwhile (_connect). Older: a published port.
    if not sys.platform.startswith("linux") or psycopg.pq.version() < 160000:
        return False
    options = " ".join(dk.info().get("SecurityOptions") or [])
    return "rootless" not in options


def ensure_image(dk: DockerClient, image: str, progress: Progress) -> None:
    engine.ensure_image(dk, image, progress, "postgres", _PULL_HINT)


_PULL_HINT = "check the name and your registry access, or set [postgres] image to a local image"


def _api_error(exc: Any, name: str, port: int) -> DevdError:
    text = str(getattr(exc, "explanation", None) or exc)
    if "address already in use" in text or "port is already allocated" in text:
        return DevdError(f"container {name}: port 127.0.0.1:{port} was taken by another process",
                         f"see `devd ports`; stop the holder of {port}, then provision again",
                         code="docker_error")
    return DevdError(f"Docker refused for container {name}: {text}",
                     "see `docker logs " + name + "`", code="docker_error")


def _wait_ready(container: Container, port: int, password: str, progress: Progress,
                first: str | None = None, fresh: bool = False) -> None:
    """Ready means a real query answers over the published port, not just an open port.
    `first`: the password a clone's data comes with (its snapshot's), swapped for this
    worktree's own on the first connection; `fresh`: the data was cloned since, so that
    connection is tried first (one login where a refused one would come before it)."""
    synced = False
    mutual = _shares_host_network(container)

    def answers() -> bool:
        nonlocal synced, fresh
        if fresh and first:
            try:
                with _connect(port, first, mutual) as conn:
                    conn.execute(_password_statement(password))
                synced = True
                return True
            except psycopg.OperationalError as exc:
                if "password authentication failed" not in str(exc):
                    return False  # not up yet
                fresh = False  # it has another password after all: the usual way below
        try:
            with _connect(port, password, mutual) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError as exc:
            if "password authentication failed" not in str(exc) or synced:
                return False
        # A container recreated over an existing volume keeps the old password.
        _set_password(container, port, password, first, mutual)
        synced = True
        return answers()

    progress("postgres", "waiting for the server to answer")
    engine.wait_ready(container, answers, READY_TIMEOUT, _explain(container))


def _shares_host_network(container: Container) -> bool:
    return bool(container.attrs.get("HostConfig", {}).get("NetworkMode") == "host")


def _connect(port: int, password: str, mutual: bool = False) -> psycopg.Connection[Any]:
    """`mutual`: the server must prove it knows the password (SCRAM's server signature).
    A clone on the host's network listens on 127.0.0.1:port itself, so whatever else holds
    that port (a local server that trusts every login, say) would answer the probe: it is
    neither sent a password nor taken for the clone, whose pg_hba.conf asks for SCRAM."""
    extra: dict[str, Any] = {"require_auth": "scram-sha-256"} if mutual else {}
    return psycopg.connect(host="127.0.0.1", port=port, user=SUPERUSER, password=password,
                           dbname=DBNAME, connect_timeout=3, autocommit=True, **extra)


def _password_statement(password: str) -> sql.Composed:
    # A SCRAM verifier whatever the data's password_encryption says (the snapshot's hba asks
    # for SCRAM), made here: the server, its log and its statistics never see the password.
    return sql.SQL("ALTER ROLE {} PASSWORD {}").format(
        sql.Identifier(SUPERUSER), sql.Literal(names.scram_verifier(password)))


def _set_password(container: Container, port: int, password: str, first: str | None,
                  mutual: bool = False) -> None:
    """Give the superuser `password`: over a connection with `first` if that opens one (one
    round trip), else through psql inside the container (local trust; ~0.4 s)."""
    statement = _password_statement(password)
    if first:
        try:
            with _connect(port, first, mutual) as conn:
                conn.execute(statement)
            return
        except psycopg.OperationalError:
            pass  # the data came with another password: the local way below
    _exec(container, ["psql", "-U", SUPERUSER, "-d", DBNAME, "-c", statement.as_string(None)])


def _explain(container: Container) -> Callable[[str], DevdError | None]:
    """A server that refuses its data's version says so in its logs: that, said plainly."""
    return lambda logs: snapshots.version_error(logs, str(container.attrs["Config"]["Image"]))


def _exec(container: Container, argv: list[str], consequence: str = "") -> str:
    # PGAPPNAME: a restore's session is recognisable in pg_stat_activity.
    code, output = container.exec_run(argv, user="postgres",
                                      environment={"PGAPPNAME": "devd-restore"})
    text = output.decode(errors="replace") if output else ""
    if code != 0:
        tail = " / ".join(text.strip().splitlines()[-4:])
        raise DevdError(f"{' '.join(argv[:1])} in {container.name} failed: {tail}"
                        + (f"; {consequence}" if consequence else ""),
                        f"see `docker logs {container.name}`", code="docker_error")
    return text


def check(ctx: Context, detail: dict[str, Any]) -> Health:
    state = container_state(detail.get("container", ""))
    if state == "running":
        return Health(True, "", {"state": state})
    if state == "unknown":
        return Health(False, f"container {detail.get('container')}: Docker does not answer "
                      "(start the Docker engine, or set DOCKER_HOST)", {"state": state})
    return Health(False, f"container {detail.get('container')} is {state} "
                  "(`devd provision` starts or recreates it)", {"state": state})


def container_state(name: str) -> str:
    """running, stopped, missing, or unknown when Docker does not answer."""
    import docker

    try:
        found = engine.ask(lambda dk: dk.containers.get(name))
    except docker.errors.NotFound:
        return "missing"
    except (docker.errors.DockerException, engine.Unanswered):
        return "unknown"
    return "running" if found.status == "running" else "stopped"


def check_teardown(ctx: Context, detail: dict[str, Any]) -> None:
    """Read-only: the engine answers and both names are still ours."""
    dk, name = client(), detail["container"]
    container = _owned(dk.containers, name, ctx.worktree.id)
    if _owned(dk.volumes, name, ctx.worktree.id) is not None:
        # Else the server would go and its volume's removal fail: half a release.
        volumes.refuse_in_use(dk, name, {container.id} if container else set(),
                              f"of Postgres container {name}")
    if detail.get("snapshot"):
        datadirs.read_marker(clones.clone_root(ctx.paths, ctx.worktree.id), datadirs.CLONE_MARKER)


def back_up(ctx: Context, detail: dict[str, Any]) -> dict[str, Any]:
    """Phase 1 of a release: the dump, then the server stopped, so nothing is written that
    the dump does not hold while the other resources are backed up."""
    dk, wt_id, name = client(), ctx.worktree.id, detail["container"]
    container, volume = _owned(dk.containers, name, wt_id), _owned(dk.volumes, name, wt_id)
    if not _holds_data(detail, volume):
        return {}
    was_running = container is not None and container.status == "running"
    container = _backup(ctx, dk, container, detail)
    tests = _test_databases(container)
    container.stop(timeout=30)
    return {"dump": ctx.outputs["dumps"][-1], "running": was_running, "test_databases": tests}


def resume(ctx: Context, detail: dict[str, Any], made: dict[str, Any]) -> None:
    """The server runs again if it ran before the backup."""
    if made.get("running"):
        found = _owned(client().containers, detail["container"], ctx.worktree.id)
        if found is not None:
            found.start()


def _holds_data(detail: dict[str, Any], volume: Any) -> bool:
    # A volume whose server never came up (say, the image could not be pulled) holds nothing.
    clone = detail.get("snapshot") and Path(detail.get("data_dir", "")).is_dir()
    return bool((volume is not None or clone) and detail.get("initialized"))


def teardown(ctx: Context, detail: dict[str, Any]) -> None:
    import docker

    dk, wt_id, name = client(), ctx.worktree.id, detail["container"]
    container, volume = _owned(dk.containers, name, wt_id), _owned(dk.volumes, name, wt_id)
    clone = detail.get("snapshot") and Path(detail.get("data_dir", "")).is_dir()
    made = ctx.made.get("postgres")
    if ctx.backup and made is None and _holds_data(detail, volume):
        container = _backup(ctx, dk, container, detail)
    if made:  # dumped and stopped in phase 1; it knew the test databases then
        ctx.outputs.setdefault("test_databases_dropped", []).extend(made["test_databases"])
    elif container is not None and container.status == "running":
        ctx.outputs.setdefault("test_databases_dropped", []).extend(_test_databases(container))
    if container is not None or volume is not None or clone:
        mark_dropping(ctx)
    try:
        engine.remove(container, volume)
    except docker.errors.APIError as exc:
        raise _api_error(exc, name, int(detail.get("port", 0))) from exc
    if detail.get("snapshot"):
        clones.remove(ctx.paths, wt_id)
    ctx.registry.release_leases(wt_id, {PORT_LEASE})
    dump.prune(ctx.paths)


def _test_databases(container: Container) -> list[str]:
    """The test runners' databases in the container: they go with its volume, undumped."""
    listing = _exec(container, ["psql", "-U", SUPERUSER, "-d", DBNAME, "-Atc",
                                "SELECT datname FROM pg_database WHERE datname LIKE 'test\\_%'"])
    return listing.split()


def _backup(ctx: Context, dk: DockerClient, container: Container | None,
            detail: dict[str, Any], target: Path | None = None) -> Container:
    """pg_dump inside the container (its own client matches its server's version) into
    `target` (a new dump path by default); returns the container, started (or recreated
    over the volume) for the dump."""
    if container is None:
        # The volume outlived its container: bring the data up once more to dump it.
        container = _create(dk, ctx, detail, detail["password"], lambda *a, **k: None)
    elif container.status != "running":
        container.start()
    _wait_ready(container, int(detail["port"]), detail["password"], lambda *a, **k: None,
                detail.get("snapshot_password"))
    target = target or dump.new_dump_path(ctx.paths, ctx.worktree.id)
    exec_id = dk.api.exec_create(container.id, ["pg_dump", "-Fc", "-U", SUPERUSER, DBNAME],
                                 user="postgres")["Id"]
    errors = []
    try:
        with open(target, "wb") as out:
            for stdout, stderr in dk.api.exec_start(exec_id, stream=True, demux=True):
                if stdout:
                    out.write(stdout)
                if stderr:
                    errors.append(stderr.decode(errors="replace"))
    except OSError as exc:  # a full disk: no truncated dump left for `devd restore` to take
        target.unlink(missing_ok=True)
        raise DevdError(f"writing the dump of {container.name} to {target} failed: {exc}; "
                        "nothing was dropped", "free disk space there, then release again",
                        code="backup_failed") from exc
    if dk.api.exec_inspect(exec_id)["ExitCode"] != 0:
        target.unlink(missing_ok=True)
        raise DevdError(f"pg_dump in {container.name} failed: {''.join(errors).strip()}; "
                        "nothing was dropped", "fix the cause, or pass --no-backup",
                        code="backup_failed")
    ctx.outputs.setdefault("dumps", []).append(str(dump.verify(target)))
    return container


def restore(ctx: Context, detail: dict[str, Any], source: Path) -> Path:
    """Dump what is there, then load `source` in one transaction inside the container (its
    own client matches its server); returns the dump of the data as it was before."""
    from devd.postgres import restore as plan

    dk = client()
    container = _owned(dk.containers, detail["container"], ctx.worktree.id)
    if container is None or container.status != "running":
        raise DevdError(f"container {detail['container']} is not running; nothing was changed",
                        "run `devd provision` first", code="docker_error")
    before = dump.new_dump_path(ctx.paths, ctx.worktree.id, plan.BEFORE)
    _backup(ctx, dk, container, detail, before)
    with _tar({"devd-restore.dump": source,
               "devd-prologue.sql": plan.CONTAINER_PROLOGUE.encode()}) as archive:
        container.put_archive("/tmp", archive)
    # --single-transaction keeps large objects' own COMMIT out of psql's one transaction.
    _exec(container, ["pg_restore", "--single-transaction", "--no-owner", "--no-acl", "-f",
                      "/tmp/devd-restore.sql", "/tmp/devd-restore.dump"], "nothing was changed")
    _exec(container, ["psql", "-X", "-q", "-U", SUPERUSER, "-d", DBNAME, "--single-transaction",
                      "-v", "ON_ERROR_STOP=1", "-f", "/tmp/devd-prologue.sql",
                      "-f", "/tmp/devd-restore.sql"],
          "the transaction was rolled back: the data is exactly as before")
    return before


def _tar(files: dict[str, Path | bytes]) -> IO[bytes]:
    """A tar of `files` in a temp file (a dump can be gigabytes: streamed, never in memory)."""
    archive = tempfile.TemporaryFile()  # noqa: SIM115 - returned; the caller closes it
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            if isinstance(data, Path):
                info.size = data.stat().st_size
                with open(data, "rb") as source:
                    tar.addfile(info, source)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    archive.seek(0)
    return archive


def orphans(known_ids: set[str]) -> list[dict[str, str]]:
    """Containers and volumes labelled as this instance's whose worktree the registry no
    longer has. Another instance's are never listed, nor unlabelled-instance (older) ones,
    which may be anyone's."""
    import docker

    mine = {"label": [names.LABEL_OWNER, f"{names.LABEL_INSTANCE}={instance.current()}"]}

    def listed(dk: Any) -> list[tuple[str, str, dict[str, str]]]:
        return [("container", c.name, c.labels) for c in
                dk.containers.list(all=True, filters=mine)] + \
            [("volume", v.name, v.attrs.get("Labels") or {}) for v in
             dk.volumes.list(filters=mine)]

    try:
        found = engine.ask(listed)
    except (docker.errors.DockerException, engine.Unanswered):
        return []
    return [{"kind": kind, "name": name, "worktree_id": owner, "where": "docker"}
            for kind, name, tags in found
            if (owner := tags.get(names.LABEL_OWNER, "")) not in known_ids]


def reset(ctx: Context, detail: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Stop the worktree's server (a fast shutdown: its sessions end) and put a new clone of
    its snapshot in place of its data, which is kept aside; `ensure` starts it again."""
    # detail's snapshot too: a worktree whose data is a volume (devd.toml changed since) has
    # no clone to reset, and stopping its server would leave it down behind a "reset".
    if detail.get("mode") != "container" or not ctx.config.postgres.snapshot \
            or not detail.get("snapshot"):
        raise DevdError(f"{ctx.worktree.path} has no Postgres cloned from a snapshot; nothing "
                        "was changed", 'set [postgres] mode = "container" and snapshot = '
                        '"NAME" in devd.toml, then `devd provision`', code="no_snapshot")
    dk = client()
    container = _owned(dk.containers, detail["container"], ctx.worktree.id)
    major = image_major(dk, ctx.config.postgres.image)
    clones.usable(ctx.paths, ctx.config.postgres.snapshot, major)  # refuse before stopping
    stopping = container if container is not None and container.status == "running" else None
    if stopping is not None:
        progress("postgres", f"stopping {stopping.name} (fast shutdown) while its data is "
                 "cloned")
        stopping.kill(signal="SIGINT")  # only sent: the server shuts down meanwhile

    def stopped() -> None:
        if stopping is not None:
            stopping.wait(timeout=READY_TIMEOUT)

    fields = clones.replace(ctx, major, progress, stopped)
    record_intent(ctx, **{clones.FRESH: True})
    return fields
