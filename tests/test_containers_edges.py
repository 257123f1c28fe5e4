"""The bad input of [compose] and [containers]: each refused plainly, nothing foreign touched."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Devd, Repo, unavailable_here
from containersupport import REDIS_IMAGE, compose_available, redis_client, remove_instance

from devd import naming

pytestmark = pytest.mark.docker
TOML = '[ports]\nnames = ["web"]\n\n[compose]\nfiles = ["compose.yaml"]\nstart = {start}\n'


@pytest.fixture
def dk(devd: Devd) -> Iterator[Any]:
    client = redis_client()
    yield client
    remove_instance(client, (devd.paths.state_dir / "instance-id").read_text().strip())


def compose_repo(make_repo: Any, compose: str, start: bool = False) -> Repo:
    compose_available()
    repo = make_repo(devd_toml=TOML.format(start=str(start).lower()))
    repo.commit({"compose.yaml": compose})
    return repo


def failing(devd: Devd, *args: str) -> str:
    done = devd.run(*args, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stderr


def test_compose_syntax_error_and_an_image_that_cannot_be_pulled_say_what_compose_says(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    repo = compose_repo(make_repo, 'services:\n  web:\n    image: x\n    ports:\n     - "1:2\n',
                        start=True)
    tree = repo.worktree("shop-a", "a")
    stderr = failing(devd, "provision", str(tree))
    assert "compose.yaml" in stderr and "line 5" in stderr
    repo.commit({"compose.yaml": "services:\n  web:\n    image: devd-test/absent:1\n"})
    stderr = failing(devd, "provision", str(repo.main))
    assert "compose up of project" in stderr and "devd-test/absent:1" in stderr


def test_port_range_gets_a_leased_port_each_and_host_network_is_refused(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    repo = compose_repo(make_repo, f'services:\n  web:\n    image: {REDIS_IMAGE}\n'
                        '    ports:\n      - "3000-3002:3000-3002"\n')
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree), timeout=120)
    env = json.loads(devd.run("env", str(tree), "--format", "json").stdout)
    ports = {env[f"PORT_WEB_{p}"] for p in (3000, 3001, 3002)}
    assert len(ports) == 3 and not ports & {"3000", "3001", "3002"}
    # start = false: `devd compose up` and `down` drive it; status shows the service.
    devd.run("compose", "up", "--path", str(tree), timeout=120)
    assert [(r["name"], r["state"]) for r in devd.worktree(tree)["containers"]] == [
        ("web", "running")]
    assert "compose  web (running)" in devd.run("status", str(tree)).stdout
    devd.run("compose", "down", cwd=tree, timeout=120)  # --path defaults to .
    assert devd.worktree(tree)["containers"] == []
    repo.commit({"compose.yaml": f"services:\n  web:\n    image: {REDIS_IMAGE}\n"
                 "    network_mode: host\n"})
    stderr = failing(devd, "provision", str(repo.main))
    assert "network_mode: host" in stderr and "cannot isolate" in stderr


def test_foreign_project_objects_and_the_main_worktrees_own_project_are_never_touched(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    repo = compose_repo(make_repo, f"services:\n  cache:\n    image: {REDIS_IMAGE}\n"
                        "    volumes: [data:/data]\nvolumes:\n  data:\n", start=True)
    repo.commit({"devd.toml": TOML.format(start="true") + "copy_volumes = true\n"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    subprocess.run(["docker-compose", "up", "-d"], cwd=repo.main, env=env, check=True,
                   capture_output=True, timeout=120)
    try:
        own = dk.containers.list(filters={"label": "com.docker.compose.project=shop"})
        assert len(own) == 1
        own[0].exec_run(["redis-cli", "SET", "k", "main"])
        own[0].exec_run(["redis-cli", "SAVE"])
        tree = repo.worktree("shop-a", "a")
        # copy_volumes: the worktree's volume starts as the main worktree's.
        provisioned = devd.run("provision", str(tree), timeout=120)
        assert "in use by" in provisioned.stderr  # the copy of a live volume is flagged
        project = "devd-" + naming.worktree_id(repo.main, tree)
        mine = dk.containers.list(filters={"label": f"com.docker.compose.project={project}"})
        assert mine[0].exec_run(["redis-cli", "GET", "k"]).output.strip() == b"main"
        # A container under the worktree's project name, without devd's labels: devd
        # refuses to act on the project at all, and to release it.
        foreign = dk.containers.create(REDIS_IMAGE, name=f"foreign-{project}",
                                       labels={"com.docker.compose.project": project})
        try:
            assert "not labelled as this devd's" in failing(devd, "compose", "up", "--path",
                                                            str(tree))
            assert "not labelled as this devd's" in failing(devd, "release", str(tree),
                                                            "--yes")
            assert dk.containers.get(foreign.id) and mine[0].reload() is None
            assert mine[0].status == "running"
        finally:
            foreign.remove(force=True)
        devd.run("release", str(tree), "--yes", "--no-backup", timeout=120)
        assert own[0].reload() is None and own[0].status == "running"
        # devd in the main worktree: its own project beside the user's, named, untouched.
        noted = devd.run("provision", str(repo.main), timeout=120).stderr
        assert "the Compose project shop started here without devd keeps running" in noted
        devd.run("release", str(repo.main), "--yes", "--no-backup", timeout=120)
        assert own[0].reload() is None and own[0].status == "running"
        assert dk.volumes.get("shop_data")
    finally:
        subprocess.run(["docker-compose", "down", "-v"], cwd=repo.main, env=env,
                       capture_output=True, timeout=120)


def container_repo(make_repo: Any, spec: str) -> Repo:
    return make_repo(devd_toml=f'[ports]\nnames = ["web"]\n\n[containers.svc]\n{spec}')


def test_a_container_never_ready_fails_with_its_logs_and_a_missing_image_says_so(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    repo = container_repo(make_repo, f'image = "{REDIS_IMAGE}"\nport = 6379\ndata = "/data"\n'
                          'ready = "false"\ntimeout = 2\n')
    stderr = failing(devd, "provision", str(repo.main))
    assert "not ready after 2 s" in stderr and "Ready to accept connections" in stderr
    repo.commit({"devd.toml": f'[containers.svc]\nimage = "{REDIS_IMAGE}"\nport = 6379\n'
                 'command = ["sh", "-c", "echo boom-before-exit; exit 3"]\n'})
    stderr = failing(devd, "provision", str(repo.main))
    assert "exited" in stderr and "boom-before-exit" in stderr
    # What a failed provision made is still release's to remove.
    wt_id = devd.worktree(repo.main)["id"]
    assert dk.containers.list(all=True, filters={"label": f"devd.owner={wt_id}"})
    devd.run("release", str(repo.main), "--yes", "--no-backup", timeout=120)
    assert not dk.containers.list(all=True, filters={"label": f"devd.owner={wt_id}"})
    assert not dk.volumes.list(filters={"label": f"devd.owner={wt_id}"})
    repo.commit({"devd.toml": '[containers.svc]\nimage = "devd-test/absent:1"\nport = 80\n'})
    stderr = failing(devd, "provision", str(repo.main))
    assert "devd-test/absent:1" in stderr and "pull" in stderr


def test_a_volume_in_use_by_a_foreign_container_refuses_the_release(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    repo = container_repo(make_repo, f'preset = "redis"\nimage = "{REDIS_IMAGE}"\n')
    devd.run("provision", str(repo.main), timeout=120)
    volume = f"devd-svc-{devd.worktree(repo.main)['id']}"
    holder = dk.containers.create(REDIS_IMAGE, volumes={volume: {"bind": "/x"}})
    try:
        stderr = failing(devd, "release", str(repo.main), "--yes")
        assert "in use by" in stderr and holder.name in stderr
        assert dk.volumes.get(volume) and devd.worktree(repo.main)["containers"]
    finally:
        holder.remove(force=True)
    devd.run("release", str(repo.main), "--yes", timeout=120)


def test_docker_down_is_said_plainly(devd_home: Devd, make_repo: Any) -> None:
    devd_home.env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    devd_home.start()
    try:
        repo = container_repo(make_repo, f'preset = "redis"\nimage = "{REDIS_IMAGE}"\n')
        stderr = failing(devd_home, "provision", str(repo.main))
        assert "Docker is not reachable" in stderr
    finally:
        devd_home.stop()


API = ("python3 -c 'import http.server, os; http.server.HTTPServer((\"127.0.0.1\", "
       "int(os.environ[\"PORT\"])), http.server.BaseHTTPRequestHandler).serve_forever()'")


def test_up_and_down_of_a_whole_worktree_bring_its_compose_project_along(
        devd: Devd, make_repo: Any, dk: Any) -> None:
    compose_available()
    repo = make_repo(devd_toml=f'[ports]\nnames = ["web"]\n\n[compose]\nfiles = ["compose.yaml"]'
                     f'\nstart = false\n\n[services.web]\ncommand = {json.dumps(API)}\n'
                     'port = "web"\n')
    repo.commit({"compose.yaml": f"services:\n  cache:\n    image: {REDIS_IMAGE}\n"})
    tree = repo.worktree("shop-a", "a")
    devd.run("provision", str(tree), timeout=120)
    project = json.loads(devd.run("env", str(tree), "--format", "json").stdout)[
        "COMPOSE_PROJECT_NAME"]
    label = {"label": f"com.docker.compose.project={project}"}
    assert not dk.containers.list(filters=label)  # start = false: not yet
    up = json.loads(devd.run("up", "--path", str(tree), "--json", timeout=120).stdout)
    assert up["compose"] == project and up["services"][0]["state"] == "running"
    assert [c.status for c in dk.containers.list(filters=label)] == ["running"]
    down = json.loads(devd.run("down", "--path", str(tree), "--json", timeout=120).stdout)
    assert down["compose"] == project and down["services"][0]["name"] == "web"
    assert not dk.containers.list(filters=label)
    # Naming a service acts on that service alone.
    up = json.loads(devd.run("up", "--path", str(tree), "web", "--json", timeout=120).stdout)
    assert "compose" not in up and not dk.containers.list(filters=label)
    devd.run("down", "--path", str(tree))


def test_a_backup_cut_short_by_a_full_disk_fails_and_leaves_no_tarball(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file size limit makes the write fail the way a full disk does (EFBIG; Python
    # ignores SIGXFSZ): the release must stop there, with nothing half-written to restore.
    import io
    import resource
    import tarfile

    from devd import instance
    from devd.containers import volumes
    from devd.errors import DevdError

    dk = redis_client()
    monkeypatch.setattr(instance, "_bound", None)
    instance.bind(tmp_path)
    volume = dk.volumes.create(labels={"devd.instance": instance.current()})
    data, packed = os.urandom(256 * 1024), io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tar:
        info = tarfile.TarInfo("dump.rdb")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "compose-data.tar"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        volumes.load(dk, volume.name, _as_file(tmp_path, packed.getvalue()), REDIS_IMAGE,
                     "wt")
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
        with pytest.raises(DevdError, match="nothing was removed") as failed:
            volumes.archive(dk, volume.name, target, REDIS_IMAGE, "wt")
        assert failed.value.code == "backup_failed"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["instance-id", "load.tar"]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        remove_instance(dk, instance.current())


def _as_file(folder: Any, data: bytes) -> Any:
    path = folder / "load.tar"
    path.write_bytes(data)
    return path


def test_a_socket_the_user_may_not_use_says_how_to_join_the_docker_group(tmp_path: Any) -> None:
    """Debian's docker.sock is root:docker 0660: a user outside the group (or a daemon
    started before the user joined it) is told that, not to start an engine that runs."""
    import shutil
    import socket
    import sys

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        unavailable_here("needs root and util-linux's setpriv to run as another user")
    tmp_path.chmod(0o755)
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as engine:
        engine.bind(str(path))
        path.chmod(0o600)
        engine.listen()
        code = ("from devd.containers import engine\ntry: engine.client()\n"
                "except Exception as exc: print(exc.hint)")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-c", code], capture_output=True, text=True,
                             env={"DOCKER_HOST": f"unix://{path}", "PATH": os.environ["PATH"],
                                  "PYTHONPATH": os.pathsep.join(sys.path)}, cwd="/", check=True)
    assert "may not use the Docker engine's socket" in out.stdout, out.stdout + out.stderr
    assert "usermod -aG docker" in out.stdout and "devd stop" in out.stdout
    assert "start the Docker engine" not in out.stdout
