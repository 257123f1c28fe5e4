"""Shared by the container and Compose tests: the local Redis image, a Redis client over a
raw socket, and the cleanup of what a test's devd made."""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

from pgsupport import docker_client, unavailable

REDIS_IMAGE = os.environ.get("DEVD_TEST_REDIS_IMAGE", "local/redis:7")
LABEL_INSTANCE = "devd.instance"


def redis_client() -> Any:
    """The engine with the Redis test image (built by .ci/docker-redis.sh)."""
    client = docker_client()
    try:
        client.images.get(REDIS_IMAGE)
    except Exception:  # noqa: BLE001 - absent: skip locally, fail on CI
        unavailable(f"image {REDIS_IMAGE} is missing: run bash .ci/docker-redis.sh")
    return client


def compose_available() -> None:
    if not shutil.which("docker-compose"):
        unavailable("docker-compose is not installed (apt-get install docker-compose)")


def redis(port: int, *command: str, db: int = 0) -> str:
    """One command (RESP, bulk strings) on 127.0.0.1:port; the reply's first line."""
    parts = (["SELECT", str(db)] if db else []), list(command)
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for argv in (p for p in parts if p):
            sock.sendall(f"*{len(argv)}\r\n".encode() + b"".join(
                f"${len(a.encode())}\r\n{a}\r\n".encode() for a in argv))
            out = _line(sock)
    return out.decode()


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        data += sock.recv(1)
    if data == b"$-1\r\n":
        return b""  # nil
    if data.startswith(b"$"):
        return _line(sock).rstrip(b"\r\n")
    return data.rstrip(b"\r\n")


def remove_instance(client: Any, instance_id: str) -> None:
    """Every container, volume and network one devd instance labelled (tests' cleanup)."""
    mine = {"label": f"{LABEL_INSTANCE}={instance_id}"}
    for container in client.containers.list(all=True, filters=mine):
        container.remove(force=True, v=True)
    for volume in client.volumes.list(filters=mine):
        volume.remove(force=True)
    for network in client.networks.list(filters=mine):
        network.remove()
