"""Release in two phases against real Postgres, Redis and Compose: every backup first, and
only when all of them were made does anything go. The backup that fails is the last one
taken (Postgres' dump), so every other resource already had its copy: the old one-pass
release had removed the Compose volume and the Redis container by then."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Devd, wait_for
from containersupport import REDIS_IMAGE, compose_available, redis, redis_client, remove_instance
from pgsupport import IMAGE, env_of, query

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

TOML = ('[ports]\nnames = ["web"]\n\n[postgres]\nmode = "database"\n\n'
        '[compose]\nfiles = ["compose.yaml"]\n\n'
        f'[containers.sessions]\npreset = "redis"\nimage = "{REDIS_IMAGE}"\n')
COMPOSE = f'services:\n  cache:\n    image: {REDIS_IMAGE}\n    volumes: ["data:/data"]\n' \
    'volumes:\n  data:\n'
# Over the file size limit once dumped (md5 text compresses to about half), while the
# Redis volumes' tarballs stay far below it.
BLOB = "CREATE TABLE blob AS SELECT string_agg(md5(random()::text), '') AS t " \
    "FROM generate_series(1, 120000)"
LIMIT = 1_000_000


@pytest.fixture
def pgdevd(devd_home: Devd, pg_url: str) -> Iterator[Devd]:
    compose_available()
    client = redis_client()
    devd_home.env["DEVD_POSTGRES_URL"] = pg_url
    devd_home.start()
    yield devd_home
    remove_instance(client, (devd_home.paths.state_dir / "instance-id").read_text().strip())
    if devd_home.proc is not None:
        assert devd_home.stop() == 0, devd_home.log()


def answer(port: int, *command: str) -> str:
    """A Redis reply, once the server (just started again) accepts."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return redis(port, *command)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def cache_of(dk: Any, project: str) -> Any:
    found = dk.containers.list(filters={"label": f"com.docker.compose.project={project}"})
    assert len(found) == 1, found
    return found[0]


def release_on_a_full_disk(devd: Devd, tree: Path) -> subprocess.CompletedProcess[str]:
    """`devd release --yes` while the daemon's file size limit stands in for a full disk
    (pg_dump, its child, inherits it); the failure it must end in."""
    assert devd.proc is not None
    limit = ["prlimit", f"--pid={devd.proc.pid}"]
    subprocess.run([*limit, f"--fsize={LIMIT}:"], check=True)
    try:
        failed = devd.run("release", str(tree), "--yes", check=False, timeout=180)
    finally:
        subprocess.run([*limit, "--fsize=unlimited:"], check=True)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    return failed


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def killed_mid_release(devd: Devd, tmp_path: Path, tree: Path,
                       blocked: dict[str, str | None]) -> None:
    """`devd release --yes` until it runs one of `blocked` (commands put first on the
    daemon's PATH: each blocks on the argument given, on any if None, and runs the real one
    otherwise), then the daemon killed -9 there; no daemon runs after."""
    stuck, mark = tmp_path / "bin", tmp_path / "blocked.pid"
    stuck.mkdir()
    block = f"echo $$ > {mark}.part && mv {mark}.part {mark} && exec sleep 600"
    for name, arg in blocked.items():
        body = block if arg is None else \
            f'for a in "$@"; do [ "$a" = {arg} ] && {{ {block}; }}; done\n' \
            f'exec {shutil.which(name)} "$@"'
        (stuck / name).write_text(f"#!/bin/sh\n{body}\n")
        (stuck / name).chmod(0o755)
    assert devd.stop() == 0
    path = devd.env["PATH"]
    devd.env["PATH"] = f"{stuck}:{path}"
    devd.start()
    devd.env["PATH"] = path
    release = subprocess.Popen([sys.executable, "-m", "devd", "release", str(tree), "--yes"],
                               env=devd.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(mark.exists, timeout=60, what=f"the release to run one of {list(blocked)}")
    assert devd.proc is not None
    devd.proc.kill()
    devd.proc.wait()
    devd.proc = None
    os.kill(int(mark.read_text()), signal.SIGKILL)
    release.wait(timeout=30)


def test_the_last_backup_failing_releases_nothing_and_a_retry_restores_everything(
        pgdevd: Devd, make_repo: Any, pg_url: str) -> None:
    devd, dk = pgdevd, redis_client()
    repo = make_repo(devd_toml=TOML)
    repo.commit({"compose.yaml": COMPOSE})
    tree = repo.worktree("full", "full")
    devd.run("provision", str(tree), timeout=180)
    env, wt_id = env_of(devd, tree), devd.worktree(tree)["id"]
    query(env["DATABASE_URL"], BLOB)
    redis_port = int(env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    assert redis(redis_port, "SET", "k", "kept") == "+OK"
    project = env["COMPOSE_PROJECT_NAME"]
    cache = cache_of(dk, project)
    assert cache.exec_run(["sh", "-c", "echo kept > /data/marker"])[0] == 0

    failed = release_on_a_full_disk(devd, tree)
    assert "the backup of postgres failed" in failed.stderr, failed.stderr
    assert "nothing was released" in failed.stderr

    # Nothing went, and what the backups stopped or closed runs again.
    assert query(env["DATABASE_URL"], "SELECT length(t) FROM blob") == [(120000 * 32,)]
    assert answer(redis_port, "GET", "k") == "kept"
    assert cache_of(dk, project).id == cache.id
    assert cache.exec_run(["cat", "/data/marker"]).output == b"kept\n"
    assert f"REDIS_URL={env['REDIS_URL']}" in (tree / ".env").read_text()
    shown = devd.worktree(tree)
    assert "the backup of postgres failed" in shown["error"]
    assert {r["kind"]: r["state"] for r in shown["resources"]}["compose"] == "ready"
    # No partial backup is left for `devd restore` to take for the newest.
    state = devd.paths.state_dir
    assert not files_under(state / "backups" / "volumes")
    assert not [p for p in files_under(state / "dumps") if p.name.startswith(wt_id)]

    # The cause gone, the release goes through, every backup in place.
    released = json.loads(devd.run("release", str(tree), "--yes", "--json",
                                   timeout=180).stdout)
    kept = sorted(p.name for p in Path(released["volume_backups"][0]).iterdir())
    assert kept == ["compose-data.tar", "container-sessions.tar"]
    assert Path(released["dumps"][0]).stat().st_size > LIMIT
    assert not dk.containers.list(all=True, filters={"label": f"devd.owner={wt_id}"})
    assert not query(pg_url, "SELECT 1 FROM pg_database WHERE datname = %s",
                     env["DATABASE_URL"].rsplit("/", 1)[1])

    # Provisioned again and restored: each resource has its data back.
    devd.run("provision", str(tree), timeout=180)
    restored = devd.json("restore", str(tree))
    assert restored["restored"] == released["dumps"][0]
    env = env_of(devd, tree)
    assert query(env["DATABASE_URL"], "SELECT length(t) FROM blob") == [(120000 * 32,)]
    redis_port = int(env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    assert answer(redis_port, "GET", "k") == "kept"
    assert cache_of(dk, project).exec_run(["cat", "/data/marker"]).output == b"kept\n"


def test_a_container_dump_cut_short_leaves_no_dump_and_the_project_running(
        devd: Devd, make_repo: Any) -> None:
    # Container mode: the dump streams out of `docker exec` into the daemon's file, so the
    # full disk hits devd's own write; the Compose project, backed up and stopped before it,
    # runs again, and no truncated dump is left for `devd restore` to take for the newest.
    compose_available()
    dk = redis_client()
    try:
        repo = make_repo(devd_toml=f'[postgres]\nmode = "container"\nimage = "{IMAGE}"\n\n'
                         '[compose]\nfiles = ["compose.yaml"]\n')
        repo.commit({"compose.yaml": COMPOSE})
        tree = repo.worktree("cfull", "cfull")
        devd.run("provision", str(tree), timeout=180)
        env, wt_id = env_of(devd, tree), devd.worktree(tree)["id"]
        query(env["DATABASE_URL"], BLOB)
        cache = cache_of(dk, env["COMPOSE_PROJECT_NAME"])
        failed = release_on_a_full_disk(devd, tree)
        assert "the backup of postgres failed" in failed.stderr, failed.stderr
        assert "writing the dump" in failed.stderr and "nothing was released" in failed.stderr
        assert query(env["DATABASE_URL"], "SELECT length(t) FROM blob") == [(120000 * 32,)]
        cache.reload()
        assert cache.status == "running"
        state = devd.paths.state_dir
        assert not [p for p in files_under(state / "dumps") if p.name.startswith(wt_id)]
        assert not files_under(state / "backups" / "volumes")
    finally:
        remove_instance(dk, (devd.paths.state_dir / "instance-id").read_text().strip())


def test_a_daemon_killed_between_the_backups_and_the_removal_says_so_and_provision_resumes(
        pgdevd: Devd, make_repo: Any, pg_url: str, tmp_path: Path) -> None:
    # kill -9 during the last backup (Postgres' dump: a pg_dump on the daemon's PATH that
    # never ends): the Redis container is stopped and the role's logins are closed. The
    # next daemon says the release was interrupted; `devd provision` undoes the backups.
    devd, dk = pgdevd, redis_client()
    repo = make_repo(devd_toml='[postgres]\nmode = "database"\n\n[containers.sessions]\n'
                     f'preset = "redis"\nimage = "{REDIS_IMAGE}"\n')
    tree = repo.worktree("killed", "killed")
    devd.run("provision", str(tree), timeout=180)
    env, wt_id = env_of(devd, tree), devd.worktree(tree)["id"]
    query(env["DATABASE_URL"], "CREATE TABLE t AS SELECT 1 AS x")
    role = env["DATABASE_URL"].rsplit("/", 1)[1]
    killed_mid_release(devd, tmp_path, tree, {"pg_dump": None})
    assert query(pg_url, "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", role) \
        == [(False,)]
    sessions = dk.containers.get(f"devd-sessions-{wt_id}")
    assert sessions.status == "exited"

    devd.start()
    shown = devd.worktree(tree)
    assert "interrupted: a release stopped mid-way" in (shown["error"] or ""), shown
    devd.run("provision", str(tree), timeout=180)
    assert query(env["DATABASE_URL"], "SELECT x FROM t") == [(1,)]
    sessions.reload()
    assert sessions.status == "running"
    assert devd.worktree(tree)["error"] is None


def test_a_release_killed_between_two_removals_and_retried_keeps_every_volume_in_its_folder(
        devd: Devd, make_repo: Any, tmp_path: Path) -> None:
    # [containers] added after [compose]: the container goes first, then `down` (blocked
    # here) when the daemon is killed. The retry backs up only what is left, so its folder
    # (the newest: `devd restore` takes it) must get the container's tarball as well.
    compose_available()
    dk = redis_client()
    try:
        repo = make_repo(devd_toml='[compose]\nfiles = ["compose.yaml"]\n')
        repo.commit({"compose.yaml": COMPOSE})
        tree = repo.worktree("split", "split")
        devd.run("provision", str(tree), timeout=180)
        with open(tree / "devd.toml", "a") as toml:
            toml.write(f'\n[containers.sessions]\npreset = "redis"\nimage = "{REDIS_IMAGE}"\n')
        devd.run("provision", str(tree), timeout=180)
        wt_id = devd.worktree(tree)["id"]
        killed_mid_release(devd, tmp_path, tree, {"docker": "down", "docker-compose": "down"})
        assert not dk.containers.list(all=True, filters={"name": f"devd-sessions-{wt_id}"})
        devd.start()
        released = devd.json("release", str(tree), "--yes")
        kept = sorted(p.name for p in Path(released["volume_backups"][0]).iterdir())
        assert kept == ["compose-data.tar", "container-sessions.tar"]
    finally:
        remove_instance(dk, (devd.paths.state_dir / "instance-id").read_text().strip())
