"""Rough edges (issue 13) that need a real Postgres server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Devd, Repo
from pgsupport import start_server, with_postgres

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
