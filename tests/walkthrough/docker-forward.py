"""The host's Docker engine as a stock Debian's own: /var/run/docker.sock, root:docker 0660,
forwarding to the host's socket (mounted at /host-docker.sock). A Docker engine cannot run
inside the walkthrough container (it is not privileged), and the host socket's group id
means nothing there, so the README's `usermod -aG docker` would not reach it otherwise.
Run as root in the container, in the background: python3 docker-forward.py"""

import contextlib
import grp
import os
import socket
import threading

LISTEN, TARGET = "/var/run/docker.sock", "/host-docker.sock"


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):  # half-close: the other direction may still talk
            dst.shutdown(socket.SHUT_WR)


def serve(client: socket.socket) -> None:
    with client, socket.socket(socket.AF_UNIX) as upstream:
        upstream.connect(TARGET)
        back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        back.start()
        pipe(client, upstream)
        back.join()


def main() -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(LISTEN)
    os.chown(LISTEN, 0, grp.getgrnam("docker").gr_gid)
    os.chmod(LISTEN, 0o660)
    server.listen(64)
    while True:
        threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()


if __name__ == "__main__":
    main()
