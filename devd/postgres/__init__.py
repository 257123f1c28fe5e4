"""Postgres per worktree: a schema, a database or a container, and dumps before drops.

    names.py        identifiers, markers, connection strings
    server.py       the admin connection: privileges, claims, sessions
    dump.py         pg_dump / pg_restore
    records.py      what the registry keeps, which server a worktree lives on
    sqlmodes.py     schema and database modes
    container.py    container mode (Docker SDK)
    datadirs.py     data dirs on the host: markers, reflink-or-copy, disk use (FIEMAP)
    snapshots.py    devd db snapshot: pg_basebackup, validated by a clean start
    clones.py       a container on its own clone of a snapshot; reset
    provisioner.py  the provisioner, the face of this package
"""
