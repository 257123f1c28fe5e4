"""Named URLs through a real Caddy, and the dashboard (issue 11, parts 3 and 5).

    names.py        DNS-safe labels and hostnames under .localhost
    routes.py       the route table: every named port of every live worktree
    config.py       the whole Caddy config as JSON (admin on a unix socket)
    caddy.py        finding the binary; the admin API over its unix socket
    child.py        Caddy as the daemon's child: start, push, restart with back-off, stop
    dashboard.py    the dashboard's HTTP server on a unix socket; page.py its HTML
    provisioner.py  DEVD_URL / DEVD_URL_<PORT> in the env contract
    api.py          the "proxy" object and URLs in `status`
"""
