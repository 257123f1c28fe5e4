"""Postgres per worktree: a schema, a database or a container, and dumps before drops.

    names.py        identifiers, markers, connection strings
    server.py       the admin connection: privileges, claims, sessions
    dump.py         pg_dump / pg_restore
    records.py      what the registry keeps, which server a worktree lives on
    sqlmodes.py     schema and database modes
    container.py    container mode (Docker SDK)
    provisioner.py  the provisioner, the face of this package
"""
