"""The two halves of systemd's daemon protocol devd uses, in the standard library only.

- Socket activation (sd_listen_fds(3)): systemd binds the socket and passes it as fd 3,
  announcing it with LISTEN_FDS and LISTEN_PID (the pid guards against inherited variables).
- Readiness (sd_notify(3)): datagrams such as READY=1, STATUS=..., STOPPING=1 sent to the
  AF_UNIX socket named by NOTIFY_SOCKET ('@' means the abstract namespace).
Both are no-ops when the variables are absent, so the same daemon runs anywhere.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("devd")
SD_LISTEN_FDS_START = 3


def activated(environ: MutableMapping[str, str] | None = None) -> bool:
    """True if the service manager passed this process sockets (read before listen_fds)."""
    env = os.environ if environ is None else environ
    return env.get("LISTEN_FDS", "").isdigit() and env.get("LISTEN_PID") == str(os.getpid())


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by the service manager, removing the variables so children never see them."""
    env = os.environ if environ is None else environ
    count, pid = env.pop("LISTEN_FDS", ""), env.pop("LISTEN_PID", "")
    env.pop("LISTEN_FDNAMES", None)
    if not count.isdigit() or pid != str(os.getpid()):
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)  # systemd passes them inheritable; our children must not
        sockets.append(socket.socket(fileno=fd))
    return sockets


class Notifier:
    """Sends state changes to the service manager, if one asked for them."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Take NOTIFY_SOCKET out of the environment: only the main process may notify."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None) or None)

    def notify(self, *assignments: str) -> bool:
        """Send e.g. notify("READY=1", "STATUS=serving"); False when there is no manager."""
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:  # a manager that went away must not take the daemon with it
            log.warning("cannot notify the service manager at %s: %s", self.address, exc)
            return False
        return True
