"""Rough edges (issue 13) that need a real Postgres server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Devd, Repo
from pgsupport import IMAGE, image_client, remove_owned, start_server, with_postgres

from devd import naming
from devd.postgres import names as pgnames

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    yield from start_server()


def test_restore_of_a_missing_dump_says_not_found(devd_home: Devd, repo: Repo,
                                                  pg_url: str) -> None:
    devd_home.env["DEVD_POSTGRES_URL"] = pg_url
    devd_home.start()
    with_postgres(repo, 'mode = "schema"\n')
    devd_home.run("provision", str(repo.main))
    missing = devd_home.run("restore", str(repo.main), "--dump", "/nonexistent.dump",
                            check=False)
    assert missing.returncode == 1 and "not found; nothing was changed" in missing.stderr
    none = devd_home.run("restore", str(repo.main), check=False)
    assert none.returncode == 1 and "no dump of worktree" in none.stderr
    devd_home.run("release", str(repo.main), "--yes", "--no-backup")
    assert devd_home.stop() == 0


@pytest.fixture
def dk(devd: Devd) -> Iterator[Any]:
    """The engine; afterwards every container and volume this test's worktrees got is removed."""
    client = image_client()
    yield client
    remove_owned(client, {w["id"] for w in devd.status()["worktrees"]})


@pytest.mark.docker
def test_first_container_provision_does_not_say_the_volume_was_deleted(
        devd: Devd, repo: Repo, dk: Any) -> None:
    with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
    tree = repo.worktree("shop-vol", "vol")
    first = devd.run("provision", str(tree), timeout=180)
    assert "was deleted" not in first.stdout + first.stderr
    name = pgnames.docker_name(naming.worktree_id(repo.main, tree))
    dk.containers.get(name).remove(force=True, v=True)
    dk.volumes.get(name).remove(force=True)
    again = devd.run("provision", str(tree), timeout=180)
    assert f"volume {name} was deleted: starting with an empty one" in again.stderr
