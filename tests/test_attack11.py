"""Attacks on issue 11's fast readiness and proxy dialling: a port shared with a process
outside the service (SO_REUSEPORT) is never called ready nor dialled; a service is dialled
only at an address its own group listens on, once ready (never `localhost`, never a
squatter on the port while it boots); a setpriv that cannot set the parent-death signal does not
keep Caddy from starting, and a setcap'd Caddy (which exec strips of it) is known. Real
processes, sockets and binaries."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devd.proxy.child import dies_with_daemon, keeps_pdeathsig
from devd.proxy.verify import Verifier, safe_dial
from devd.registry import Registry
from devd.services.supervisor import Spec, Supervisor, Unit


def dials(sup: Supervisor, port: int, tmp_path: Path) -> dict[tuple[str, str], str]:
    """What the proxy would dial for worktree w's port `web` (on `port`) now."""
    verifier = Verifier(Registry(tmp_path / "registry.sqlite3"), sup.serving)
    return verifier.dials([(("w", "web"), port)])


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sup = Supervisor(tmp_path, 2.0)
    sup.start_watching()
    (tmp_path / "logs").mkdir()
    yield sup
    sup.close()


def listener(family: socket.AddressFamily, address: str, port: int = 0) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    sock.listen()
    return sock


def serve(sup: Supervisor, tmp_path: Path, port: int, address: str) -> Unit:
    """A service that binds `address`:port with SO_REUSEPORT (as some servers do)."""
    family = "AF_INET6" if ":" in address else "AF_INET"
    code = (f"import socket,time;s=socket.socket(socket.{family});"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1);"
            f"s.bind(('{address}',{port}));s.listen();time.sleep(60)")
    unit = sup.start(Spec("w", "web", f'{sys.executable} -c "{code}"', tmp_path,
                          {"PATH": "/usr/bin:/bin"}, tmp_path / "logs" / "web.log",
                          port=port, port_name="web"))
    sup.wait(unit, time.monotonic() + 15, lambda _: None)
    return unit


def test_a_port_shared_by_reuseport_is_never_ready(supervisor: Supervisor,
                                                   tmp_path: Path) -> None:
    # The other process holds 127.0.0.1:P first; the service joins it on the same address:
    # the kernel would spread the proxy's connections over both.
    with listener(socket.AF_INET, "127.0.0.1") as squatter:
        port = squatter.getsockname()[1]
        unit = serve(supervisor, tmp_path, port, "127.0.0.1")
        assert unit.state == "failed", unit.state
        assert "SO_REUSEPORT" in (unit.error or "") and not dials(supervisor, port, tmp_path)


@pytest.mark.parametrize("table", ["kernel", "psutil"])
def test_other_family_on_the_port_is_no_conflict(supervisor: Supervisor, tmp_path: Path,
                                                 table: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """[::1]:P held elsewhere while the service binds 127.0.0.1:P: the proxy dials the
    service's own address, so the other one never gets its requests; it is ready. The
    same from psutil's table, where there is no kernel one (macOS): holders by pid."""
    from devd import processes

    try:
        other = listener(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with other:
        port = other.getsockname()[1]
        unit = serve(supervisor, tmp_path, port, "127.0.0.1")
        assert unit.state == "running", unit.error
        if table == "psutil":  # the proxy's side only (readiness has its own fallback)
            monkeypatch.setattr(processes, "listen_entries", lambda: None)
        assert dials(supervisor, port, tmp_path) == {("w", "web"): "127.0.0.1"}
        supervisor.stop("w")
        assert dials(supervisor, port, tmp_path) == {}  # [::1] is not the worktree's


def test_a_setpriv_without_pdeathsig_is_not_used(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """util-linux < 2.33 (CentOS 7, Amazon Linux 2) ships setpriv without --pdeathsig:
    prefixing Caddy with it made every start exit 1, so the proxy never came up."""
    old = tmp_path / "setpriv"
    old.write_text("#!/bin/sh\necho \"setpriv: unrecognized option '--pdeathsig'\" >&2\n"
                   "exit 1\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert dies_with_daemon() == []
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    real = shutil.which("setpriv")
    assert dies_with_daemon() == ([real, "--pdeathsig", "TERM", "--"] if real else [])


def test_a_caddy_with_file_capabilities_is_known_to_outlive_a_killed_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`setcap cap_net_bind_service=+ep caddy` (Caddy's docs, for port 80): run by a user,
    exec clears the parent-death signal, so Caddy outlived a daemon killed -9 silently
    (seen with a real setcap'd caddy run as uid 65534); the daemon now says so."""
    setcap = shutil.which("setcap") or "/usr/sbin/setcap"
    plain, capable = tmp_path / "plain", tmp_path / "capable"
    for copy in (plain, capable):
        shutil.copy(sys.executable, copy)
    if os.geteuid() != 0 or not Path(setcap).exists() or subprocess.run(
            [setcap, "cap_net_bind_service=+ep", str(capable)]).returncode != 0:
        pytest.skip("setcap as root is needed to give a binary file capabilities")
    assert keeps_pdeathsig(capable)  # root: exec keeps it
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as a user would start it
    assert not keeps_pdeathsig(capable) and keeps_pdeathsig(plain)


def test_a_booting_service_is_never_dialled_even_where_a_squatter_listens(
        supervisor: Supervisor, tmp_path: Path) -> None:
    """A command without devd's flags (`node server.js`, `next dev`) while it boots: its
    route said `localhost`, then 127.0.0.1, where a squatter on the leased port got the
    requests until readiness. Now nothing is dialled (devd's page answers) until its own
    group listens, and a squatter's socket is never the group's."""
    with listener(socket.AF_INET, "127.0.0.1") as squatter:
        port = squatter.getsockname()[1]
        unit = supervisor.start(Spec("w", "web", "sleep 30", tmp_path,
                                     {"PATH": "/usr/bin:/bin"}, tmp_path / "logs" / "web.log",
                                     port=port, port_name="web"))
        assert unit.state == "starting"
        assert dials(supervisor, port, tmp_path) == {}
        supervisor.stop("w")
        assert dials(supervisor, port, tmp_path) == {}  # nobody's: not this worktree's


def test_the_dial_leaves_out_what_another_process_shares() -> None:
    assert safe_dial({"::1"}, {"127.0.0.1"}) == "[::1]"
    assert safe_dial({"127.0.0.1", "::1"}, {"127.0.0.1"}) == "[::1]"
    assert safe_dial({"0.0.0.0"}, {"127.0.0.1"}) is None
    assert safe_dial({"127.0.0.1"}, {"::"}) == "127.0.0.1"  # the other family's wildcard
    assert safe_dial({"::"}, set()) == "[::1]" and safe_dial(set(), {"::1"}) is None
