"""Snapshots and copy-on-write clones with real Postgres containers, on a loop-mounted XFS
(reflink) made for the session, and on the machine's own filesystem (plain copies)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Devd, Repo, unavailable_here, wait_for
from pgsupport import IMAGE, env_of, image_client, query, remove_owned, with_postgres

from devd.postgres import datadirs

pytestmark = pytest.mark.docker
SNAPSHOT_TOML = f'mode = "container"\nimage = "{IMAGE}"\nsnapshot = "shop"\n'


@pytest.fixture
def home_on_xfs(devd_home: Devd, xfs_mount: Path) -> Iterator[Devd]:
    """The test's daemon with its DEVD_HOME (and so its data dir) on the XFS mount."""
    home = xfs_mount / f"home-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    devd_home.env["DEVD_HOME"] = str(home)
    devd_home.start()
    yield devd_home
    devd_home.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def dk(devd_home: Devd) -> Iterator[Any]:
    """The engine; afterwards every container this test's worktrees got is removed."""
    client = image_client()
    yield client
    ids = {p.name for p in (devd_home.paths.data_dir / "postgres" / "clones").glob("*")}
    ids |= {w["id"] for w in devd_home.status()["worktrees"]} if devd_home.proc else set()
    remove_owned(client, ids)


def _main_with_data(devd: Devd, repo: Repo) -> str:
    """The main worktree in container mode (its own volume) with a table: the source."""
    with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
    devd.run("provision", str(repo.main), timeout=180)
    url = env_of(devd, repo.main)["DATABASE_URL"]
    query(url, "CREATE TABLE t (v text)")
    query(url, "INSERT INTO t VALUES ('from-main')")
    return url


def _clone_config(repo: Repo) -> None:
    with_postgres(repo, SNAPSHOT_TOML)


def _pg(devd: Devd, tree: Path) -> dict[str, Any]:
    return devd.worktree(tree)["postgres"]


def test_snapshot_clones_reset_and_drop_on_xfs(home_on_xfs: Devd, repo: Repo, dk: Any) -> None:
    devd = home_on_xfs
    main_url = _main_with_data(devd, repo)
    # A session holds a transaction open through the snapshot: it is neither stopped nor
    # disconnected, and what it has not committed is not in the snapshot.
    with psycopg.connect(main_url) as held:
        held.execute("INSERT INTO t VALUES ('uncommitted')")
        taken = json.loads(devd.run("db", "snapshot", "--json", cwd=repo.main, timeout=180).stdout)
        held.execute("SELECT 1")
        held.rollback()
    assert taken["name"] == "shop" and taken["pg_major"] == "15"
    assert taken["source"].startswith(str(repo.main))
    _clone_config(repo)
    a, b = repo.worktree("shop-a", "a"), repo.worktree("shop-b", "b")
    for tree in (a, b):
        devd.run("provision", str(tree), timeout=180)
    url_a, url_b = env_of(devd, a)["DATABASE_URL"], env_of(devd, b)["DATABASE_URL"]
    assert query(url_a, "SELECT v FROM t") == [("from-main",)]
    query(url_a, "INSERT INTO t VALUES ('only-a')")
    assert query(url_b, "SELECT v FROM t") == [("from-main",)]
    assert query(main_url, "SELECT count(*) FROM t") == [(1,)]
    pg = _pg(devd, a)
    assert pg["strategy"] == "reflink" and pg["snapshot"] == "shop", pg
    assert "reflink of snapshot shop" in devd.run("status", str(a)).stdout
    data_dir = Path(pg["disk"]["data_dir"])
    assert data_dir.is_relative_to(devd.paths.data_dir) and (data_dir / "PG_VERSION").exists()
    assert pg["disk"]["snapshot_bytes"] > 10 << 20
    assert pg["disk"]["own_bytes"] < pg["disk"]["snapshot_bytes"] / 2, pg["disk"]
    # A clone's server is reached on 127.0.0.1 by password only (it may share the host's
    # network), and can itself be the source of a snapshot.
    wrong = psycopg.conninfo.make_conninfo(url_a, password="wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        query(wrong, "SELECT 1")
    # Nor with what another worktree holds: a's password, main's, or the snapshot's own
    # (every clone starts with it, and swaps it for its own before it is ready).
    marker = devd.paths.data_dir / "postgres" / "snapshots" / "shop" / datadirs.SNAPSHOT_MARKER
    for password in (psycopg.conninfo.conninfo_to_dict(url_a)["password"],
                     psycopg.conninfo.conninfo_to_dict(main_url)["password"],
                     json.loads(marker.read_text())["password"]):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            query(psycopg.conninfo.make_conninfo(url_b, password=password), "SELECT 1")
    # Listening on the loopback only, though a clone may share the host's network.
    for address in _host_addresses():
        with pytest.raises(OSError):
            socket.create_connection((address, _pg(devd, b)["port"]), timeout=2).close()
    again = json.loads(devd.run("db", "snapshot", "--from", str(b), "from-b", "--json",
                                timeout=180).stdout)
    assert again["name"] == "from-b"
    devd.run("db", "drop-snapshot", "from-b")
    # In use: the drop is refused, naming both worktrees.
    refused = devd.run("db", "drop-snapshot", "shop", check=False)
    assert refused.returncode == 1 and str(a) in refused.stderr and str(b) in refused.stderr
    listed = devd.json("db", "snapshots")["snapshots"]
    assert [s["name"] for s in listed] == ["shop"] and set(listed[0]["used_by"]) == {str(a), str(b)}
    # Reset: a's write is gone, the data it had is kept aside, the port stays.
    reset = json.loads(devd.run("db", "reset", str(a), "--json", timeout=180).stdout)
    assert query(url_a, "SELECT v FROM t") == [("from-main",)]
    assert reset["strategy"] == "reflink" and Path(reset["before"]).is_dir()
    assert env_of(devd, a)["DATABASE_URL"] == url_a
    # Released: a dump is kept, the clone goes; the last user gone, the drop succeeds.
    released = devd.json("release", str(a), "--yes")
    assert Path(released["dumps"][0]).stat().st_size > 0
    devd.json("release", str(b), "--yes", "--no-backup")
    assert not data_dir.parent.exists(), "the clone and what its reset kept aside are gone"
    devd.run("db", "drop-snapshot", "shop")
    assert devd.json("db", "snapshots")["snapshots"] == []


def test_full_disk_then_another_filesystem_then_another_major(
        home_on_xfs: Devd, repo: Repo, dk: Any, tmp_path: Path) -> None:
    """The clones dir moves off XFS after the snapshot: first onto a tiny full filesystem
    (nothing is kept, status says why), then onto the machine's own (a copy, said so)."""
    devd = home_on_xfs
    _main_with_data(devd, repo)
    devd.run("db", "snapshot", cwd=repo.main, timeout=180)
    _clone_config(repo)
    clones_dir = devd.paths.data_dir / "postgres" / "clones"
    clones_dir.mkdir(exist_ok=True)
    _mount(["-t", "tmpfs", "-o", "size=4m", "tmpfs"], clones_dir)
    tree = repo.worktree("shop-full", "full")
    try:
        full = devd.run("provision", str(tree), timeout=180, check=False)
        assert full.returncode == 1 and "No space left on device" in full.stderr, full.stderr
        assert "free space" in full.stderr
        failed = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "postgres"]
        assert failed[0]["state"] == "failed" and "nothing was kept" in failed[0]["detail"]
        assert not (clones_dir / devd.worktree(tree)["id"] / "pgdata").exists()
        # The container created while the clone ran went with it.
        name = devd.worktree(tree)["postgres"]["name"]
        assert not dk.api.containers(all=True, filters={"name": f"^/{name}$"}), name
    finally:
        subprocess.run(["umount", str(clones_dir)], check=True)
    elsewhere = tmp_path / "clones-on-root-fs"
    elsewhere.mkdir()
    _mount(["--bind"], clones_dir, source=elsewhere)
    try:
        copied = devd.run("provision", str(tree), timeout=180)
        assert "cannot share blocks" in copied.stderr and "copied it in full" in copied.stderr
        assert _pg(devd, tree)["strategy"] == "copy"
        shown = [r for r in devd.worktree(tree)["resources"] if r["kind"] == "postgres"]
        assert shown[0]["state"] == "ready" and not shown[0]["detail"], "no stale error"
        assert query(env_of(devd, tree)["DATABASE_URL"], "SELECT v FROM t") == [("from-main",)]
        # A snapshot made by another major version is refused before anything starts.
        snapshot = devd.paths.data_dir / "postgres" / "snapshots" / "shop"
        marker = json.loads((snapshot / datadirs.SNAPSHOT_MARKER).read_text())
        (snapshot / datadirs.SNAPSHOT_MARKER).write_text(json.dumps(marker | {"pg_major": "16"}))
        other = repo.worktree("shop-v16", "v16")
        refused = devd.run("provision", str(other), timeout=180, check=False)
        assert refused.returncode == 1 and "made by PostgreSQL 16" in refused.stderr
        assert "runs PostgreSQL 15" in refused.stderr
        devd.json("release", str(tree), "--yes")
    finally:
        subprocess.run(["umount", str(clones_dir)], check=True)


def _mount(options: list[str], target: Path, source: Path | None = None) -> None:
    if os.geteuid() != 0:
        unavailable_here("mounting a filesystem for the test needs root")
    done = subprocess.run(["mount", *options, *([str(source)] if source else []), str(target)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        unavailable_here(f"cannot mount for the test: {done.stderr.strip()}")


def test_source_down_mid_copy_keeps_nothing(devd: Devd, repo: Repo, dk: Any) -> None:
    _main_with_data(devd, repo)
    snapshots = devd.paths.data_dir / "postgres" / "snapshots"
    proc = subprocess.Popen([*_devd_argv(), "db", "snapshot", "--max-rate", "1M", "slow"],
                            cwd=repo.main, env=devd.env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(datadirs.allocated(p) > (1 << 20) for p in snapshots.glob(".*")),
                 timeout=60, what="the copy to be under way")
        dk.containers.get(devd.worktree(repo.main)["postgres"]["name"]).kill()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr
    assert "pg_basebackup of" in stderr and "nothing was kept" in stderr, stderr
    assert list(snapshots.iterdir()) == []
    assert devd.json("db", "snapshots")["snapshots"] == []


def test_url_snapshot_and_a_plain_copy_on_this_filesystem(devd: Devd, repo: Repo,
                                                          dk: Any) -> None:
    """--from URL runs the host's pg_basebackup; the machine's own filesystem (ext4 here)
    cannot share blocks, so the clone is a full copy and says so."""
    url = _main_with_data(devd, repo)
    with_postgres(repo, SNAPSHOT_TOML.replace('"shop"', '"byurl"'))  # its image validates
    refused = devd.run("db", "snapshot", "--from", url, "byurl", check=False, timeout=120,
                       cwd=repo.main)
    assert refused.returncode == 1 and "pg_hba.conf" in refused.stderr, refused.stderr
    assert env_of(devd, repo.main)["PGPASSWORD"] not in refused.stderr, "the password is masked"
    source = dk.containers.get(devd.worktree(repo.main)["postgres"]["name"])
    source.exec_run(["sh", "-c", 'echo "host replication all all scram-sha-256" '
                     '>> "$PGDATA/pg_hba.conf"'], user="postgres")
    query(url, "SELECT pg_reload_conf()")
    # The password in the CLI's PGPASSWORD, not in its argv (which `ps` shows everyone).
    password = env_of(devd, repo.main)["PGPASSWORD"]
    taken = json.loads(devd.run("db", "snapshot", "--from", url.replace(f":{password}@", "@"),
                                "byurl", "--json", timeout=180, cwd=repo.main,
                                env={"PGPASSWORD": password}).stdout)
    assert taken["source"] == url.replace(f":{password}@", "@")
    assert "password" not in json.dumps(taken) and password not in json.dumps(taken)
    tree = repo.worktree("shop-url", "url")
    done = devd.run("provision", str(tree), timeout=180)
    expected = "reflink" if _can_share(devd.paths.data_dir) else "copy"
    assert _pg(devd, tree)["strategy"] == expected
    if expected == "copy":
        assert "cannot share blocks" in done.stderr, done.stderr
        assert "copy of snapshot byurl" in devd.run("status", str(tree)).stdout
    assert query(env_of(devd, tree)["DATABASE_URL"], "SELECT v FROM t") == [("from-main",)]


def _host_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (`hostname -I`)."""
    done = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False)
    return [a for a in done.stdout.split() if "." in a and not a.startswith("127.")]


def _can_share(directory: Path) -> bool:
    from devd import reflink

    probe = directory / "probe"
    probe.write_bytes(b"x")
    try:
        return reflink.supported(probe, directory)
    finally:
        probe.unlink()


def _devd_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "devd"]


def test_hostile_snapshot_names_are_refused_and_reset_needs_a_snapshot(
        devd: Devd, repo: Repo) -> None:
    for name in ("../x", ".hidden", "Shop", "a/b", "x" * 64, "-rf"):
        done = devd.run("db", "drop-snapshot", "--", name, check=False)
        assert done.returncode == 2 and "is not a snapshot name" in done.stderr, done.stderr
    devd.run("provision", str(repo.main))
    done = devd.run("db", "reset", str(repo.main), check=False)
    assert done.returncode == 1 and 'snapshot = "NAME"' in done.stderr, done.stderr


def test_a_daemon_killed_mid_snapshot_leaves_what_the_next_one_and_gc_remove(
        devd: Devd, repo: Repo, dk: Any) -> None:
    _main_with_data(devd, repo)
    snapshots = devd.paths.data_dir / "postgres" / "snapshots"
    instance_id = (devd.paths.state_dir / "instance-id").read_text().strip()
    mine = {"label": ["devd.kind=snapshot", f"devd.instance={instance_id}"]}

    def helpers() -> list[str]:  # the raw listing: no inspect of a container going meanwhile
        return [c["Names"][0].lstrip("/") for c in dk.api.containers(all=True, filters=mine)]

    def helper(kind: str, instance: str) -> Any:
        name = f"devd-test-{kind}-{uuid.uuid4().hex[:8]}"
        return dk.containers.create(IMAGE, ["true"], name=name, labels={
            "devd.kind": "snapshot", "devd.instance": instance, "devd.run": "0badc0de"})

    # Not this devd's: a helper-looking container of another instance stays, unlisted.
    foreign = helper("foreign", "0" * 16)
    try:
        # The slowest copy pg_basebackup allows: the daemon dies while it runs.
        proc = subprocess.Popen([*_devd_argv(), "db", "snapshot", "--max-rate", "32k", "slow"],
                                cwd=repo.main, env=devd.env, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: helpers() and list(snapshots.glob(".slow.partial-*")), timeout=60,
                     what="the helper container and the partial copy")
            assert devd.proc is not None
            devd.proc.kill()  # SIGKILL: no cleanup of any kind runs
            devd.proc.wait(timeout=60)
            devd.proc = None
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode != 0 and "Traceback" not in stderr, stderr
        assert helpers() and list(snapshots.glob(".slow.partial-*"))  # what the kill left
        # The next daemon removes both, and only those.
        devd.start()
        wait_for(lambda: not helpers() and not list(snapshots.glob(".slow.*")), timeout=60,
                 what="the next daemon to remove the killed one's leftovers")
        dk.containers.get(foreign.id)
        assert devd.json("db", "snapshots")["snapshots"] == []
        # Left while this daemon runs (as a daemon killed meanwhile would, had another served
        # this data dir): status lists them as orphans, `devd gc` removes them.
        stale = helper("stale", instance_id)
        (snapshots / ".shop.partial-0badc0de" / "pgdata").mkdir(parents=True)
        (snapshots / ".shop.partial-0badc0de" / "devd-snapshot.json").write_text(
            json.dumps({"instance": instance_id, "name": "shop", "partial": "0badc0de"}))
        listed = devd.json("gc", "--dry-run")["orphans"]
        assert {"kind": "snapshot helper", "name": stale.name, "worktree_id": "",
                "where": "docker"} in listed, listed
        assert any(o["kind"] == "partial snapshot" and
                   o["name"].endswith(".shop.partial-0badc0de") for o in listed), listed
        assert not any(foreign.name in o["name"] for o in listed), listed
        assert any(o["kind"] == "snapshot helper" for o in devd.status()["orphans"])
        done = devd.json("gc")
        assert stale.name in done["snapshot_leftovers_removed"], done
        assert not any("snapshot" in o["kind"] for o in done["orphans"]), done
        assert not (snapshots / ".shop.partial-0badc0de").exists()
        dk.containers.get(foreign.id)
    finally:
        foreign.remove(force=True)


def test_a_reset_that_fills_the_disk_keeps_the_data_it_had(devd: Devd, repo: Repo,
                                                          dk: Any) -> None:
    """The reset's new clone is made beside the data while the server stops: a full disk
    leaves the data as it was, the server started again on it, and no half copy."""
    _main_with_data(devd, repo)
    devd.run("db", "snapshot", cwd=repo.main, timeout=180)
    _clone_config(repo)
    snap = devd.paths.data_dir / "postgres" / "snapshots" / "shop" / datadirs.PGDATA
    clones_dir = devd.paths.data_dir / "postgres" / "clones"
    clones_dir.mkdir(exist_ok=True)
    # Room for one plain copy of the snapshot (tmpfs cannot share blocks), not for two.
    _mount(["-t", "tmpfs", "-o", f"size={datadirs.allocated(snap) * 3 // 2}", "tmpfs"],
           clones_dir)
    tree = repo.worktree("shop-full", "full")
    try:
        devd.run("provision", str(tree), timeout=180)
        url = env_of(devd, tree)["DATABASE_URL"]
        query(url, "INSERT INTO t VALUES ('kept')")
        full = devd.run("db", "reset", str(tree), timeout=180, check=False)
        assert full.returncode == 1 and "No space left on device" in full.stderr, full.stderr
        assert "nothing was kept" in full.stderr and "Traceback" not in full.stderr
        assert query(url, "SELECT v FROM t ORDER BY v") == [("from-main",), ("kept",)]
        root = clones_dir / devd.worktree(tree)["id"]
        assert sorted(p.name for p in root.iterdir()) == [datadirs.CLONE_MARKER, "pgdata"]
        assert _pg(devd, tree)["state"] == "running"
        devd.json("release", str(tree), "--yes", "--no-backup")
    finally:
        subprocess.run(["umount", str(clones_dir)], check=True)


def test_a_foreign_server_on_a_clones_port_is_never_taken_for_it(devd: Devd, repo: Repo,
                                                                 dk: Any) -> None:
    """A clone shares the host's network: a server someone else started on its leased port
    meanwhile (a trusting local one, say) answers the readiness probe. devd must not log in
    to it, let alone set its superuser's password, nor say the worktree is ready.
    And a source that logs DDL into its data dir: no password devd sets lands in the log
    every clone copies."""
    main_url = _main_with_data(devd, repo)
    query(main_url, "ALTER SYSTEM SET logging_collector = on")
    query(main_url, "ALTER SYSTEM SET log_statement = 'ddl'")
    dk.containers.get(_pg(devd, repo.main)["name"]).restart(timeout=10)
    wait_for(lambda: _answers(main_url), timeout=60, what="the main server after a restart")
    devd.run("db", "snapshot", cwd=repo.main, timeout=180)
    _clone_config(repo)
    tree = repo.worktree("shop-squat", "squat")
    devd.run("provision", str(tree), timeout=180)
    pg = _pg(devd, tree)
    snap = devd.paths.data_dir / "postgres" / "snapshots" / "shop"
    secrets = [json.loads((snap / datadirs.SNAPSHOT_MARKER).read_text())["password"],
               pg_password := env_of(devd, tree)["DATABASE_URL"].split(":")[2].split("@")[0]]
    logged = subprocess.run(["grep", "-rlF", "-e", secrets[0], "-e", pg_password,
                             str(snap / datadirs.PGDATA), _pg(devd, tree)["disk"]["data_dir"]],
                            capture_output=True, text=True)
    assert logged.stdout == "", f"a password in the data: {logged.stdout}"
    dk.containers.get(pg["name"]).stop(timeout=10)
    foreign = dk.containers.run(IMAGE, detach=True, ports={"5432/tcp": ("127.0.0.1", pg["port"])},
                                environment={"POSTGRES_HOST_AUTH_METHOD": "trust"},
                                labels={"devd.test": "foreign"})
    try:
        wait_for(lambda: foreign.exec_run(["pg_isready", "-h", "127.0.0.1"]).exit_code == 0,
                 timeout=60, what="the foreign server")
        done = devd.run("db", "reset", str(tree), timeout=180, check=False)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
        # The clone cannot bind the port: it exits, and the reset says so (why is in its
        # log, the source's collector's file here).
        assert "exited" in done.stderr, done.stderr
        code, out = foreign.exec_run(["psql", "-U", "postgres", "-Atc",
                                      "SELECT rolpassword IS NULL FROM pg_authid "
                                      "WHERE rolname = 'postgres'"])
        assert out.decode().strip() == "t", "devd set a foreign server's password"
    finally:
        foreign.remove(force=True)


def _answers(url: str) -> bool:
    try:
        query(url, "SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _kill(devd: Devd) -> None:
    assert devd.proc is not None
    devd.proc.kill()  # SIGKILL: no cleanup of any kind runs
    devd.proc.wait(timeout=15)
    devd.proc = None


def test_a_reset_killed_mid_copy_or_between_its_renames_loses_nothing(
        home_on_xfs: Devd, repo: Repo, dk: Any, tmp_path: Path) -> None:
    devd = home_on_xfs
    _main_with_data(devd, repo)
    devd.run("db", "snapshot", cwd=repo.main, timeout=180)
    _clone_config(repo)
    tree = repo.worktree("shop-killed", "killed")
    devd.run("provision", str(tree), timeout=180)
    url = env_of(devd, tree)["DATABASE_URL"]
    query(url, "INSERT INTO t VALUES ('mine')")
    root = devd.paths.data_dir / "postgres" / "clones" / devd.worktree(tree)["id"]
    # kill -9 once the new clone is copied, before a rename: a cp first on the daemon's PATH
    # copies, then blocks.
    stuck, mark = tmp_path / "bin", tmp_path / "blocked.pid"
    stuck.mkdir()
    (stuck / "cp").write_text(f'#!/bin/sh\n{shutil.which("cp")} "$@" || exit\n'
                              f"echo $$ > {mark}.part && mv {mark}.part {mark} && "
                              "exec sleep 600\n")
    (stuck / "cp").chmod(0o755)
    assert devd.stop() == 0
    path = devd.env["PATH"]
    devd.env["PATH"] = f"{stuck}:{path}"
    devd.start()
    devd.env["PATH"] = path
    reset = subprocess.Popen([*_devd_argv(), "db", "reset", str(tree)], env=devd.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(mark.exists, timeout=60, what="the reset's copy")
    _kill(devd)
    os.kill(int(mark.read_text()), 9)
    reset.wait(timeout=30)
    assert list(root.glob(".incoming-*")), "the kill left the new clone"
    devd.start()  # the next daemon sweeps it; the data is as it was
    wait_for(lambda: not list(root.glob(".incoming-*")), timeout=30, what="the sweep")
    shown = _pg(devd, tree)
    assert shown.get("recovered_reset") is None and shown["state"] != "ready", shown
    devd.run("provision", str(tree), timeout=180)
    assert query(url, "SELECT v FROM t ORDER BY v") == [("from-main",), ("mine",)]
    assert not list(root.glob(datadirs.BEFORE_RESET + "*"))
    devd.run("db", "reset", str(tree), timeout=180)  # a retry works
    assert query(url, "SELECT v FROM t") == [("from-main",)]
    query(url, "INSERT INTO t VALUES ('mine again')")
    # kill -9 between the two renames (no command runs there: the state it leaves is made
    # as the reset makes it: server stopped, data renamed aside, a new clone beside it).
    dk.containers.get(_pg(devd, tree)["name"]).stop()
    _kill(devd)
    kept = root / datadirs.before_reset_name(time.time() + 60)  # not the retry's (1 s apart)
    os.rename(root / datadirs.PGDATA, kept)
    snap = devd.paths.data_dir / "postgres" / "snapshots" / "shop"
    subprocess.run(["cp", "-a", "--reflink=always", str(snap / datadirs.PGDATA),
                    str(root / ".incoming-0badc0de")], check=True)
    marker = json.loads((root / datadirs.CLONE_MARKER).read_text())
    marker["snapshot_password"] = json.loads(
        (snap / datadirs.SNAPSHOT_MARKER).read_text())["password"]
    (root / "devd-reset.json").write_text(json.dumps({
        "instance": marker.pop("instance"), "run": "0badc0de",
        "incoming": ".incoming-0badc0de", "before": kept.name, "marker": marker}))
    devd.start()
    note = _pg(devd, tree)["recovered_reset"]
    assert "finished a reset a killed daemon left" in note and str(kept) in note, note
    assert "finished a reset" in devd.log()
    devd.run("provision", str(tree), timeout=180)  # the new clone has the snapshot's password
    assert query(url, "SELECT v FROM t") == [("from-main",)]
    assert (kept / "PG_VERSION").is_file(), "the data the reset replaced is kept"
    assert "finished a reset" in devd.run("status", str(tree)).stdout
