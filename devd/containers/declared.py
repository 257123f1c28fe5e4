"""[containers.NAME]: one container per worktree through the Docker SDK.

Each gets a leased port published on 127.0.0.1, its data in a labelled volume, a readiness
check, and templated variables ({port}, {host}, {db}, {name}). `preset = "redis"` fills in
Redis' image, port, data directory, readiness (a PING over the published port: what the app
will do) and REDIS_URL; `shared = true` puts the worktree on one Redis server instead
(shared.py). Postgres' container mode stays in devd/postgres/container.py (its password,
dump and restore are its own); both share this package's engine helpers' conventions.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devd.containers import engine, shared, volumes
from devd.errors import DevdError
from devd.provisioners.base import Context, Health, Progress, Provisioner
from devd.provisioners.ports import lease_internal
from devd.settings import ContainerConfig

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

KIND = "containers"
LEASE_PREFIX = "_ctr_"
SPEC_LABEL = "devd.spec"
PRESETS: dict[str, dict[str, Any]] = {
    "redis": {"image": "redis:7", "port": 6379, "data": "/data",
              "vars": {"REDIS_URL": "redis://{host}:{port}/{db}"}},
}


def spec_of(config: ContainerConfig) -> dict[str, Any]:
    """The preset's values, overridden by what devd.toml sets."""
    chosen = dict(PRESETS.get(config.preset, {}))
    for key in config.model_fields_set - {"preset"}:
        chosen[key] = getattr(config, key)
    return {key: chosen.get(key, getattr(config, key))
            for key in ContainerConfig.model_fields} | {"preset": config.preset}


def entries(detail: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The recorded containers by name (the detail also carries a failure's error/hint)."""
    return dict(detail.get("entries") or {})


def docker_name(cname: str, wt_id: str) -> str:
    return f"devd-{cname}-{wt_id}"


class ContainersProvisioner(Provisioner):
    kind = KIND
    holds_data = True

    def applies(self, ctx: Context) -> bool:
        return bool(ctx.config.containers) or bool(ctx.recorded(KIND))

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        recorded = entries(ctx.recorded(KIND))
        wanted = {name: spec_of(c) for name, c in ctx.config.containers.items()}
        kept = {n: d for n, d in recorded.items() if n not in wanted}
        if kept:
            progress(KIND, f"{', '.join(kept)} left devd.toml; kept until `devd release`")
        if not wanted:
            return {"entries": recorded}
        dk = engine.client()
        engine.remember(ctx.paths.state_dir)
        found = dict(recorded)
        for name, spec in wanted.items():
            _refuse_mode_change(name, recorded.get(name), spec)
            make = shared.ensure if spec["shared"] else _ensure_one
            if not spec["shared"] and name not in found:
                # The intent first: a failure half-way still leaves release what to remove.
                cname = docker_name(name, ctx.worktree.id)
                found[name] = {"container": cname, "volume": cname if spec["data"] else "",
                               "port": 0, "image": spec["image"], "env": {}}
                ctx.registry.set_resource(ctx.worktree.id, KIND, "pending",
                                          {"entries": found})
            found[name] = make(ctx, dk, name, spec, progress)
            ctx.registry.set_resource(ctx.worktree.id, KIND, "pending", {"entries": found})
        return {"entries": found}

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        rows = [{"name": name, "state": _state(entry["container"]), "port": entry["port"]}
                | ({"db": entry["db"]} if "db" in entry else {})
                for name, entry in entries(detail).items()]
        down = [f"{r['name']} {r['state']}" for r in rows if r["state"] != "running"]
        return Health(not down, "; ".join(down), {"services": rows})

    def check_teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        dk = engine.client()
        for entry in entries(detail).values():
            if entry.get("shared"):
                shared.server_of(dk, entry)
            else:
                container = engine.owned(dk.containers, entry["container"], ctx.worktree.id)
                if entry.get("volume"):
                    engine.owned(dk.volumes, entry["volume"], ctx.worktree.id)
                    volumes.refuse_in_use(dk, entry["volume"],
                                          {container.id} if container else set(),
                                          f"of container {entry['container']}")

    def back_up(self, ctx: Context, detail: dict[str, Any]) -> dict[str, Any]:
        """A tarball of each container's volume (stopped first, and left so until teardown
        or resume), an --rdb of the shared Redis, in the release's backup folder."""
        dk = engine.client()
        made: dict[str, Any] = {"stopped": []}
        try:
            for name, entry in entries(detail).items():
                if entry.get("shared"):
                    shared.back_up(dk, entry, volumes.release_folder(ctx))
                elif entry.get("volume"):
                    _back_up_one(ctx, dk, name, entry, made["stopped"])
        except BaseException:
            self.resume(ctx, detail, made)  # all or nothing: they run as they did
            raise
        return made

    def resume(self, ctx: Context, detail: dict[str, Any], made: dict[str, Any]) -> None:
        dk, recorded = engine.client(), entries(detail)
        for name in made.get("stopped", []):
            container = engine.owned(dk.containers, recorded[name]["container"],
                                     ctx.worktree.id)
            if container is not None:
                container.start()

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        dk = engine.client()
        self.check_teardown(ctx, detail)
        if ctx.backup and KIND not in ctx.made:  # a release made it in its phase 1
            ctx.made[KIND] = self.back_up(ctx, detail)
        for entry in entries(detail).values():
            if entry.get("shared"):
                shared.flush(dk, entry)
            else:
                _remove_one(ctx, dk, entry)
        ctx.registry.release_leases(ctx.worktree.id, {
            n for _, n, _ in ctx.registry.leases(ctx.worktree.id)
            if n.startswith(LEASE_PREFIX)})

    def env(self, ctx: Context, detail: dict[str, Any]) -> dict[str, str]:
        return {key: value for entry in entries(detail).values()
                for key, value in entry.get("env", {}).items()}


def _refuse_mode_change(name: str, old: dict[str, Any] | None, spec: dict[str, Any]) -> None:
    """A container turned shared (or back) would leave the old one untracked: refuse."""
    if old is not None and bool(old.get("shared")) != bool(spec["shared"]):
        was = "shared" if old.get("shared") else "its own container"
        raise DevdError(f"[containers.{name}] shared changed (it was {was})",
                        "run `devd release --yes` first (a backup is kept), then provision "
                        "again", code="config")


def _ensure_one(ctx: Context, dk: DockerClient, name: str, spec: dict[str, Any],
                progress: Progress) -> dict[str, Any]:
    import docker

    wt_id, cname = ctx.worktree.id, docker_name(name, ctx.worktree.id)
    port = lease_internal(ctx, LEASE_PREFIX + name)
    entry = {"container": cname, "volume": cname if spec["data"] else "", "port": port,
             "image": spec["image"], "data": spec["data"],
             "env": engine.exported(spec['vars'], name, port)}
    try:
        container = engine.owned(dk.containers, cname, wt_id)
        if spec["data"] and engine.owned(dk.volumes, cname, wt_id) is None:
            dk.volumes.create(cname, labels=engine.labels(wt_id, KIND))
        if container is not None and (_published(container, spec["port"]) != port or
                                      container.labels.get(SPEC_LABEL) != _fingerprint(spec)):
            container.remove(force=True, v=True)
            container = None
        if container is None:
            container = _create(ctx, dk, name, spec, port, progress)
        elif container.status != "running":
            container.start()
    except docker.errors.APIError as exc:
        raise engine.api_error(exc, f"container {cname}") from exc
    progress(KIND, f"waiting for {name} on {engine.HOST}:{port}")
    engine.wait_ready(container, _probe(container, spec, port), spec["timeout"])
    return entry


def _create(ctx: Context, dk: DockerClient, name: str, spec: dict[str, Any], port: int,
            progress: Progress) -> Container:
    cname = docker_name(name, ctx.worktree.id)
    engine.ensure_image(dk, spec["image"], progress, KIND)
    progress(KIND, f"starting {cname} from {spec['image']} on {engine.HOST}:{port}")
    return dk.containers.run(
        spec["image"], name=cname, detach=True,
        labels=engine.labels(ctx.worktree.id, KIND) | {SPEC_LABEL: _fingerprint(spec)},
        environment=spec["env"], command=spec["command"] or None,
        ports={f"{spec['port']}/tcp": (engine.HOST, port)} if spec["port"] else {},
        volumes={cname: {"bind": spec["data"], "mode": "rw"}} if spec["data"] else {})


def _fingerprint(spec: dict[str, Any]) -> str:
    """What the container is made from: a change (image, command, env, ...) recreates it
    over the same volume."""
    made = {key: spec[key] for key in ("image", "port", "env", "data", "command")}
    return hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:16]


def _published(container: Container, inner: int) -> int | None:
    bindings = container.attrs.get("HostConfig", {}).get("PortBindings") or {}
    for binding in bindings.get(f"{inner}/tcp") or []:
        return int(binding.get("HostPort") or 0) or None
    return None


def _probe(container: Container, spec: dict[str, Any], port: int) -> Any:
    """`ready` run inside the container; else, for Redis, a PING over the published port;
    else the published port accepting a connection."""
    if spec["ready"]:
        argv = shlex.split(spec["ready"])
        return lambda: _succeeds(container, argv)
    if spec["preset"] == "redis":
        return lambda: engine.ping(port)
    return lambda: engine.connects(port)


def _succeeds(container: Container, argv: list[str]) -> bool:
    """`argv` exits 0 inside; a container that stopped meanwhile is not ready (the wait
    then finds it exited and says so with its logs)."""
    import docker

    try:
        return bool(container.exec_run(argv)[0] == 0)
    except docker.errors.APIError:
        return False


def _back_up_one(ctx: Context, dk: DockerClient, name: str, entry: dict[str, Any],
                 stopped: list[str]) -> None:
    container = engine.owned(dk.containers, entry["container"], ctx.worktree.id)
    volume = engine.owned(dk.volumes, entry["volume"], ctx.worktree.id)
    if volume is None:
        return
    if container is not None and container.status == "running":
        stopped.append(name)
        container.stop(timeout=10)  # a clean stop: servers write their data out (Redis' RDB)
    engine.ensure_image(dk, entry["image"], lambda *a, **k: None, KIND)
    volumes.archive(dk, volume.name, volumes.tarball(volumes.release_folder(ctx),
                                                     "container-" + name),
                    entry["image"], ctx.worktree.id)


def _remove_one(ctx: Context, dk: DockerClient, entry: dict[str, Any]) -> None:
    engine.remove(engine.owned(dk.containers, entry["container"], ctx.worktree.id),
                  engine.owned(dk.volumes, entry["volume"], ctx.worktree.id)
                  if entry.get("volume") else None)


def restore(ctx: Context, detail: dict[str, Any], folder: Path,
            progress: Progress) -> list[str]:
    """Each container-<name>.tar of `folder` back into that container's volume."""
    dk, restored = engine.client(), []
    for name, entry in entries(detail).items():
        source = volumes.tarball(folder, "container-" + name)
        if entry.get("shared") or not entry.get("volume") or not source.is_file() \
                or name not in ctx.config.containers:
            continue
        container = engine.owned(dk.containers, entry["container"], ctx.worktree.id)
        if container is not None:
            container.stop(timeout=10)  # a clean stop: what is set aside is complete
            container.remove(force=True, v=True)
        old = engine.owned(dk.volumes, entry["volume"], ctx.worktree.id)
        if old is not None:
            kept = volumes.set_aside(ctx, dk, old.name, "container-" + name, entry["image"])
            progress(KIND, f"volume {old.name} as it was is kept in {kept}")
            old.remove()
        dk.volumes.create(entry["volume"], labels=engine.labels(ctx.worktree.id, KIND))
        volumes.load(dk, entry["volume"], source, entry["image"], ctx.worktree.id)
        _ensure_one(ctx, dk, name, spec_of(ctx.config.containers[name]), progress)
        restored.append(entry["volume"])
        progress(KIND, f"restored volume {entry['volume']} from {source}")
    return restored


def _state(name: str) -> str:
    import docker

    try:
        return engine.state_of(engine.ask(lambda dk: dk.containers.get(name)))
    except docker.errors.NotFound:
        return "missing"
    except (docker.errors.DockerException, engine.Unanswered):
        return "unknown"
