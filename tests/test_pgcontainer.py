"""Container mode against a real Docker engine: one Postgres container per worktree."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Devd, Repo, run_git
from pgsupport import IMAGE, env_of, image_client, query, remove_owned, with_postgres

from devd import naming
from devd.postgres import names as pgnames

pytestmark = pytest.mark.docker


@pytest.fixture
def dk(devd: Devd) -> Iterator[Any]:
    """The engine; afterwards every container and volume this test's worktrees got is removed."""
    client = image_client()
    yield client
    remove_owned(client, {w["id"] for w in devd.status()["worktrees"]})


def docker_name(repo: Repo, tree: Path) -> str:
    return pgnames.docker_name(naming.worktree_id(repo.main, tree))


def test_container_mode_isolates_survives_stop_and_removal_and_gc_dumps(
        devd: Devd, repo: Repo, dk: Any) -> None:
    with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
    a, b = repo.worktree("shop-ca", "ca"), repo.worktree("shop-cb", "cb")
    for tree in (a, b):
        devd.run("provision", str(tree), timeout=180)
    env_a, env_b = env_of(devd, a), env_of(devd, b)
    assert env_a["PGHOST"] == "127.0.0.1" and env_a["PGPORT"] != env_b["PGPORT"]
    query(env_a["DATABASE_URL"], "CREATE TABLE t (v text)")
    query(env_a["DATABASE_URL"], "INSERT INTO t VALUES ('from-a')")
    with pytest.raises(psycopg.errors.UndefinedTable):
        query(env_b["DATABASE_URL"], "SELECT * FROM t")
    container = dk.containers.get(docker_name(repo, a))
    bindings = container.attrs["HostConfig"]["PortBindings"]["5432/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": env_a["PGPORT"]}]
    assert container.labels[pgnames.LABEL_OWNER] == naming.worktree_id(repo.main, a)
    assert devd.worktree(a)["postgres"]["state"] == "running"
    # Stopped: status says so, provision starts it again with the data intact.
    container.stop(timeout=10)
    assert devd.worktree(a)["postgres"]["state"] == "stopped"
    devd.run("provision", str(a), timeout=180)
    assert query(env_a["DATABASE_URL"], "SELECT v FROM t") == [("from-a",)]
    # Removed by hand: recreated over the same volume, same port and password.
    dk.containers.get(docker_name(repo, a)).remove(force=True)
    assert devd.worktree(a)["postgres"]["state"] == "missing"
    devd.run("provision", str(a), timeout=180)
    assert env_of(devd, a) == env_a
    assert query(env_a["DATABASE_URL"], "SELECT v FROM t") == [("from-a",)]
    # git worktree remove + gc: a dump is kept, container and volume are gone.
    run_git(repo.main, "worktree", "remove", "--force", str(a))
    result = devd.json("gc", "--grace", "0")
    [released] = [w for w in result["worktrees"] if w["path"] == str(a)]
    assert released["released"], released
    dump = Path(released["dumps"][0])
    assert dump.stat().st_size > 0
    assert not dk.containers.list(all=True, filters={"name": docker_name(repo, a)})
    assert not dk.volumes.list(filters={"name": docker_name(repo, a)})
    assert query(env_b["DATABASE_URL"], "SELECT 1") == [(1,)]
    # The dump restores into a fresh container for the same path.
    run_git(repo.main, "worktree", "add", "-q", str(a), "ca")
    devd.run("provision", str(a), timeout=180)
    devd.run("restore", str(a), "--dump", str(dump), timeout=120)
    assert query(env_of(devd, a)["DATABASE_URL"], "SELECT v FROM t") == [("from-a",)]
    # Its volume mounted by another container: refused before the dump, nothing stopped.
    borrower = dk.containers.create(IMAGE, volumes={docker_name(repo, b): {"bind": "/x"}})
    try:
        refused = devd.run("release", str(b), "--yes", check=False)
        assert refused.returncode == 1 and borrower.name in refused.stderr, refused.stderr
        assert "nothing was released" in refused.stderr
        assert query(env_b["DATABASE_URL"], "SELECT 1") == [(1,)]
    finally:
        borrower.remove(force=True)


def test_unlabelled_container_is_a_conflict_and_missing_image_is_clear(
        devd: Devd, repo: Repo, dk: Any) -> None:
    with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
    tree = repo.worktree("shop-cc", "cc")
    squatter = dk.containers.create(IMAGE, name=docker_name(repo, tree),
                                    labels={"devd.test": "squatter"})
    try:
        failed = devd.run("provision", str(tree), check=False, timeout=120)
        assert failed.returncode == 1 and "ownership_conflict" in failed.stderr
        squatter.reload()
        assert squatter.status == "created"  # untouched
    finally:
        squatter.remove(force=True, v=True)
    (tree / "devd.toml").write_text('[postgres]\nmode = "container"\n'
                                    'image = "devd-test.invalid/no-such-image:1"\n')
    failed = devd.run("provision", str(tree), check=False, timeout=180)
    assert failed.returncode == 1 and "no-such-image" in failed.stderr
    assert "cannot be pulled" in failed.stderr or "cannot pull" in failed.stderr
    # The volume made before the image turned out missing is found and removed on release.
    devd.run("release", str(tree), "--yes", timeout=120)
    assert dk.volumes.list(filters={"name": docker_name(repo, tree)}) == []
