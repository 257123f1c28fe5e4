"""The Docker engine as every container kind sees it: a pinged client, ownership labels,
local images, a readiness wait whose timeout carries the container's logs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from devd import instance
from devd.errors import DevdError, OwnershipConflict
from devd.postgres.names import LABEL_INSTANCE, LABEL_KIND, LABEL_OWNER
from devd.provisioners.base import Progress

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

__all__ = ["LABEL_INSTANCE", "LABEL_KIND", "LABEL_OWNER"]
HOST = "127.0.0.1"  # every port devd publishes is on loopback only
USED_FILE = "containers-used"
CHECK_TIMEOUT = 5  # seconds a status check waits for the engine's answer
# After the engine failed to answer, checks do not ask again for this long: status checks
# every worktree, and behind a hung engine each would wait out the timeout on its own.
SILENT_FOR = 15.0
T = TypeVar("T")
_silent: dict[str, float] = {}  # DOCKER_HOST (or "") → until when (time.monotonic())
_silent_guard = threading.Lock()


class Unanswered(Exception):
    """The engine did not answer a status check's question (or failed to, moments ago)."""

STATE_EVERY = 0.2  # seconds between looks at a starting container's state


def client(timeout: int = 60, hint: str = "then provision again") -> DockerClient:
    """A pinged client (DOCKER_HOST honoured), or an error saying how to get one; `hint`
    ends "start the Docker engine (or set DOCKER_HOST), ..."."""
    import docker

    try:
        found = docker.from_env(timeout=timeout)
        found.ping()
    except docker.errors.DockerException as exc:
        first = _socket_hint() if "Permission denied" in str(exc) \
            else "start the Docker engine (or set DOCKER_HOST)"
        raise DevdError(f"Docker is not reachable: {exc}", f"{first}, {hint}",
                        code="docker_unavailable") from exc
    return found


def _socket_hint() -> str:
    """The engine runs but its socket refuses this process: Debian's is root:docker 0660.
    A process keeps the groups it started with, so a daemon started before the user
    joined the group is refused until it is started again."""
    import grp
    import os
    import pwd

    try:
        group = grp.getgrnam("docker")
    except KeyError:
        group = None
    user = pwd.getpwuid(os.getuid()).pw_name
    if group is not None and user in group.gr_mem and group.gr_gid not in os.getgroups():
        return ("you joined the docker group after this devd daemon started, and it keeps "
                "the groups it started with: run `devd stop` (the next devd command starts "
                "it again, in the group)")
    return ("this user may not use the Docker engine's socket: `sudo usermod -aG docker "
            "$USER`, log in again, then `devd stop` so that the daemon gets the group")


def ask(question: Callable[[DockerClient], T]) -> T:
    """`question` put to the engine (DOCKER_HOST honoured) for a status check: its answer,
    its APIError (docker.errors.NotFound: it answered), or Unanswered when the engine cannot
    be reached or stays silent, said at once for SILENT_FOR seconds after that."""
    import os

    import docker
    import requests

    host = os.environ.get("DOCKER_HOST", "")
    with _silent_guard:
        if time.monotonic() < _silent.get(host, 0.0):
            raise Unanswered(f"the Docker engine did not answer in the last {SILENT_FOR:.0f} s")
    try:
        answer = question(docker.from_env(timeout=CHECK_TIMEOUT))
    except docker.errors.APIError:
        raise
    except (docker.errors.DockerException, requests.RequestException) as exc:
        with _silent_guard:
            _silent[host] = time.monotonic() + SILENT_FOR
        raise Unanswered(f"the Docker engine did not answer: {exc}") from exc
    with _silent_guard:
        _silent.pop(host, None)
    return answer


def remember(state_dir: Path) -> None:
    """Note that this devd made containers: only then do status and gc scan for orphans
    (a status must not pay an engine round trip for a devd that never used Docker)."""
    (state_dir / USED_FILE).touch(exist_ok=True)


def used(state_dir: Path) -> bool:
    return (state_dir / USED_FILE).exists()


def labels(wt_id: str, kind: str) -> dict[str, str]:
    """Ownership labels: the worktree, this devd instance, and what made it."""
    return {LABEL_OWNER: wt_id, LABEL_INSTANCE: instance.current(), LABEL_KIND: kind}


def ours(tags: dict[str, str] | None, wt_id: str) -> bool:
    """Labelled for this worktree by this devd instance."""
    tags = tags or {}
    return tags.get(LABEL_OWNER) == wt_id and tags.get(LABEL_INSTANCE) == instance.current()


def tags_of(found: Any) -> dict[str, str]:
    """The labels of a container, volume or network model."""
    attrs = found.attrs
    return (attrs.get("Config", {}).get("Labels") if "Config" in attrs
            else attrs.get("Labels")) or {}


def owned(collection: Any, name: str, wt_id: str,
          accept: Callable[[dict[str, str], str], bool] = ours) -> Any:
    """The object named `name` if its labels are `accept`ed as ours; None if absent; a
    conflict if not."""
    import docker

    try:
        found = collection.get(name)
    except docker.errors.NotFound:
        return None
    if not accept(tags_of(found), wt_id):
        raise OwnershipConflict(
            f"Docker {type(found).__name__.lower()} {name!r} exists but is not labelled as "
            f"this devd's for worktree {wt_id}",
            "devd never touches what it did not make: remove or rename it yourself")
    return found


def remove(container: Any, volume: Any) -> None:
    """A container (its anonymous volumes with it), then its named volume, each if there."""
    if container is not None:
        container.remove(force=True, v=True)
    if volume is not None:
        volume.remove()


def ensure_image(dk: DockerClient, image: str, progress: Progress, phase: str,
                 hint: str = "") -> None:
    """The image locally, pulled if missing (its progress at most once a second); a pull
    that fails names the image."""
    import docker

    try:
        dk.images.get(image)
        return
    except docker.errors.ImageNotFound:
        progress(phase, f"pulling {image}")
    hint = hint or f"check the image name and your registry access, or build {image} locally"
    repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    last = 0.0
    try:
        for event in dk.api.pull(repo, tag=tag, stream=True, decode=True):
            if "error" in event:
                raise DevdError(f"cannot pull {image}: {event['error']}", hint,
                                code="docker_image")
            if time.monotonic() - last > 1:
                last = time.monotonic()
                progress(phase, f"pull {image}: {event.get('status', '')} "
                         f"{event.get('progress', '')}".rstrip())
    except docker.errors.APIError as exc:
        raise DevdError(f"image {image} is not here and cannot be pulled: {exc.explanation}",
                        hint, code="docker_image") from exc


def api_error(exc: Any, what: str) -> DevdError:
    """A Docker refusal as devd's error, port clashes said plainly."""
    text = str(getattr(exc, "explanation", None) or exc)
    if "address already in use" in text or "port is already allocated" in text:
        return DevdError(f"{what}: a leased port was taken by another process ({text})",
                         "see `devd ports`; stop the holder, then provision again",
                         code="docker_error")
    return DevdError(f"Docker refused for {what}: {text}", "see `docker ps -a` and its logs",
                     code="docker_error")


def wait_ready(container: Container, probe: Callable[[], bool], timeout: float,
               explain: Callable[[str], DevdError | None] | None = None) -> None:
    """Poll `probe` until it answers True; an exit or the timeout fails with the logs
    (`explain` reads them first: a refusal it knows, as its own error, else None)."""
    deadline = time.monotonic() + timeout
    looked = time.monotonic()
    while not probe():
        # The container's state is an API round trip (~30 ms loaded): looked up a few times
        # a second, so the probe itself, which is cheap, runs every 20 ms.
        if time.monotonic() - looked >= STATE_EVERY:
            looked = time.monotonic()
            container.reload()
            if container.status in ("exited", "dead"):
                raise failed(container, f"container {container.name} exited", explain)
        if time.monotonic() > deadline:
            raise failed(container, f"container {container.name} not ready after "
                         f"{timeout:.0f} s", explain)
        time.sleep(0.02)


def failed(container: Container, message: str,
           explain: Callable[[str], DevdError | None] | None = None) -> DevdError:
    logs = container.logs(tail=15).decode(errors="replace").strip() or "(no output)"
    known = explain(logs) if explain is not None else None
    return known or DevdError(f"{message}; last log lines:\n{logs}",
                              f"see `docker logs {container.name}`", code="docker_error")


def state_of(container: Any) -> str:
    """running, stopped or missing; Docker's own health when the image declares one."""
    if container is None:
        return "missing"
    health = container.attrs.get("State", {}).get("Health", {}).get("Status")
    if container.status == "running":
        return "running" if health in (None, "healthy") else health
    return "stopped"


def exported(templates: dict[str, str], name: str, port: int, db: int = 0) -> dict[str, str]:
    """[containers.NAME] vars with {port}, {host}, {db} and {name} filled in."""
    values = {"port": port, "host": HOST, "db": db, "name": name}
    try:
        return {key: template.format(**values) for key, template in templates.items()}
    except (KeyError, IndexError, ValueError) as exc:
        raise DevdError(f"[containers.{name}] vars: {exc!r} is not one of {{port}}, {{host}}, "
                        "{db}, {name}", "fix the template in devd.toml", code="config") from exc


def ping(port: int, db: int | None = None) -> bool:
    """Redis answers PONG on 127.0.0.1:port (a loading server says -LOADING: not yet)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def connects(port: int) -> bool:
    """Something in the container accepts on 127.0.0.1:port. Docker's proxy accepts on the
    published port even when nothing listens inside, then closes at once: a connection that
    closes without a byte is not ready; one that stays open (the server waits for the
    client) or greets is."""
    try:
        sock = socket.create_connection((HOST, port), timeout=2)
    except OSError:
        return False
    with sock:
        sock.settimeout(0.2)
        try:
            return sock.recv(1) != b""
        except TimeoutError:
            return True  # open and silent: a server waiting for its client to speak
        except OSError:
            return False
