"""[compose]: the repo's Compose files as one project per worktree.

The project is named after the worktree id, runs from a resolved file in devd's state dir
(project.py says why a whole file), and the worktree's .env names both, so a plain
`docker compose down` typed in one worktree acts on that worktree's project only. Release
keeps a tarball of each named volume before `down -v`; `devd restore` loads them back.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

from devd import instance
from devd.containers import engine, project, volumes
from devd.containers.runner import PROJECT_LABEL, VOLUME_LABEL, Project, binary
from devd.errors import ConfigError, DevdError, OwnershipConflict
from devd.paths import write_atomic
from devd.provisioners.base import Context, Health, Progress, Provisioner
from devd.provisioners.ports import lease_internal

KIND = "compose"


def project_name(wt_id: str) -> str:
    """Lowercase letters, digits, - and _ (what both Compose versions keep unchanged)."""
    return "devd-" + re.sub(r"[^a-z0-9_-]+", "-", wt_id.lower()).strip("-")


def resolved_path(ctx: Context) -> Path:
    return ctx.paths.state_dir / "compose" / ctx.worktree.id / "compose.json"


def _project(ctx: Context, files: list[Path] | None = None) -> Project:
    files = files if files is not None else [resolved_path(ctx)]
    return Project(project_name(ctx.worktree.id), ctx.worktree.path, files, ctx.env)


class ComposeProvisioner(Provisioner):
    kind = KIND
    holds_data = True

    def applies(self, ctx: Context) -> bool:
        return bool(ctx.config.compose.files) or bool(ctx.recorded(KIND))

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        recorded = ctx.recorded(KIND)
        if not ctx.config.compose.files:
            progress(KIND, "[compose] removed; the project is kept until `devd release`")
            return recorded
        dk = engine.client()
        engine.remember(ctx.paths.state_dir)
        name = project_name(ctx.worktree.id)
        ctx.registry.set_resource(ctx.worktree.id, KIND, "pending",
                                  recorded | {"project": name})
        model = _project(ctx, _files(ctx)).model()
        ports = _lease(ctx, model)
        for shared in project.externals(model):
            progress(KIND, f"{shared} is external: every worktree shares it", level="warning")
        labels = engine.labels(ctx.worktree.id, KIND)
        target = resolved_path(ctx)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(target, json.dumps(project.resolve(model, ports, labels), indent=1,
                                        sort_keys=True).encode())
        refuse_foreign(dk, name, ctx.worktree.id, model)
        _note_own_project(dk, ctx, progress)
        detail: dict[str, Any] = {"project": name, "file": str(target), "ports": ports,
                  "compose": " ".join(binary()), "services": sorted(model["services"])}
        ctx.registry.set_resource(ctx.worktree.id, KIND, "pending", detail)
        if ctx.config.compose.copy_volumes and not recorded.get("started"):
            _copy_main_volumes(ctx, dk, model, progress)
        if ctx.config.compose.start:
            up(ctx, progress)
            detail["started"] = True
        return detail

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        services = service_states(detail.get("project", ""))
        down = [s for s in services if s["state"] != "running"]
        if not services:
            return Health(True, "not started (`devd compose up`)", {"services": []})
        note = "; ".join(f"{s['name']} {s['state']}" for s in down)
        return Health(not down, note, {"services": services})

    def check_teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        dk = engine.client()
        name = detail.get("project") or project_name(ctx.worktree.id)
        refuse_foreign(dk, name, ctx.worktree.id, _resolved(ctx))
        members = {c.id for c in _listed(dk.containers, name, all=True)}
        for volume in _listed(dk.volumes, name):
            volumes.refuse_in_use(dk, volume.name, members, f"of project {name}")
        for network in _listed(dk.networks, name):
            _refuse_joined(dk, network.name, members)

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        dk = engine.client()
        name = detail.get("project") or project_name(ctx.worktree.id)
        self.check_teardown(ctx, detail)
        if ctx.backup and KIND not in ctx.made:  # a release made it in its phase 1
            ctx.made[KIND] = self.back_up(ctx, detail)
        if Path(detail.get("file", "")).is_file():
            _project(ctx).run("down", "--volumes", "--remove-orphans")
        _sweep(dk, name, ctx.worktree.id)
        ctx.registry.release_leases(ctx.worktree.id, {
            n for _, n, _ in ctx.registry.leases(ctx.worktree.id)
            if n.startswith(project.LEASE_PREFIX)})
        resolved_path(ctx).unlink(missing_ok=True)

    def back_up(self, ctx: Context, detail: dict[str, Any]) -> dict[str, Any]:
        """A tarball of each named volume; the project stopped first (servers write their
        data out: Redis' RDB), and left so until teardown or resume."""
        dk = engine.client()
        name = detail.get("project") or project_name(ctx.worktree.id)
        has_file = Path(detail.get("file", "")).is_file()
        made = {"running": [c.id for c in _listed(dk.containers, name) if has_file]}
        try:
            if made["running"]:
                _project(ctx).run("stop")
            backup(ctx, dk, name)
        except BaseException:
            self.resume(ctx, detail, made)  # all or nothing: the project runs as it did
            raise
        return made

    def resume(self, ctx: Context, detail: dict[str, Any], made: dict[str, Any]) -> None:
        import docker

        dk = engine.client()
        for container_id in made.get("running", []):
            with contextlib.suppress(docker.errors.NotFound):
                dk.containers.get(container_id).start()

    def env(self, ctx: Context, detail: dict[str, Any]) -> dict[str, str]:
        if "file" not in detail:
            return {}
        return {"COMPOSE_PROJECT_NAME": detail["project"], "COMPOSE_FILE": detail["file"]} \
            | {key: str(port) for key, port in detail.get("ports", {}).items()}


def _files(ctx: Context) -> list[Path]:
    found = [ctx.worktree.path / rel for rel in ctx.config.compose.files]
    missing = [str(p) for p in found if not p.is_file()]
    if missing:
        raise ConfigError(f"[compose] files not found: {', '.join(missing)}",
                          "fix [compose] files in devd.toml (paths relative to the worktree)")
    return found


def _lease(ctx: Context, model: dict[str, Any]) -> dict[str, int]:
    """A leased port per env key; keys the files no longer have give theirs back."""
    wanted = project.wanted_ports(model)
    ports = {key: lease_internal(ctx, project.lease_name(key)) for key in wanted}
    keep = {project.lease_name(key) for key in wanted}
    ctx.registry.release_leases(ctx.worktree.id, {
        n for _, n, _ in ctx.registry.leases(ctx.worktree.id)
        if n.startswith(project.LEASE_PREFIX) and n not in keep})
    return ports


def up(ctx: Context, progress: Progress) -> None:
    """`up -d` of the worktree's project (pulls or builds what is missing)."""
    refuse_foreign(engine.client(), project_name(ctx.worktree.id), ctx.worktree.id,
                   _resolved(ctx))
    progress(KIND, f"starting project {project_name(ctx.worktree.id)}")
    _project(ctx).run("up", "--detach", "--remove-orphans")


def down(ctx: Context, progress: Progress) -> None:
    """Stop and remove the project's containers and network; its volumes stay."""
    refuse_foreign(engine.client(), project_name(ctx.worktree.id), ctx.worktree.id,
                   _resolved(ctx))
    progress(KIND, f"stopping project {project_name(ctx.worktree.id)}")
    _project(ctx).run("down", "--remove-orphans")


def _listed(collection: Any, name: str, **extra: Any) -> list[Any]:
    return list(collection.list(filters={"label": f"{PROJECT_LABEL}={name}"}, **extra))


def _resolved(ctx: Context) -> dict[str, Any]:
    """The model devd last wrote for the worktree ({} once it is gone)."""
    try:
        found = json.loads(resolved_path(ctx).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def refuse_foreign(dk: Any, name: str, wt_id: str, model: dict[str, Any] | None = None
                   ) -> None:
    """Everything Compose knows as project `name` must be ours, or devd touches none of it.
    That includes what merely has the name Compose gives the project's volumes and networks
    (<project>_<key>): Compose adopts such an unlabelled volume with a warning, and its
    `down -v` then removes it by name, someone's data with it."""
    model = model or {}
    for section, collection in (("volumes", dk.volumes), ("networks", dk.networks)):
        specs = dict(model.get(section) or {})
        if section == "networks" and model:
            specs.setdefault("default", {})
        for key, spec in sorted(specs.items()):
            if not project.external(spec or {}):
                engine.owned(collection, f"{name}_{key}", wt_id)
    for collection, extra in ((dk.containers, {"all": True}), (dk.volumes, {}),
                              (dk.networks, {})):
        for found in _listed(collection, name, **extra):
            if not engine.ours(engine.tags_of(found), wt_id):
                raise OwnershipConflict(
                    f"Compose project {name} has {found.name!r}, which is not labelled as "
                    f"this devd's for worktree {wt_id}; nothing was changed",
                    "devd never touches what it did not make: remove it yourself")


def _refuse_joined(dk: Any, network: str, members: set[str]) -> None:
    """A container outside the project on its network: `down` would remove the project's
    containers, then fail on the network (a running guest), or remove it from under a
    guest that was only created; either way not devd's to decide."""
    others = [c.name for c in dk.containers.list(all=True, filters={"network": network})
              if c.id not in members]
    if others:
        raise DevdError(f"network {network} has containers that are not the project's: "
                        f"{', '.join(others)}; nothing was removed",
                        f"disconnect them (docker network disconnect {network} "
                        f"{others[0]}), then try again", code="network_in_use")


def _sweep(dk: Any, name: str, wt_id: str) -> None:
    """What `down` left (or a project whose file is gone): only our labelled objects."""
    import docker

    for collection, extra in ((dk.containers, {"all": True}), (dk.volumes, {}),
                              (dk.networks, {})):
        for found in _listed(collection, name, **extra):
            if engine.ours(engine.tags_of(found), wt_id):
                with contextlib.suppress(docker.errors.NotFound):
                    found.remove(**({"force": True, "v": True} if extra else {}))


def helper_image(dk: Any, name: str) -> str:
    """An image that is here for the helper containers: one the project's containers use."""
    for container in _listed(dk.containers, name, all=True):
        return str(container.attrs["Image"])
    images = dk.images.list()
    if not images:
        raise DevdError("no image is available locally for the volume helper",
                        "run `devd compose up` once", code="docker_image")
    return str(images[0].id)


def backup(ctx: Context, dk: Any, name: str) -> Path | None:
    """A tarball of each of the project's named volumes (ours only), in the release's
    backup folder."""
    found = [v for v in _listed(dk.volumes, name) if engine.ours(engine.tags_of(v),
                                                                   ctx.worktree.id)]
    if not found:
        return None
    folder, image = volumes.release_folder(ctx), helper_image(dk, name)
    for volume in found:
        key = engine.tags_of(volume).get(VOLUME_LABEL) or volume.name
        volumes.archive(dk, volume.name, volumes.tarball(folder, "compose-" + key), image,
                        ctx.worktree.id)
    return folder


def restore(ctx: Context, folder: Path, progress: Progress) -> list[str]:
    """Load each compose-<volume>.tar of `folder` into the project's volume of that name:
    the project is brought down (volumes kept), each volume made anew, then up again."""
    tarballs = sorted(folder.glob("compose-*.tar"))
    if not tarballs:
        return []
    dk, name = engine.client(), project_name(ctx.worktree.id)
    image = helper_image(dk, name)
    down(ctx, progress)
    restored = []
    for source in tarballs:
        key = source.stem.removeprefix("compose-")
        volume_name = f"{name}_{key}"
        old = engine.owned(dk.volumes, volume_name, ctx.worktree.id)
        tags = engine.tags_of(old) if old is not None else \
            engine.labels(ctx.worktree.id, KIND) | {PROJECT_LABEL: name, VOLUME_LABEL: key}
        if old is not None:
            kept = volumes.set_aside(ctx, dk, volume_name, "compose-" + key, image)
            progress(KIND, f"volume {volume_name} as it was is kept in {kept}")
            old.remove()
        dk.volumes.create(volume_name, labels=tags)
        volumes.load(dk, volume_name, source, image, ctx.worktree.id)
        restored.append(volume_name)
        progress(KIND, f"restored volume {volume_name} from {source}")
    up(ctx, progress)
    return restored


def directory_project(path: Path) -> str:
    """The name Compose gives a project run from `path` without -p (v1 and v2 agree on
    lowercase letters, digits, - and _)."""
    return re.sub(r"[^-_a-z0-9]", "", path.name.lower())


def _note_own_project(dk: Any, ctx: Context, progress: Progress) -> None:
    """A project someone started here before devd (named after the directory) is not
    devd's: it keeps running, untouched; say so, as it may hold the ports the files name."""
    own = directory_project(ctx.worktree.path)
    running = [c.name for c in _listed(dk.containers, own)
               if not engine.ours(engine.tags_of(c), ctx.worktree.id)]
    if running:
        progress(KIND, f"the Compose project {own} started here without devd keeps running "
                 f"({', '.join(running)}); devd leaves it alone: stop it with "
                 f"`docker compose -p {own} down` if you want", level="warning")


def _copy_main_volumes(ctx: Context, dk: Any, model: dict[str, Any],
                       progress: Progress) -> None:
    """Opt-in: each named volume starts as the main worktree's (its devd project's if it
    has one, else the project Compose names after the main worktree's directory)."""
    if ctx.worktree.path == ctx.worktree.repo_main_path:
        return
    main_names = [project_name(w.id) for w in ctx.registry.worktrees()
                  if w.path == ctx.worktree.repo_main_path]
    main_names.append(directory_project(ctx.worktree.repo_main_path))
    name = project_name(ctx.worktree.id)
    for key, spec in (model.get("volumes") or {}).items():
        if (spec or {}).get("external"):
            continue
        source = next((v for m in main_names for v in _listed(dk.volumes, m)
                       if engine.tags_of(v).get(VOLUME_LABEL) == key), None)
        if source is None or engine.owned(dk.volumes, f"{name}_{key}", ctx.worktree.id):
            continue
        running = [c.name for c in volumes.users(dk, source.name) if c.status == "running"]
        if running:
            progress(KIND, f"volume {source.name} is in use by {', '.join(running)}: the "
                     "copy may be inconsistent", level="warning")
        target = f"{name}_{key}"
        dk.volumes.create(target, labels=engine.labels(ctx.worktree.id, KIND)
                          | {PROJECT_LABEL: name, VOLUME_LABEL: key})
        holders = volumes.users(dk, source.name)
        image = str(holders[0].attrs["Image"]) if holders else helper_image(dk, name)
        volumes.copy(dk, source.name, target, image, ctx.worktree.id)
        progress(KIND, f"volume {key} starts as a copy of {source.name}")


def service_states(name: str) -> list[dict[str, Any]]:
    """Each container of the project: service, state (Docker's health if declared)."""
    import docker

    try:
        found = engine.ask(lambda dk: _listed(dk.containers, name, all=True))
    except (docker.errors.DockerException, engine.Unanswered):
        return [{"name": name, "state": "unknown"}]
    return [{"name": c.labels.get("com.docker.compose.service", c.name),
             "container": c.name, "state": engine.state_of(c)} for c in found]


def orphans(state_dir: Path, known_ids: set[str]) -> list[dict[str, str]]:
    """Containers, volumes and networks of this instance's worktrees the registry lost."""
    import docker

    if not engine.used(state_dir):
        return []
    mine = {"label": [engine.LABEL_OWNER, f"{engine.LABEL_INSTANCE}={instance.current()}"]}

    def listed(dk: Any) -> list[tuple[str, str, dict[str, str]]]:
        return [("container", c.name, c.labels) for c in
                dk.containers.list(all=True, filters=mine)] + \
            [(kind, o.name, engine.tags_of(o)) for kind, col in
             (("volume", dk.volumes), ("network", dk.networks))
             for o in col.list(filters=mine)]

    try:
        found = engine.ask(listed)
    except (docker.errors.DockerException, engine.Unanswered):
        return []
    return [{"kind": kind, "name": name, "worktree_id": owner, "where": "docker"}
            for kind, name, tags in found
            if tags.get(engine.LABEL_KIND) != "postgres"
            and (owner := tags.get(engine.LABEL_OWNER, "")) not in known_ids]
