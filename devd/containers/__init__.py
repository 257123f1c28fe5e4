"""Containers per worktree: Compose projects and declared containers (Redis first).

    engine.py    the Docker client, ownership labels, images, readiness, errors
    volumes.py   tarball backups of named volumes, their restore, copies between volumes
    runner.py    the Compose CLI (v2 plugin preferred, docker-compose 1.x otherwise)
    compose.py   [compose]: a project per worktree from `docker compose config`
    project.py   the resolved Compose file devd writes (ports leased, names dropped, labels)
    declared.py  [containers.NAME]: one container per worktree through the Docker SDK
    shared.py    the Redis shared mode: one server, a database index per worktree

Everything devd makes here carries the labels devd.owner (worktree id), devd.instance and
devd.kind; nothing without them is ever stopped or removed. The docker package is imported
lazily: the CLI never imports this package.
"""
