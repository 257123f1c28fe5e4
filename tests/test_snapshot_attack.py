"""Attacks on snapshots, clones and resets: kept-aside data pruned too early, links swapped
in for devd's directories, a URL's password in errors and logs, a reset of a worktree whose
data is not a clone."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Devd, Repo
from pgsupport import IMAGE, image_client, remove_owned, with_postgres

from devd import instance
from devd.errors import DevdError, OwnershipConflict
from devd.paths import Paths
from devd.postgres import clones, datadirs, snapshots

DAY = 86400


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    """A data dir of its own, and this process bound to an instance for the test only."""
    found = Paths(*(tmp_path / d for d in ("config", "state", "cache", "data", "run")))
    was = instance._bound
    instance.bind(found.state_dir)
    yield found
    instance._bound = was


def _outside(tmp_path: Path, marker: str) -> Path:
    """Someone else's directory, with a marker forged to look like this instance's."""
    target = tmp_path / "not-devd"
    (target / datadirs.PGDATA).mkdir(parents=True)
    (target / datadirs.PGDATA / "precious").write_text("keep me")
    (target / marker).write_text(json.dumps({"instance": instance.current(), "name": "shop"}))
    return target


def test_a_reset_of_a_long_stopped_server_keeps_its_data(tmp_path: Path, paths: Paths
                                                         ) -> None:
    root = tmp_path / "clone"
    now = time.time()
    # Just kept aside, but the data dir's mtime is its server's last stop, 30 days ago.
    fresh = root / datadirs.before_reset_name(now)
    old = root / datadirs.before_reset_name(now - 8 * DAY)
    for kept in (fresh, old, root / "before-reset-mine"):
        kept.mkdir(parents=True)
        os.utime(kept, (now - 30 * DAY, now - 30 * DAY))
    outside = _outside(tmp_path, datadirs.CLONE_MARKER)
    (root / datadirs.before_reset_name(now - 9 * DAY)).symlink_to(outside)
    datadirs.prune_before_reset(root, now)
    assert fresh.is_dir(), "what the reset just kept aside is still there"
    assert not old.exists(), "a week and a day after its reset, it goes"
    assert (root / "before-reset-mine").is_dir(), "a name devd does not give is left alone"
    assert (outside / datadirs.PGDATA / "precious").read_text() == "keep me"


def test_a_link_in_place_of_a_snapshot_or_clone_is_never_followed(tmp_path: Path,
                                                                  paths: Paths) -> None:
    outside = _outside(tmp_path, datadirs.SNAPSHOT_MARKER)
    (datadirs.postgres_dir(paths, "snapshots") / "shop").symlink_to(outside)
    with pytest.raises(OwnershipConflict, match="is a symlink"):
        snapshots.drop(paths, "shop", [])
    assert snapshots.listing(paths) == []
    # A directory of that name without devd's marker, or with another instance's: refused.
    for name, marker in (("bare", None), ("theirs", {"instance": "another"})):
        (datadirs.postgres_dir(paths, "snapshots") / name / datadirs.PGDATA).mkdir(parents=True)
        if marker:
            (datadirs.postgres_dir(paths, "snapshots") / name / datadirs.SNAPSHOT_MARKER
             ).write_text(json.dumps(marker))
        with pytest.raises(OwnershipConflict):
            snapshots.drop(paths, name, [])
        assert (datadirs.postgres_dir(paths, "snapshots") / name / datadirs.PGDATA).is_dir()
    (outside / datadirs.CLONE_MARKER).write_text(json.dumps({"instance": instance.current()}))
    clones.clone_root(paths, "wt1").symlink_to(outside)
    with pytest.raises(OwnershipConflict, match="is a symlink"):
        clones.remove(paths, "wt1")
    # A crashed run's partial copy replaced by a link: the link goes, not what it points to.
    partial = datadirs.postgres_dir(paths, "snapshots") / ".shop.partial-1"
    partial.symlink_to(outside)
    datadirs.remove_tree(partial)
    assert not partial.is_symlink()
    assert (outside / datadirs.PGDATA / "precious").read_text() == "keep me"


def test_a_malformed_url_never_shows_or_logs_its_password(devd: Devd) -> None:
    done = devd.run("db", "snapshot", "--from", "postgres://u:s3cret@[h/db", "x", check=False)
    assert done.returncode == 2 and "not a Postgres URL" in done.stderr, done.stderr
    assert "s3cret" not in done.stderr + done.stdout and "s3cret" not in devd.log()


@pytest.mark.docker
def test_reset_of_a_worktree_whose_data_is_a_volume_leaves_it_running(
        devd: Devd, repo: Repo) -> None:
    dk = image_client()
    try:
        with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\n')
        devd.run("provision", str(repo.main), timeout=180)
        # A snapshot of this daemon's (its marker, a data dir): taking a real one costs ~15 s.
        snap = devd.paths.data_dir / "postgres" / "snapshots" / "shop"
        (snap / datadirs.PGDATA).mkdir(parents=True)
        (snap / datadirs.SNAPSHOT_MARKER).write_text(json.dumps(
            {"instance": instance.load(devd.paths.state_dir), "name": "shop", "pg_major": "15"}))
        # devd.toml now asks for the snapshot; the worktree's data is still its volume.
        with_postgres(repo, f'mode = "container"\nimage = "{IMAGE}"\nsnapshot = "shop"\n')
        done = devd.run("db", "reset", str(repo.main), check=False, timeout=120)
        assert done.returncode == 1 and "no Postgres cloned from a snapshot" in done.stderr, \
            done.stderr
        name = devd.worktree(repo.main)["postgres"]["name"]
        assert dk.containers.get(name).status == "running", "reset did not stop it"
    finally:
        remove_owned(dk, {w["id"] for w in devd.status()["worktrees"]})



@pytest.mark.parametrize("url", [
    "host=h password='s3 cret' user=u", "host=h password = s3cret user=u",
    "postgres://u:s3@cret@h/db", "postgres://h/db?user=u&password=s3cret&sslmode=disable"])
def test_a_snapshot_source_label_masks_every_password_form(url: str) -> None:
    # The label lands in the snapshot's marker and in `devd db snapshots`.
    from devd.postgres.names import mask_url

    assert "cret" not in mask_url(url) and "***" in mask_url(url)


def test_a_clone_of_a_snapshot_dropped_and_retaken_meanwhile_is_discarded(
        tmp_path: Path, paths: Paths) -> None:
    snap = datadirs.postgres_dir(paths, "snapshots") / "shop"
    (snap / datadirs.PGDATA).mkdir(parents=True)
    (snap / datadirs.PGDATA / "PG_VERSION").write_text("15\n")
    datadirs.write_marker(snap, datadirs.SNAPSHOT_MARKER, name="shop", pg_major="15",
                          created=2.0)
    # What the worktree read before its copy: the snapshot of that name taken before.
    found = snapshots.find(paths, "shop") | {"created": 1.0}
    root = clones.clone_root(paths, "wt1")
    root.mkdir(parents=True)
    with pytest.raises(DevdError, match="taken again while it was being cloned"):
        clones._copy(found, root / datadirs.PGDATA, lambda *a, **k: None)
    assert not (root / datadirs.PGDATA).exists() and not (root / datadirs.CLONE_MARKER).exists()


@pytest.mark.docker
def test_the_sweep_removes_only_this_instances_crashed_copies(tmp_path: Path,
                                                             paths: Paths) -> None:
    root = datadirs.postgres_dir(paths, "snapshots")

    def copy(name: str, owner: str | None) -> Path:
        where = root / name
        (where / datadirs.PGDATA).mkdir(parents=True)
        (where / datadirs.PGDATA / "precious").write_text("keep me")
        if owner:
            (where / datadirs.SNAPSHOT_MARKER).write_text(json.dumps({"instance": owner}))
        return where

    crashed = copy(".cart.partial-0badc0de", instance.current())
    dropped = copy(".old.dropping-0badc0de", instance.current())
    kept = [copy(".backup.partial-1", None),  # the user's, of a look-alike name
            copy(".shop.partial-0badc0de", "f" * 16),  # another instance's, under way
            copy(f".cart.partial-{snapshots.RUN}", instance.current())]  # this run's
    link = root / ".link.partial-2"
    link.symlink_to(_outside(tmp_path, datadirs.SNAPSHOT_MARKER))
    listed = {o["name"] for o in snapshots.leftovers(paths)}
    assert listed == {str(crashed), str(dropped)}, listed
    assert set(snapshots.remove_leftovers(paths)) == listed
    assert all((k / datadirs.PGDATA / "precious").exists() for k in kept) and link.is_symlink()
    # A drop removes the data before the marker: one killed meanwhile is still swept.
    copy("gone", instance.current())
    assert snapshots.drop(paths, "gone", [])["dropped"] == "gone"
    assert not list(root.glob("*gone*"))
    # A take clears a crashed copy of its name, and only this instance's.
    import docker

    crashed = copy(".shop.partial-0badc0de1", instance.current())
    source = snapshots.Source("gone", container="devd-test-no-such-container", image=IMAGE)
    with pytest.raises(DevdError, match="Docker refused"):
        snapshots.take(docker.from_env(), paths, "shop", source, IMAGE, lambda *a, **k: None)
    assert not crashed.exists() and (kept[1] / datadirs.PGDATA / "precious").exists()
    assert not list(root.glob(f".shop.partial-{snapshots.RUN}"))


def test_a_reset_killed_mid_copy_leaves_a_partial_clone_the_sweep_removes(
        paths: Paths) -> None:
    from devd.postgres.provisioner import orphans, remove_snapshot_leftovers

    def clone(wt_id: str, owner: str, *incoming: str) -> list[Path]:
        root = datadirs.postgres_dir(paths, "clones") / wt_id
        (root / datadirs.PGDATA).mkdir(parents=True)
        (root / datadirs.CLONE_MARKER).write_text(json.dumps({"instance": owner}))
        for name in incoming:
            (root / name / "base").mkdir(parents=True)
        return [root / name for name in incoming]

    crashed, running = clone("wt1", instance.current(), ".incoming-4242",
                             clones.INCOMING + snapshots.RUN)
    theirs, = clone("wt2", "f" * 16, ".incoming-4242")
    (crashed.parent / ".incoming-link").symlink_to(theirs)  # never followed, never removed
    assert clones.crashed_resets(paths) == [crashed]
    assert orphans(paths, {"wt1", "wt2"}) == [{"kind": "partial clone", "name": str(crashed),
                                               "worktree_id": "wt1", "where": "data dir"}]
    assert remove_snapshot_leftovers(paths) == [str(crashed)]
    assert not crashed.exists() and running.is_dir() and (theirs / "base").is_dir()
    assert (crashed.parent / ".incoming-link").is_symlink()
    assert (crashed.parent / datadirs.PGDATA).is_dir(), "the worktree's data stays"


def _interrupted(paths: Paths, wt_id: str, step: int, journal: bool = True) -> Path:
    """A clone dir as a reset killed at `step` left it: 0 before its first rename, 1 between
    its two, 2 after both (its marker not yet rewritten). Old data says "old", new "new"."""
    root = datadirs.postgres_dir(paths, "clones") / wt_id
    root.mkdir()
    datadirs.write_marker(root, datadirs.CLONE_MARKER, worktree=wt_id, snapshot="old-snap")
    incoming, before = root / ".incoming-0badc0de", root / datadirs.before_reset_name()
    for where, what in ((root / datadirs.PGDATA, "old"), (incoming, "new")):
        where.mkdir()
        (where / "PG_VERSION").write_text(what)
    if journal:
        clones._write_journal(root, incoming, before, {"worktree": wt_id, "snapshot": "shop"})
        (root / clones.JOURNAL).write_text((root / clones.JOURNAL).read_text().replace(
            snapshots.RUN, "0badc0de"))  # another run's: a daemon killed since
    if step >= 1:
        os.rename(root / datadirs.PGDATA, before)
    if step >= 2:
        os.rename(incoming, root / datadirs.PGDATA)
    return root


@pytest.mark.parametrize("step", [0, 1, 2])
def test_a_reset_killed_at_any_rename_is_finished_by_the_next_daemon(paths: Paths,
                                                                     step: int) -> None:
    from devd.postgres.provisioner import remove_snapshot_leftovers

    root = _interrupted(paths, "wt1", step)
    assert clones.crashed_resets(paths) == [], "the complete new clone is not swept"
    remove_snapshot_leftovers(paths)  # what the next daemon runs at start
    pgdata = root / datadirs.PGDATA
    assert (pgdata / "PG_VERSION").read_text() == "new"
    before, = root.glob(datadirs.BEFORE_RESET + "*")
    assert (before / "PG_VERSION").read_text() == "old", "the user's data is kept"
    marker = datadirs.read_marker(root, datadirs.CLONE_MARKER) or {}
    assert marker["snapshot"] == "shop" and not (root / clones.JOURNAL).exists()
    assert clones.recovered(pgdata) == marker[clones.RECOVERED]
    assert "finished a reset" in marker[clones.RECOVERED] and str(before) in marker[
        clones.RECOVERED]
    assert not list(root.glob(clones.INCOMING + "*"))


def test_an_older_devds_reset_killed_between_renames_is_rolled_back(paths: Paths) -> None:
    from devd.postgres.provisioner import remove_snapshot_leftovers

    root = _interrupted(paths, "wt1", 1, journal=False)  # its new clone may be partial
    mine = _interrupted(paths, "wt2", 1)
    (mine / clones.JOURNAL).write_text((mine / clones.JOURNAL).read_text().replace(
        "0badc0de", snapshots.RUN))  # a reset under way in this daemon: left alone
    remove_snapshot_leftovers(paths)
    assert (root / datadirs.PGDATA / "PG_VERSION").read_text() == "old"
    assert not list(root.glob(clones.INCOMING + "*")), "the possibly partial clone goes"
    assert "rolled back" in (clones.recovered(root / datadirs.PGDATA) or "")
    assert not (mine / datadirs.PGDATA).exists() and (mine / ".incoming-0badc0de").is_dir()
    assert (mine / clones.JOURNAL).is_file()
    # A journal whose new clone was removed by hand: the data goes back.
    gone = _interrupted(paths, "wt3", 1)
    datadirs.remove_tree(gone / ".incoming-0badc0de")
    assert clones.recover(gone) == clones.ROLLED_BACK
    assert (gone / datadirs.PGDATA / "PG_VERSION").read_text() == "old"
    # One devd cannot read, or naming a path outside: refused, nothing touched.
    for text in ("{", json.dumps({"instance": instance.current(), "incoming": "../../x",
                                  "before": "b", "marker": {"snapshot": "s"}})):
        bad = _interrupted(paths, f"wt-bad-{len(text)}", 1)
        (bad / clones.JOURNAL).write_text(text)
        with pytest.raises(DevdError, match="interrupted reset|outside") as raised:
            clones.recover(bad)
        assert raised.value.code == "reset_interrupted"
        assert {p.name for p in bad.iterdir()} >= {".incoming-0badc0de", clones.JOURNAL}
    assert len(clones.recover_all(paths)) == 0, "logged and left, never raised"


@pytest.mark.docker
def test_an_older_devds_helper_without_a_run_label_goes_once_stopped_and_old(
        paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    dk = image_client()
    datadirs.postgres_dir(paths, "snapshots")
    labels = {"devd.kind": "snapshot", "devd.instance": instance.current()}
    stopped, running = (dk.containers.create(IMAGE, argv, labels=labels,
                                             name=f"devd-test-runless-{os.getpid()}-{i}")
                        for i, argv in enumerate((["true"], ["sleep", "120"])))
    try:
        running.start()
        listed = {o["name"] for o in snapshots.leftovers(paths)}
        assert stopped.name not in listed, "younger than UNLABELLED_AGE: it may be in use"
        monkeypatch.setattr(snapshots, "UNLABELLED_AGE", 0)
        assert {o["name"] for o in snapshots.leftovers(paths)} == {stopped.name}
        assert snapshots.remove_leftovers(paths) == [stopped.name]
        # Listed while stopped, started before its removal: the engine refuses (no force).
        monkeypatch.setattr(snapshots, "_dead_helpers",
                            lambda _: {running.id: (running.name, False)})
        assert snapshots.remove_leftovers(paths) == []
        running.reload()
        assert running.status == "running", "a run-less helper that runs is never removed"
    finally:
        for c in (stopped, running):
            with contextlib.suppress(Exception):
                c.remove(force=True)
