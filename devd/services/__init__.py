"""Declared dev servers ([services.NAME] in devd.toml), supervised by the daemon.

    config.py     the [services.NAME] model: command, port, dir, env templates, ready, ...
    portflags.py  which framework a command runs and the port flags it needs
    logs.py       per-service log files in the state dir, size-rotated
    groups.py     process groups: spawn, listeners, stop (TERM, grace, KILL), leftovers
    supervisor.py the units: start, wait until ready, restart with backoff, idle stop
    commands.py   `devd up/down/restart/logs` (the CLI side)

Only config.py imports pydantic (for the daemon); the CLI imports only commands.py and logs.py.
"""
