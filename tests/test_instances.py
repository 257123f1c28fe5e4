"""Two devd instances (two DEVD_HOMEs) on one Postgres server and one Docker engine: each
one's markers and labels name it, and neither calls the other's objects orphans or takes
them over. Plus the instance id file itself and the names that leave room for `test_`."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Devd, _kill_daemons_of
from pgsupport import IMAGE, env_of, image_client, query, start_server, with_postgres

from devd import instance, naming
from devd.errors import DevdError
from devd.postgres import names as pgnames


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    yield from start_server()


@pytest.fixture
def two(devd_home: Devd, tmp_path: Path, pg_url: str) -> Iterator[tuple[Devd, Devd]]:
    home = tmp_path / "devd-home-2"
    home.mkdir()
    second = Devd(home, {**devd_home.env, "DEVD_HOME": str(home)})
    pair = (devd_home, second)
    try:
        for devd in pair:
            devd.env["DEVD_POSTGRES_URL"] = pg_url
            devd.start()
        yield pair
    finally:
        for devd in pair:
            if devd.proc is not None:
                devd.stop()
        _kill_daemons_of(second)


def instance_of(devd: Devd) -> str:
    return (devd.paths.state_dir / "instance-id").read_text().strip()


def comment_of_role(url: str, role: str) -> str:
    [(comment,)] = query(url, "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles "
                              "WHERE rolname = %s", role)
    return str(comment)


def orphan_names(devd: Devd) -> set[str]:
    """What the instance calls orphans now (status may answer from a 30 s old scan)."""
    return {o["name"] for o in devd.json("gc", "--dry-run")["orphans"]}


@pytest.mark.postgres
def test_two_instances_on_one_server_never_take_each_others_objects(
        two: tuple[Devd, Devd], make_repo, pg_url: str) -> None:
    a, b = two
    assert instance_of(a) != instance_of(b)
    shop, mall = make_repo("shop"), make_repo("mall")
    for repo in (shop, mall):
        with_postgres(repo, 'mode = "schema"\n')
    mine, theirs = shop.worktree("shop-x", "x"), mall.worktree("mall-y", "y")
    a.run("provision", str(mine))
    b.run("provision", str(theirs))
    role_a, role_b = env_of(a, mine)["PGUSER"], env_of(b, theirs)["PGUSER"]
    wt_a = naming.worktree_id(shop.main, mine)
    assert comment_of_role(pg_url, role_a) == f"devd:{instance_of(a)}:{wt_a}"
    # Neither lists the other's objects as orphans, in status or gc.
    assert role_b not in orphan_names(a) and role_a not in orphan_names(b)
    assert not {o["name"] for o in b.status()["orphans"]} & {role_a, role_b}
    # B asked for A's worktree: the names are A's, so B refuses and touches nothing...
    taken = b.run("provision", str(mine), check=False)
    assert taken.returncode == 1 and "ownership_conflict" in taken.stderr
    b.run("release", str(mine), "--yes")
    assert query(env_of(a, mine)["DATABASE_URL"], "SELECT current_schema()") != []
    assert comment_of_role(pg_url, role_a) == f"devd:{instance_of(a)}:{wt_a}"
    # ...and a real orphan of A's is A's alone; an old-form marker is nobody's orphan.
    tag = uuid.uuid4().hex[:8]
    ghosts = {f"devd_ghost_a_{tag}": f"devd:{instance_of(a)}:ghost-{tag}",
              f"devd_ghost_old_{tag}": f"devd:ghost-{tag}"}
    for role, marker in ghosts.items():
        query(pg_url, f'CREATE ROLE "{role}"; COMMENT ON ROLE "{role}" IS \'{marker}\'')
    try:
        assert f"devd_ghost_a_{tag}" in orphan_names(a)
        assert not {*ghosts} & orphan_names(b)
        assert f"devd_ghost_old_{tag}" not in orphan_names(a)
    finally:
        for role in ghosts:
            query(pg_url, f'DROP ROLE "{role}"')
    b.run("gc", "--grace", "0")
    a.run("release", str(mine), "--yes", "--no-backup")
    b.run("release", str(theirs), "--yes", "--no-backup")


@pytest.mark.postgres
def test_an_old_form_marker_is_adopted_and_rewritten(two: tuple[Devd, Devd], make_repo,
                                                     pg_url: str) -> None:
    a, _ = two
    repo = make_repo("shop")
    with_postgres(repo, 'mode = "database"\n')
    tree = repo.worktree("shop-old", "old")
    wt_id = naming.worktree_id(repo.main, tree)
    role = pgnames.identifier(wt_id)
    query(pg_url, f'CREATE ROLE "{role}" LOGIN; COMMENT ON ROLE "{role}" IS \'devd:{wt_id}\'')
    a.run("provision", str(tree))
    assert comment_of_role(pg_url, role) == f"devd:{instance_of(a)}:{wt_id}"
    a.run("release", str(tree), "--yes", "--no-backup")


@pytest.mark.docker
def test_two_instances_on_one_engine_never_take_each_others_volumes(
        two: tuple[Devd, Devd], make_repo) -> None:
    a, b = two
    dk = image_client()
    repo = make_repo("shop")
    with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
    tree, other = repo.worktree("shop-c", "c"), repo.worktree("shop-d", "d")
    wt_id, tag = naming.worktree_id(repo.main, tree), uuid.uuid4().hex[:8]
    owner, inst = pgnames.LABEL_OWNER, pgnames.LABEL_INSTANCE
    # Each instance's volume under the name the other would use for its worktree.
    made = [dk.volumes.create(pgnames.docker_name(naming.worktree_id(repo.main, t)),
                              labels={owner: naming.worktree_id(repo.main, t),
                                      inst: instance_of(by), "devd.test": tag})
            for t, by in ((tree, b), (other, a))]
    ghosts = {"a": {inst: instance_of(a)}, "b": {inst: instance_of(b)}, "old": {}}
    made += [dk.volumes.create(f"devd-test-ghost-{tag}-{key}",
                               labels={owner: f"ghost-{tag}", "devd.test": tag} | extra)
             for key, extra in ghosts.items()]
    try:
        # B's volume under the name A would use: a conflict for A, left as it was.
        failed = a.run("provision", str(tree), check=False, timeout=120)
        assert failed.returncode == 1 and "ownership_conflict" in failed.stderr
        assert dk.volumes.get(pgnames.docker_name(wt_id)).attrs["Labels"][inst] == \
            instance_of(b)
        failed = b.run("provision", str(other), check=False, timeout=120)
        assert failed.returncode == 1 and "ownership_conflict" in failed.stderr
        found_a, found_b = orphan_names(a), orphan_names(b)
        assert f"devd-test-ghost-{tag}-a" in found_a and f"devd-test-ghost-{tag}-b" in found_b
        assert not {f"devd-test-ghost-{tag}-{k}" for k in ("b", "old")} & found_a
        assert not {f"devd-test-ghost-{tag}-{k}" for k in ("a", "old")} & found_b
        a.run("release", str(tree), "--yes", timeout=120)
        assert dk.volumes.get(pgnames.docker_name(wt_id)) is not None
    finally:
        for volume in made:
            volume.remove(force=True)
        for devd in two:
            for wt in devd.status()["worktrees"]:
                devd.run("release", wt["path"], "--yes", "--no-backup", check=False,
                         timeout=120)


@pytest.mark.docker
def test_an_unreachable_engine_refuses_release_and_touches_nothing(devd_home: Devd,
                                                                   repo) -> None:
    image_client()
    with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
    tree = repo.worktree("shop-e", "e")
    devd_home.start()
    try:
        devd_home.run("provision", str(tree), timeout=180)
        before = devd_home.worktree(tree)
        devd_home.stop()
        devd_home.env["DOCKER_HOST"] = f"unix://{devd_home.home}/no-docker.sock"
        devd_home.start()
        result = devd_home.run("release", str(tree), "--yes", check=False, timeout=120)
        assert result.returncode == 1 and "Docker is not reachable" in result.stderr
        assert "nothing was released" in result.stderr
        after = devd_home.worktree(tree)
        assert after["ports"] == before["ports"] and Path(after["cache_dir"]).is_dir()
        assert "DATABASE_URL=" in (tree / ".env").read_text()
    finally:
        if devd_home.proc is not None:
            devd_home.stop()
        devd_home.env.pop("DOCKER_HOST", None)
        devd_home.start()
        devd_home.run("release", str(tree), "--yes", "--no-backup", timeout=120)
        devd_home.stop()


def _load(state_dir: str) -> str:
    return instance.load(Path(state_dir))


def test_the_instance_id_is_made_once_private_and_never_guessed(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = set(pool.map(_load, [str(tmp_path)] * 8))
    assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{16}", ids.pop())
    path = tmp_path / instance.FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [instance.FILE]  # no temp files left
    path.write_text("")  # damaged: refused, never replaced by a new id
    with pytest.raises(DevdError, match="does not hold a devd instance id"):
        instance.load(tmp_path)
    assert path.read_text() == ""


def _old_identifier(wt_id: str, prefix: str = "devd_") -> str:
    digest = hashlib.sha256(wt_id.encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9_]+", "_", wt_id.lower()).strip("_")
    return f"{prefix}{base[:63 - len(prefix) - 9].rstrip('_')}_{digest}"


def test_names_leave_room_for_test_prefix_and_old_names_keep_working() -> None:
    long_ids = [naming.worktree_id(Path("/src/" + "shop" * 6), Path("/src/" + "w" * 40 + str(i)))
                for i in range(2)]
    for wt_id in long_ids:
        name = pgnames.identifier(wt_id)
        assert len(name) <= 58 and len(pgnames.test_database(name)) <= 63
        # Container and volume names are unchanged: existing ones are still found.
        assert pgnames.docker_name(wt_id) == \
            "devd-pg-" + _old_identifier(wt_id, "").replace("_", "-")
        old = _old_identifier(wt_id)  # a 63-byte name recorded by an older devd
        assert len(old) == 63 and len(pgnames.test_database(old)) <= 63
    olds = {pgnames.test_database(_old_identifier(wt_id)) for wt_id in long_ids}
    assert len(olds) == 2
    assert pgnames.test_database("devd_shop_a_1") == "test_devd_shop_a_1"
