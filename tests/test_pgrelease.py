"""Release and gc against a real Postgres server: every precondition first, then all or
nothing; test databases; a worktree re-created while gc runs is left alone."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import Devd, Repo, run_git, wait_for
from pgsupport import IMAGE, TEST_LABEL, docker_client, env_of, query, with_postgres

from devd import naming
from devd.postgres import names as pgnames

pytestmark = pytest.mark.postgres


@pytest.fixture
def pgdevd(devd_home: Devd, pg_url: str) -> Iterator[Devd]:
    devd_home.env["DEVD_POSTGRES_URL"] = pg_url
    devd_home.start()
    yield devd_home
    if devd_home.proc is not None:
        assert devd_home.stop() == 0, devd_home.log()


def exists(url: str, kind: str, name: str) -> bool:
    table, column = {"role": ("pg_roles", "rolname"), "database": ("pg_database", "datname"),
                     "schema": ("pg_namespace", "nspname")}[kind]
    return bool(query(url, f"SELECT 1 FROM {table} WHERE {column} = %s", name))


def intact(devd: Devd, tree: Path, before: dict, env: dict[str, str]) -> None:
    """Everything of the worktree is as it was before a refused release."""
    after = devd.worktree(tree)
    assert after["state"] == before["state"] and after["ports"] == before["ports"]
    assert [r["state"] for r in after["resources"]] == [r["state"] for r in before["resources"]]
    assert Path(after["cache_dir"]).is_dir() and Path(after["browser_profile"]).is_dir()
    assert f"DATABASE_URL={env['DATABASE_URL']}" in (tree / ".env").read_text()
    assert query(env["DATABASE_URL"], "SELECT 1") == [(1,)]


def refused(devd: Devd, tree: Path, *expected: str) -> None:
    result = devd.run("release", str(tree), "--yes", check=False)
    assert result.returncode == 1, result.stderr
    for text in ("nothing was released", *expected):
        assert text in result.stderr, result.stderr


def test_release_with_a_session_open_touches_nothing(pgdevd: Devd, repo: Repo,
                                                     pg_url: str) -> None:
    with_postgres(repo, 'mode = "database"\n')
    tree = repo.worktree("shop-held", "held")
    pgdevd.run("provision", str(tree))
    before, env = pgdevd.worktree(tree), env_of(pgdevd, tree)
    with psycopg.connect(env["DATABASE_URL"], application_name="dev-server"):
        refused(pgdevd, tree, "in use", "dev-server", "--force")
        intact(pgdevd, tree, before, env)
        done = pgdevd.run("release", str(tree), "--yes", "--force")
    assert "dump kept" in done.stdout
    assert not exists(pg_url, "database", env["PGDATABASE"])
    assert not (tree / ".env").exists()  # devd made it, and only its block was in it


def test_objects_depending_on_the_role_refuse_release_before_anything(
        pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    with_postgres(repo, 'mode = "database"\n')
    tree = repo.worktree("shop-deps", "deps")
    pgdevd.run("provision", str(tree))
    before, env = pgdevd.worktree(tree), env_of(pgdevd, tree)
    role, tag = env["PGUSER"], uuid.uuid4().hex[:8]
    # A database of the role's that is no test database is the user's, not devd's.
    query(env["DATABASE_URL"], f'CREATE DATABASE "keep_{tag}"')
    refused(pgdevd, tree, "cannot be dropped", f"owns database keep_{tag}")
    intact(pgdevd, tree, before, env)
    query(pg_url, f'DROP DATABASE "keep_{tag}"')
    # Privileges in a third database, and a table it owns in the admin's database.
    query(pg_url, f'CREATE DATABASE "third_{tag}"')
    third = psycopg.conninfo.make_conninfo(pg_url, dbname=f"third_{tag}")
    query(third, f'CREATE TABLE t (v int); GRANT SELECT ON t TO "{role}"')
    query(pg_url, f'CREATE TABLE "owned_{tag}" (v int); '
                  f'ALTER TABLE "owned_{tag}" OWNER TO "{role}"')
    refused(pgdevd, tree, f"holds privileges in database third_{tag}",
            f"owns table owned_{tag} in database postgres")
    intact(pgdevd, tree, before, env)
    query(pg_url, f'DROP DATABASE "third_{tag}"')
    query(pg_url, f'DROP TABLE "owned_{tag}"')
    pgdevd.run("release", str(tree), "--yes", "--no-backup")
    assert not exists(pg_url, "role", role) and not exists(pg_url, "database", role)


def test_test_databases_createdb_and_a_kept_test_database_does_not_break_gc(
        pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    with_postgres(repo, 'mode = "database"\n')
    # A long directory name: the worktree id overflowed `test_` + name before.
    tree = repo.worktree("shop-" + "keepdb" * 7, "keepdb")
    pgdevd.run("provision", str(tree))
    env = env_of(pgdevd, tree)
    name, test_db = env["PGDATABASE"], env["DEVD_TEST_DATABASE"]
    assert test_db == f"test_{name}" and len(test_db) <= 63
    query(env["DATABASE_URL"], "CREATE TABLE rows (v int); INSERT INTO rows VALUES (7)")
    # What `manage.py test --keepdb` leaves: test_<NAME>, made and owned by the worktree role.
    query(env["DATABASE_URL"], f'CREATE DATABASE "{test_db}"')
    run_git(repo.main, "worktree", "remove", "--force", str(tree))
    result = pgdevd.json("gc", "--grace", "0")
    [entry] = [w for w in result["worktrees"] if w["path"] == str(tree)]
    assert entry["released"], entry
    assert entry["test_databases_dropped"] == [test_db] and len(entry["dumps"]) == 1
    for kind in ("database", "role"):
        assert not exists(pg_url, kind, name)
    assert not exists(pg_url, "database", test_db)
    restored = psycopg.conninfo.make_conninfo(pg_url, dbname=f"r_{uuid.uuid4().hex[:8]}")
    query(pg_url, f'CREATE DATABASE "{psycopg.conninfo.conninfo_to_dict(restored)["dbname"]}"')
    subprocess.run(["/usr/lib/postgresql/15/bin/pg_restore", "--no-owner", "-d", restored,
                    entry["dumps"][0]], check=True, capture_output=True)
    assert query(restored, "SELECT v FROM rows") == [(7,)]


def test_schema_mode_test_databases_are_per_worktree_and_createdb_follows_the_config(
        pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    with_postgres(repo, 'mode = "schema"\n')
    a, b = repo.worktree("shop-ta", "ta"), repo.worktree("shop-tb", "tb")
    envs = []
    for tree in (a, b):
        pgdevd.run("provision", str(tree))
        envs.append(env_of(pgdevd, tree))
    env_a, env_b = envs
    assert env_a["DEVD_TEST_DATABASE"] != env_b["DEVD_TEST_DATABASE"]
    assert env_a["DEVD_TEST_DATABASE"] == f"test_{env_a['PGUSER']}"
    # Two test runs at once, each creating its own test database as its own role.
    for env in envs:
        query(env["DATABASE_URL"], f'CREATE DATABASE "{env["DEVD_TEST_DATABASE"]}"')
    out = pgdevd.run("release", str(a), "--yes").stdout
    assert f"test database dropped (no dump: test runners recreate it): " \
        f"{env_a['DEVD_TEST_DATABASE']}" in out
    assert exists(pg_url, "database", env_b["DEVD_TEST_DATABASE"])
    # CREATEDB is re-applied on every provision: kept across release + provision...
    pgdevd.run("provision", str(a))
    createdb = "SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user"
    assert query(env_of(pgdevd, a)["DATABASE_URL"], createdb) == [(True,)]
    # ...and taken away when devd.toml says so.
    (b / "devd.toml").write_text('[postgres]\nmode = "schema"\ncreatedb = false\n')
    pgdevd.run("provision", str(b))
    assert query(env_b["DATABASE_URL"], createdb) == [(False,)]
    for tree in (a, b):
        pgdevd.run("release", str(tree), "--yes", "--no-backup")
    assert not exists(pg_url, "database", env_b["DEVD_TEST_DATABASE"])
    assert not exists(pg_url, "role", env_b["PGUSER"])


def test_schema_mode_refuses_objects_outside_its_schema(pgdevd: Devd, repo: Repo,
                                                        pg_url: str) -> None:
    with_postgres(repo, 'mode = "schema"\n')
    tree = repo.worktree("shop-out", "out")
    pgdevd.run("provision", str(tree))
    before, env = pgdevd.worktree(tree), env_of(pgdevd, tree)
    role = env["PGUSER"]
    # Inside its schema, and its default privileges: dropped with it, no blockers.
    query(env["DATABASE_URL"], f'CREATE TABLE "{role}".mine (v int); ALTER DEFAULT '
                               f'PRIVILEGES IN SCHEMA "{role}" GRANT SELECT ON TABLES TO PUBLIC')
    query(pg_url, f'CREATE TABLE public."out_{role}" (v int); '
                  f'ALTER TABLE public."out_{role}" OWNER TO "{role}"')
    refused(pgdevd, tree, f"owns table out_{role} in database postgres")
    intact(pgdevd, tree, before, env)
    query(pg_url, f'DROP TABLE public."out_{role}"')
    pgdevd.run("release", str(tree), "--yes", "--no-backup")
    assert not exists(pg_url, "schema", role) and not exists(pg_url, "role", role)


def test_an_unreachable_server_refuses_release_and_touches_nothing(
        pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    with_postgres(repo, 'mode = "database"\n')
    tree = repo.worktree("shop-down", "down")
    pgdevd.run("provision", str(tree))
    before, env = pgdevd.worktree(tree), env_of(pgdevd, tree)
    server = next((c for c in docker_client().containers.list(
        filters={"label": f"{TEST_LABEL}=postgres-server"}) if _publishes(c, env["PGPORT"])),
        None)
    if server is None:
        pytest.skip("the test server is not a container here (DEVD_TEST_DATABASE_URL)")
    server.pause()
    try:
        refused(pgdevd, tree, "cannot connect to Postgres")
    finally:
        server.unpause()
    intact(pgdevd, tree, before, env)
    pgdevd.run("release", str(tree), "--yes", "--no-backup")


def _publishes(container: object, port: str) -> bool:
    ports = getattr(container, "ports", {}) or {}
    return any(b.get("HostPort") == port for bindings in ports.values() for b in bindings or [])


def test_gc_leaves_a_worktree_recreated_and_provisioned_while_it_ran(
        pgdevd: Devd, repo: Repo, pg_url: str) -> None:
    with_postgres(repo, 'mode = "schema"\n')
    # gc releases in path order: shop-a's dump is held up while shop-b comes back.
    a, b = repo.worktree("shop-a", "ra"), repo.worktree("shop-b", "rb")
    for tree in (a, b):
        pgdevd.run("provision", str(tree))
    env_a, env_b = env_of(pgdevd, a), env_of(pgdevd, b)
    query(env_a["DATABASE_URL"], "CREATE TABLE t (v int)")
    query(env_b["DATABASE_URL"], "CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
    for tree in (a, b):
        run_git(repo.main, "worktree", "remove", "--force", str(tree))
    blocker = psycopg.connect(pg_url)  # a transaction holding a lock pg_dump must wait for
    blocker.execute(f'LOCK TABLE "{env_a["PGUSER"]}".t IN ACCESS EXCLUSIVE MODE')
    gc = subprocess.Popen([sys.executable, "-m", "devd", "gc", "--grace", "0"], env=pgdevd.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: query(pg_url, "SELECT 1 FROM pg_stat_activity WHERE application_name"
                               " = 'pg_dump' AND wait_event_type = 'Lock'") != [],
                 timeout=60, what="gc's pg_dump waiting on the lock")
        run_git(repo.main, "worktree", "add", "-q", str(b), "rb")
        pgdevd.run("provision", str(b))
    finally:
        blocker.rollback()
        blocker.close()
        out, err = gc.communicate(timeout=120)
    assert gc.returncode == 0, err
    assert f"released {a}" in out and f"skipped {b} is back" in out, out
    assert pgdevd.worktree(b)["state"] == "ready"
    assert f"DATABASE_URL={env_b['DATABASE_URL']}" in (b / ".env").read_text()
    assert query(env_b["DATABASE_URL"], "SELECT v FROM t") == [(1,)]
    assert not exists(pg_url, "schema", env_a["PGUSER"])
    pgdevd.run("release", str(b), "--yes", "--no-backup")


def test_no_place_for_the_dump_refuses_and_a_drop_failing_stops_the_release(
        pgdevd: Devd, repo: Repo, pg_url: str, tmp_path: Path) -> None:
    with_postgres(repo, 'mode = "schema"\n')
    tree = repo.worktree("shop-stop", "stop")
    pgdevd.run("provision", str(tree))
    before, env = pgdevd.worktree(tree), env_of(pgdevd, tree)
    role = env["PGUSER"]
    query(env["DATABASE_URL"], "CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
    # The dumps dir swapped for a symlink to elsewhere: refused before anything.
    dumps = pgdevd.paths.state_dir / "dumps"
    if dumps.exists():
        dumps.rename(tmp_path / "moved-dumps")
    dumps.symlink_to(tmp_path)
    refused(pgdevd, tree, "not a private directory")
    intact(pgdevd, tree, before, env)
    dumps.unlink()
    # A lock nobody's session check can see (the admin's own) makes the drop time out after
    # the checks passed: the release stops at Postgres and leaves everything else.
    holder = psycopg.connect(pg_url)
    holder.execute(f'SELECT * FROM "{role}".t')
    try:
        stopped = pgdevd.run("release", str(tree), "--yes", "--no-backup", check=False)
    finally:
        holder.close()
    assert stopped.returncode == 1 and "stopped at postgres" in stopped.stderr
    assert "lock timeout" in stopped.stderr and "kept as they were: envfile" in stopped.stderr
    after = pgdevd.worktree(tree)
    assert after["ports"] == before["ports"] and Path(after["cache_dir"]).is_dir()
    assert f"DATABASE_URL={env['DATABASE_URL']}" in (tree / ".env").read_text()
    [pg] = [r for r in after["resources"] if r["kind"] == "postgres"]
    assert pg["state"] == "failed" and "release stopped part-way" in pg["detail"]
    assert query(env["DATABASE_URL"], "SELECT v FROM t") == [(1,)]  # one transaction: intact
    pgdevd.run("release", str(tree), "--yes", "--no-backup")
    assert not exists(pg_url, "role", role) and not exists(pg_url, "schema", role)


@pytest.mark.docker
def test_container_gc_after_the_container_was_removed_dumps_and_drops_everything(
        devd: Devd, repo: Repo) -> None:
    dk = docker_client()
    with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
    tree = repo.worktree("shop-cg", "cg")
    name = pgnames.docker_name(naming.worktree_id(repo.main, tree))
    try:
        devd.run("provision", str(tree), timeout=180)
        env = env_of(devd, tree)
        assert env["DEVD_TEST_DATABASE"] == "test_postgres"
        query(env["DATABASE_URL"], "CREATE TABLE t (v int); INSERT INTO t VALUES (5)")
        query(env["DATABASE_URL"], "CREATE DATABASE test_postgres")
        # The container removed by hand, the volume left: gc brings it up once to dump it.
        dk.containers.get(name).remove(force=True)
        run_git(repo.main, "worktree", "remove", "--force", str(tree))
        out = devd.run("gc", "--grace", "0", timeout=180).stdout
        assert f"released {tree}" in out and "dump kept" in out, out
        assert "test database dropped (no dump: test runners recreate it): test_postgres" in out
        assert not dk.containers.list(all=True, filters={"name": name})
        assert not dk.volumes.list(filters={"name": name})
    finally:
        for found in dk.containers.list(all=True, filters={"name": name}):
            found.remove(force=True, v=True)
        for volume in dk.volumes.list(filters={"name": name}):
            volume.remove(force=True)


def test_a_second_dump_in_the_same_second_never_takes_the_first_ones_name(
        devd_home: Devd) -> None:
    # Taken over, the first would be overwritten, then deleted by a refused release as its
    # own partial dump: the older backup lost.
    from devd.postgres import dump

    first = dump.new_dump_path(devd_home.paths, "wt-1")
    first.write_bytes(b"older backup")
    second = dump.new_dump_path(devd_home.paths, "wt-1")
    second.write_bytes(b"newer")
    assert second != first and first.read_bytes() == b"older backup"
    assert dump.latest(devd_home.paths, "wt-1") == second
