"""[containers.NAME] against the real engine with a real Redis: per worktree and shared."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Devd, run_git
from containersupport import REDIS_IMAGE, redis, redis_client, remove_instance

pytestmark = pytest.mark.docker


@pytest.fixture
def dk(devd: Devd) -> Iterator[Any]:
    client = redis_client()
    yield client
    remove_instance(client, (devd.paths.state_dir / "instance-id").read_text().strip())


def toml(extra: str = "") -> str:
    return f'[ports]\nnames = ["web"]\n\n[containers.redis]\npreset = "redis"\n' \
           f'image = "{REDIS_IMAGE}"\n{extra}'


def env_of(devd: Devd, tree: Path) -> dict[str, str]:
    return dict(json.loads(devd.run("env", str(tree), "--format", "json").stdout))


def shared_server(devd: Devd) -> str:
    """This daemon's shared Redis (devd/containers/shared.py names it by instance): the
    engine is the machine's, and other test runs' servers are on it too."""
    return f"devd-redis-shared-{(devd.paths.state_dir / 'instance-id').read_text().strip()}"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_redis_per_worktree_isolated_labelled_backed_up_and_restored(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    repo = make_repo(devd_toml=toml())
    a, b = repo.worktree("shop-a", "a"), repo.worktree("shop-b", "b")
    for tree in (a, b):
        devd.run("provision", str(tree), timeout=120)
    url_a, url_b = env_of(devd, a)["REDIS_URL"], env_of(devd, b)["REDIS_URL"]
    assert url_a.startswith("redis://127.0.0.1:") and url_a.endswith("/0") and url_a != url_b
    assert redis(port_of(url_a), "SET", "k", "a") == "+OK"
    assert redis(port_of(url_b), "GET", "k") == ""
    wt_id = devd.worktree(a)["id"]
    container = dk.containers.get(f"devd-redis-{wt_id}")
    assert container.labels["devd.owner"] == wt_id and container.labels["devd.kind"] == \
        "containers"
    assert dk.volumes.get(f"devd-redis-{wt_id}").attrs["Labels"]["devd.owner"] == wt_id
    assert container.attrs["HostConfig"]["PortBindings"]["6379/tcp"][0]["HostIp"] == \
        "127.0.0.1"
    assert devd.worktree(a)["containers"][0]["state"] == "running"
    # Labelled by this devd for a worktree the registry does not know: listed, not removed.
    instance_id = container.labels["devd.instance"]
    stray_name = f"devd-test-stray-{instance_id}"  # the engine is the machine's: unique
    stray = dk.volumes.create(stray_name, labels={
        "devd.owner": "gone-tree-1", "devd.instance": instance_id, "devd.kind": "compose"})
    orphans = devd.json("gc", "--dry-run")["orphans"]  # a fresh scan (status caches 30 s)
    assert {"kind": "volume", "name": stray_name, "worktree_id": "gone-tree-1",
            "where": "docker"} in orphans
    stray.remove()
    container.stop(timeout=5)
    assert devd.worktree(a)["containers"][0]["state"] == "stopped"
    devd.run("provision", str(a), timeout=120)  # started again, its data kept
    assert redis(port_of(url_a), "GET", "k") == "a"
    assert redis(port_of(url_a), "SET", "k2", "after-restart") == "+OK"  # in memory only
    # gc after the worktree is removed: a backup, then nothing of it is left.
    run_git(repo.main, "worktree", "remove", "--force", str(a))
    gc = devd.json("gc", "--grace", "0")["worktrees"][0]
    assert gc["released"], gc.get("error")
    assert (Path(gc["volume_backups"][0]) / "container-redis.tar").stat().st_size > 0
    assert not dk.containers.list(all=True, filters={"label": f"devd.owner={wt_id}"})
    assert not dk.volumes.list(filters={"label": f"devd.owner={wt_id}"})
    run_git(repo.main, "worktree", "add", "-q", str(a), "a")
    devd.run("provision", str(a), timeout=120)
    port = port_of(env_of(devd, a)["REDIS_URL"])
    assert redis(port, "SET", "new", "since") == "+OK"
    restored = devd.json("restore", str(a))
    assert redis(port, "GET", "k") == "a" and redis(port, "GET", "k2") == "after-restart"
    # What the volume held since is not lost: set aside first, never taken for the newest.
    replaced = Path(restored["replaced_backup"]) / "container-redis.tar"
    assert b"since" in replaced.read_bytes()
    assert restored["volume_backup"] == gc["volume_backups"][0]
    # Turning it shared would leave this container untracked: refused.
    (a / "devd.toml").write_text(toml("shared = true\n"))
    done = devd.run("provision", str(a), timeout=120, check=False)
    assert done.returncode == 1 and "shared changed" in done.stderr


def test_shared_redis_leases_an_index_flushes_on_release_and_says_when_full(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    # Two indexes instead of 16, so that the third worktree finds them all taken.
    repo = make_repo(devd_toml=toml('shared = true\ncommand = ["redis-server", "--bind", '
                                    '"0.0.0.0", "--protected-mode", "no", "--databases", '
                                    '"2"]\n'))
    a, b, c = (repo.worktree(f"shop-{n}", n) for n in "abc")
    devd.run("provision", str(a), timeout=120)
    devd.run("provision", str(b), timeout=120)
    url_a, url_b = env_of(devd, a)["REDIS_URL"], env_of(devd, b)["REDIS_URL"]
    assert url_a.rsplit("/", 1)[0] == url_b.rsplit("/", 1)[0] and url_a != url_b
    port, db_a = port_of(url_a), int(url_a.rsplit("/", 1)[1])
    db_b = int(url_b.rsplit("/", 1)[1])
    redis(port, "SET", "k", "a", db=db_a)
    redis(port, "SET", "k", "b", db=db_b)
    failed = devd.run("provision", str(c), timeout=120, check=False)
    assert failed.returncode == 1 and "all of its" in failed.stderr
    assert "database indexes leased" in failed.stderr
    devd.run("release", str(a), "--yes", timeout=120)
    assert redis(port, "GET", "k", db=db_a) == ""  # flushed, after an --rdb backup
    assert redis(port, "GET", "k", db=db_b) == "b"  # the other worktree's untouched
    backups = list((devd.paths.state_dir / "backups" / "volumes").rglob("*.rdb.tar"))
    assert backups and backups[0].stat().st_size > 0
    server = [dk.containers.get(shared_server(devd))]
    assert dk.volumes.get(server[0].name).attrs["Labels"]["devd.kind"] == "redis-shared"
    # The backup's file inside the server is its own, and gone once copied out.
    left = server[0].exec_run(["sh", "-c", "ls /tmp | grep devd-backup"])
    assert left.exit_code == 1, left.output
    # A Redis that merely has the server's name (not devd's labels) is never flushed.
    server[0].remove(force=True)
    impostor = dk.containers.run(REDIS_IMAGE, name=server[0].name, detach=True,
                                 command=["redis-server", "--databases", "2"])
    try:
        while impostor.exec_run(["redis-cli", "-n", str(db_b), "SET", "k", "theirs"]
                                )[0] != 0:
            time.sleep(0.05)  # until it accepts
        refused = devd.run("release", str(b), "--yes", timeout=120, check=False)
        assert refused.returncode == 1 and "not labelled" in refused.stderr
        assert "REDIS_URL" in (b / ".env").read_text()  # checked first: nothing went
        out = impostor.exec_run(["redis-cli", "-n", str(db_b), "GET", "k"])[1]
        assert out.strip() == b"theirs"
    finally:
        impostor.remove(force=True)


def test_gc_retires_the_shared_redis_once_no_worktree_leases_an_index(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    import tarfile

    repo = make_repo(devd_toml=toml("shared = true\n"))
    a, b = repo.worktree("shop-a", "a"), repo.worktree("shop-b", "b")
    for tree in (a, b):
        devd.run("provision", str(tree), timeout=120)
    url_b = env_of(devd, b)["REDIS_URL"]
    server = dk.containers.get(shared_server(devd))
    devd.run("release", str(a), "--yes", timeout=120)
    assert "shared_redis" not in devd.json("gc", "--grace", "0")  # b still leases one
    assert redis(port_of(url_b), "PING") == "+PONG"
    devd.run("release", str(b), "--yes", timeout=120)
    redis(port_of(url_b), "SET", "outside", "any-index")  # what the RDB backup keeps
    # A Redis that merely has the server's name is left alone.
    name = server.name
    server.rename(name + "-real")
    impostor = dk.containers.create(REDIS_IMAGE, name=name)
    try:
        left = devd.json("gc", "--grace", "0")["shared_redis"]
        assert not left["removed"] and "not labelled" in left["reason"]
        assert dk.containers.get(name).id == impostor.id
    finally:
        impostor.remove(force=True)
        server.rename(name)
    # Its volume mounted by another container: refused before anything stops or goes.
    borrower = dk.containers.create(REDIS_IMAGE, volumes={name: {"bind": "/data"}})
    try:
        left = devd.json("gc", "--grace", "0")["shared_redis"]
        assert not left["removed"] and "in use by" in left["reason"], left
        server.reload()
        assert server.status == "running"
        assert not list((devd.paths.state_dir / "backups" / "redis-shared").glob("*"))
    finally:
        borrower.remove(force=True)
    retired = devd.json("gc", "--grace", "0")["shared_redis"]
    assert retired["removed"] and retired["name"] == name
    with tarfile.open(retired["backup"]) as tar:
        rdb = next(m for m in tar.getmembers() if m.name.endswith("dump.rdb"))
        assert b"any-index" in tar.extractfile(rdb).read()  # type: ignore[union-attr]
    assert not dk.containers.list(all=True, filters={"name": name})
    assert not dk.volumes.list(filters={"name": name})
