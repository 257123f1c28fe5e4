"""[compose] against the real engine and Debian's docker-compose 1.29: a project per worktree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Devd, Repo, run_git, wait_for
from containersupport import (
    REDIS_IMAGE,
    compose_available,
    redis,
    redis_client,
    remove_instance,
)
from pgsupport import IMAGE

pytestmark = pytest.mark.docker

COMPOSE = f"""services:
  db:
    image: {IMAGE}
    container_name: shop-db
    environment:
      POSTGRES_PASSWORD: pw
    ports:
      - "5432:5432"
    volumes:
      - pgdata:/var/lib/postgresql/data
  cache:
    image: {REDIS_IMAGE}
    container_name: shop-redis
    ports:
      - "6379:6379"
    volumes:
      - redisdata:/data
volumes:
  pgdata:
  redisdata:
"""
# A declared container beside the project: one release keeps both in one backup folder.
TOML = '[ports]\nnames = ["web"]\n\n[compose]\nfiles = ["compose.yaml"]\n\n' \
    f'[containers.sessions]\npreset = "redis"\nimage = "{REDIS_IMAGE}"\n'


@pytest.fixture
def dk(devd: Devd) -> Iterator[Any]:
    compose_available()
    client = redis_client()
    yield client
    remove_instance(client, (devd.paths.state_dir / "instance-id").read_text().strip())


def compose_repo(make_repo: Any, compose: str = COMPOSE) -> Repo:
    repo = make_repo(devd_toml=TOML)
    repo.commit({"compose.yaml": compose})
    return repo


def env_of(devd: Devd, tree: Path) -> dict[str, str]:
    return dict(json.loads(devd.run("env", str(tree), "--format", "json").stdout))


def plain_compose(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose ...` as a person types it in the worktree: only the .env steers it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run(["docker-compose", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=120)


def pg(port: str, sql: str) -> list[Any]:
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password="pw",
                                 dbname="postgres", connect_timeout=3, autocommit=True) as c:
                cur = c.execute(sql)
                return cur.fetchall() if cur.description else []
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def redis_ready(port: str, *command: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            return redis(int(port), *command)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_three_worktrees_own_projects_down_in_one_and_gc_backup_restore(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    repo = compose_repo(make_repo)
    trees = [repo.worktree(f"shop-{n}", n) for n in ("a", "b", "c")]
    for tree in trees:  # at once, as three agent sessions would
        devd.run("provision", str(tree), "--background", timeout=60)
    for tree in trees:
        devd.run("wait", str(tree), "--timeout", "240", timeout=250)
    envs = [env_of(devd, tree) for tree in trees]
    assert len({e["COMPOSE_PROJECT_NAME"] for e in envs}) == 3
    assert len({e["PORT_DB_5432"] for e in envs} | {e["PORT_CACHE_6379"] for e in envs}) == 6
    for tree, env in zip(trees, envs, strict=True):
        pg(env["PORT_DB_5432"], "CREATE TABLE t (v text)")
        pg(env["PORT_DB_5432"], f"INSERT INTO t VALUES ('{tree.name}')")
        assert redis_ready(env["PORT_CACHE_6379"], "SET", "k", tree.name) == "+OK"
        assert redis(port_of(env["REDIS_URL"]), "SET", "s", tree.name) == "+OK"
    for tree, env in zip(trees, envs, strict=True):  # each its own data
        assert pg(env["PORT_DB_5432"], "SELECT v FROM t") == [(tree.name,)]
        assert redis_ready(env["PORT_CACHE_6379"], "GET", "k") == tree.name
    # Published on loopback only, no container_name, devd's labels on everything.
    project_a = envs[0]["COMPOSE_PROJECT_NAME"]
    containers = dk.containers.list(filters={"label": f"com.docker.compose.project={project_a}"})
    assert len(containers) == 2 and not any(c.name.startswith("shop-") for c in containers)
    for container in containers:
        for bindings in container.attrs["HostConfig"]["PortBindings"].values():
            assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
        assert container.labels["devd.owner"] == devd.worktree(trees[0])["id"]
    rows = devd.worktree(trees[0])["containers"]
    assert sorted((r["kind"], r["name"], r["state"]) for r in rows) == [
        ("compose", "cache", "running"), ("compose", "db", "running"),
        ("containers", "sessions", "running")]
    # Plain docker-compose down in b: only b's project goes.
    done = plain_compose(trees[1], "down")
    assert done.returncode == 0, done.stderr
    running = {c.labels.get("com.docker.compose.project") for c in dk.containers.list()}
    assert envs[1]["COMPOSE_PROJECT_NAME"] not in running
    assert {envs[0]["COMPOSE_PROJECT_NAME"], envs[2]["COMPOSE_PROJECT_NAME"]} <= running
    assert redis_ready(envs[2]["PORT_CACHE_6379"], "GET", "k") == "shop-c"
    # status: b's project is down, its declared container is not Compose's to stop
    assert [r["name"] for r in devd.worktree(trees[1])["containers"]] == ["sessions"]
    # git worktree remove + gc: containers, volumes and network of a go, after a backup.
    run_git(repo.main, "worktree", "remove", "--force", str(trees[0]))
    gc = devd.json("gc", "--grace", "0")
    assert gc["worktrees"][0]["released"], gc["worktrees"][0].get("error")
    backups = gc["worktrees"][0]["volume_backups"]
    assert len(backups) == 1 and sorted(p.name for p in Path(backups[0]).iterdir()) == [
        "compose-pgdata.tar", "compose-redisdata.tar", "container-sessions.tar"]
    label = {"label": f"com.docker.compose.project={project_a}"}
    assert not dk.containers.list(all=True, filters=label)
    assert not dk.volumes.list(filters=label) and not dk.networks.list(filters=label)
    assert redis_ready(envs[2]["PORT_CACHE_6379"], "GET", "k") == "shop-c"
    # The worktree comes back: provision gives empty volumes, restore brings the data back.
    run_git(repo.main, "worktree", "add", "-q", str(trees[0]), "a")
    devd.run("provision", str(trees[0]), timeout=240)
    env = env_of(devd, trees[0])
    assert redis_ready(env["PORT_CACHE_6379"], "GET", "k") == ""
    devd.run("restore", str(trees[0]), timeout=240)
    assert pg(env["PORT_DB_5432"], "SELECT v FROM t") == [("shop-a",)]
    assert redis_ready(env["PORT_CACHE_6379"], "GET", "k") == "shop-a"
    assert redis(port_of(env["REDIS_URL"]), "GET", "s") == "shop-a"


def test_a_same_named_volume_not_devds_is_refused_and_never_removed(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    # Compose adopts an unlabelled volume called <project>_<key> (a warning only) and its
    # `down -v` removes it by name: devd must refuse before either.
    repo = make_repo(devd_toml='[compose]\nfiles = ["compose.yaml"]\nstart = false\n')
    shared = f"devd-test-user-shared-{uuid.uuid4().hex[:8]}"  # the machine's engine: unique
    repo.commit({"compose.yaml": f"services:\n  cache:\n    image: {REDIS_IMAGE}\n"
                 "    volumes: [\"data:/data\", \"shared:/shared\", \"./host:/host\"]\n"
                 "volumes:\n  data:\n  shared:\n    external: true\n"
                 f"    name: {shared}\n"})
    tree = repo.worktree("squat", "squat")
    user_shared = dk.volumes.create(shared)
    devd.run("provision", str(tree), timeout=120)
    name = env_of(devd, tree)["COMPOSE_PROJECT_NAME"]
    # The user's own project name after devd's block wins for a plain `docker compose`
    # (the last definition does): status says so rather than letting it steer silently.
    with open(tree / ".env", "a") as env:
        env.write("COMPOSE_PROJECT_NAME=shop\n")
    envfile = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "envfile"][0]
    assert "COMPOSE_PROJECT_NAME at .env:" in envfile["detail"], envfile
    squatter = dk.volumes.create(f"{name}_data")  # the user's own: no labels
    try:
        up = devd.run("compose", "up", "--path", str(tree), check=False)
        assert up.returncode != 0 and f"{name}_data" in up.stderr, up.stderr
        released = devd.run("release", str(tree), "--yes", check=False)
        assert released.returncode != 0 and f"{name}_data" in released.stderr
        assert dk.volumes.get(squatter.name).attrs["Labels"] in (None, {})
        squatter.remove()
        # Once it is gone: up, then release. The external volume and the bind-mounted host
        # files are the user's: neither removed nor backed up.
        (tree / "host").mkdir()
        (tree / "host" / "keep.txt").write_text("mine")
        devd.run("compose", "up", "--path", str(tree), timeout=120)
        released = devd.json("release", str(tree), "--yes")
        assert dk.volumes.get(user_shared.name)
        assert (tree / "host" / "keep.txt").read_text() == "mine"
        assert [p.name for p in Path(released["volume_backups"][0]).iterdir()] == [
            "compose-data.tar"]
    finally:
        for volume in dk.volumes.list(filters={"name": name}) + [user_shared]:
            volume.remove(force=True)


def cache_project(devd: Devd, make_repo: Any, dk: Any, branch: str, toml: str = ""
                  ) -> tuple[Path, str, Any]:
    """A worktree provisioned with a one-service project (Redis on a named volume): its
    path, project name and the service's container."""
    repo = make_repo(devd_toml='[compose]\nfiles = ["compose.yaml"]\n' + toml)
    repo.commit({"compose.yaml": f"services:\n  cache:\n    image: {REDIS_IMAGE}\n"
                 "    volumes: [\"data:/data\"]\nvolumes:\n  data:\n"})
    tree = repo.worktree(branch, branch)
    devd.run("provision", str(tree), timeout=120)
    name = env_of(devd, tree)["COMPOSE_PROJECT_NAME"]
    found = dk.containers.list(filters={"label": f"com.docker.compose.project={name}"})
    return tree, name, found[0]


def test_a_release_whose_backup_hits_a_full_disk_removes_nothing_and_restarts(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    # The daemon's file size limit stands in for a full disk: the volume's tarball cannot
    # be written, so `down -v` must never run, and the project runs again as it did.
    tree, name, cache = cache_project(devd, make_repo, dk, "full", '\n[containers.sessions]\n'
                                      f'preset = "redis"\nimage = "{REDIS_IMAGE}"\n')
    label = {"label": f"com.docker.compose.project={name}"}
    assert cache.exec_run(["sh", "-c", "head -c 3000000 /dev/urandom > /data/blob"])[0] == 0
    assert devd.proc is not None
    limit = ["prlimit", f"--pid={devd.proc.pid}"]
    subprocess.run([*limit, "--fsize=1000000:"], check=True)
    try:
        failed = devd.run("release", str(tree), "--yes", check=False, timeout=120)
    finally:
        subprocess.run([*limit, "--fsize=unlimited:"], check=True)
    assert failed.returncode == 1 and "nothing was removed" in failed.stderr, failed.stderr
    assert [c.id for c in dk.containers.list(filters=label)] == [cache.id]
    assert cache.exec_run(["ls", "/data/blob"])[0] == 0
    assert redis(port_of(env_of(devd, tree)["REDIS_URL"]), "PING") == "+PONG"
    backups = devd.paths.state_dir / "backups" / "volumes"
    assert not [p for p in backups.rglob("*") if p.is_file()]


def test_a_foreign_container_on_the_projects_network_refuses_the_release_up_front(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    # `down` would remove the project's containers and volumes, then fail on the network
    # ("has active endpoints"): check_teardown refuses first, so nothing is released.
    tree, name, cache = cache_project(devd, make_repo, dk, "joined")
    label = {"label": f"com.docker.compose.project={name}"}
    # A running guest fails `down` half-way; one only created loses its network under it.
    guest = dk.containers.run(REDIS_IMAGE, network=f"{name}_default", detach=True)
    created = dk.containers.create(REDIS_IMAGE, network=f"{name}_default")
    try:
        failed = devd.run("release", str(tree), "--yes", check=False, timeout=120)
        assert failed.returncode == 1 and guest.name in failed.stderr, failed.stderr
        assert created.name in failed.stderr
        assert "nothing was released" in failed.stderr, failed.stderr
        cache.reload()
        assert cache.status == "running"
        assert dk.volumes.list(filters={"name": f"{name}_data"})
    finally:
        guest.remove(force=True)
        created.remove(force=True)
    devd.run("release", str(tree), "--yes", timeout=120)
    assert not dk.containers.list(all=True, filters=label)


def test_the_hooks_provision_and_the_users_make_one_pass(dk: Any, devd: Devd,
                                                          make_repo: Any) -> None:
    """`git worktree add` with devd's hook asks for a background provision while the user's
    `devd provision` runs (the README's try-out): one pass. A second one, after `provision`
    returned, made every resource pending again: `devd env` then had no COMPOSE_* and no
    PORT_CACHE_6379 for seconds. Witness: the resolved Compose file, written by each pass."""
    repo = make_repo(devd_toml='[ports]\nnames = ["web"]\n\n[compose]\n'
                     'files = ["compose.yaml"]\nstart = false\n')
    repo.commit({"compose.yaml": f'services:\n  cache:\n    image: {REDIS_IMAGE}\n'
                                 '    ports: ["6379:6379"]\n', "requirements.txt": "\n"})
    tree = repo.worktree("shop-twice", "twice")
    user = subprocess.Popen([sys.executable, "-m", "devd", "provision", str(tree)],
                            env=devd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: any(w["path"] == str(tree) and w["state"] == "provisioning"
                         for w in devd.status()["worktrees"]), what="the user's provision")
    devd.run("provision", str(tree), "--background")  # what the hook sends meanwhile
    assert user.wait(timeout=180) == 0, user.communicate()
    env = env_of(devd, tree)
    assert {"COMPOSE_PROJECT_NAME", "COMPOSE_FILE", "PORT_CACHE_6379"} <= set(env), env
    written = os.stat(env["COMPOSE_FILE"]).st_ino
    assert devd.stop() == 0  # joins the background provision
    assert os.stat(env["COMPOSE_FILE"]).st_ino == written  # no second pass rewrote it
