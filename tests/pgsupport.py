"""Shared by the Postgres and container-mode tests: a real server, skip-or-fail, helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from conftest import Devd, Repo
from conftest import unavailable_here as unavailable

IMAGE = os.environ.get("DEVD_TEST_POSTGRES_IMAGE", "postgres:16-alpine")
TEST_LABEL = "devd.test"


def docker_client() -> Any:
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine here"
        unavailable(f"Docker engine not reachable: {exc}")
    return client


def image_client() -> Any:
    """The engine with the test image present (pulled if it can be): where it is absent the
    container tests skip locally like the others, and fail on CI, instead of erroring."""
    client = docker_client()
    try:
        client.images.get(IMAGE)
    except Exception:  # noqa: BLE001 - not present: try the registry once
        try:
            client.images.pull(IMAGE)
        except Exception as exc:  # noqa: BLE001 - no network, no such image: unavailable
            unavailable(f"image {IMAGE} is not present and cannot be pulled "
                        f"(set DEVD_TEST_POSTGRES_IMAGE to one you have): {exc}")
    return client


def start_server() -> Iterator[str]:
    """A Postgres admin URL: DEVD_TEST_DATABASE_URL, else a testcontainers PostgresContainer."""
    url = os.environ.get("DEVD_TEST_DATABASE_URL")
    if url:
        yield url
        return
    docker_client()
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(IMAGE, username="postgres", password="devd-test-pw",
                                  dbname="postgres", driver=None)
    container.with_kwargs(labels={TEST_LABEL: "postgres-server"})
    try:
        container.start()
    except Exception as exc:  # noqa: BLE001 - image missing, engine refusing: all unavailable
        container.stop()
        unavailable(f"cannot start {IMAGE} with testcontainers: {exc}")
    try:
        yield container.get_connection_url()
    finally:
        container.stop()


def env_of(devd: Devd, tree: Path) -> dict[str, str]:
    return json.loads(devd.run("env", str(tree), "--format", "json").stdout)


def query(url: str, text: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(text, args or None)
        return cur.fetchall() if cur.description else []


def with_postgres(repo: Repo, body: str) -> None:
    repo.commit({"devd.toml": '[ports]\nnames = ["web"]\n\n[postgres]\n' + body})


def remove_owned(client: Any, worktree_ids: set[str]) -> None:
    """Remove the containers (with their volumes) and volumes devd made for these worktrees."""
    from devd.postgres import names as pgnames

    label = {"label": pgnames.LABEL_OWNER}
    for container in client.containers.list(all=True, filters=label):
        if container.labels.get(pgnames.LABEL_OWNER) in worktree_ids:
            container.remove(force=True, v=True)
    for volume in client.volumes.list(filters=label):
        if (volume.attrs.get("Labels") or {}).get(pgnames.LABEL_OWNER) in worktree_ids:
            volume.remove(force=True)
