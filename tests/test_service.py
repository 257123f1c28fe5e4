"""The user service: systemd units (verified by systemd itself), socket activation with
readiness over a real NOTIFY_SOCKET, the LaunchAgent plist, and the no-systemd fallback."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devd import service
from devd.errors import OwnershipConflict
from devd.paths import Paths
from tests.conftest import Devd, wait_for

REQUIRED = os.environ.get("DEVD_REQUIRE_INTEGRATION") == "1"


def need(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        if REQUIRED:
            pytest.fail(f"{tool} is missing (apt-get install systemd); CI must run this test")
        pytest.skip(f"{tool} is not installed (Debian: apt-get install systemd)")
    return found


def verify(unit_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify --user` needs only a runtime dir, no running user manager."""
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    units = [str(unit_dir / name) for name in service.UNITS]
    return subprocess.run([need("systemd-analyze"), "verify", "--user", *units], env=env,
                          capture_output=True, text=True, timeout=60)


def write_units(units: dict[str, str], target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (target / name).write_text(text)
    return target


def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = service.render_systemd(sys.executable, {"PATH": "/opt/x/bin:/usr/bin:/bin"})
    result = verify(write_units(units, tmp_path / "units"), tmp_path)
    # verify exits 0 even on ignored lines; only silence means systemd took every line.
    assert result.returncode == 0 and result.stderr == "", result.stderr
    socket_unit, service_unit = units["devd.socket"], units["devd.service"]
    for line in ("ListenStream=%t/devd/devd.sock", "SocketMode=0600", "DirectoryMode=0700"):
        assert line in socket_unit.splitlines()
    for line in ("Type=notify", f'ExecStart="{sys.executable}" -m devd daemon',
                 'Environment="PATH=/opt/x/bin:/usr/bin:/bin"', "Restart=on-failure",
                 "StartLimitIntervalSec=120", "StartLimitBurst=5"):
        assert line in service_unit.splitlines()
    assert not re.search(r"@[A-Z]+@", socket_unit + service_unit), "placeholder left"
    assert all(text.startswith(service.MARKER) for text in units.values())


def test_awkward_paths_are_escaped_for_systemd(tmp_path: Path) -> None:
    home = tmp_path / "my 100% home"
    units = service.render_systemd(sys.executable,
                                   {"PATH": "/a b/bin:/usr/bin", "DEVD_HOME": str(home)})
    result = verify(write_units(units, tmp_path / "units"), tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    sock = str(Paths.resolve({"DEVD_HOME": str(home)}).socket)
    assert f"ListenStream={sock.replace('%', '%%')}" in units["devd.socket"].splitlines()
    assert f'Environment="DEVD_HOME={str(home).replace("%", "%%")}"' in units["devd.service"]


def test_socket_activation_with_readiness_over_notify_socket(devd_home: Devd,
                                                             tmp_path: Path) -> None:
    activate = need("systemd-socket-activate")
    sock_path = devd_home.paths.socket
    sock_path.parent.mkdir(parents=True, mode=0o700)
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        passed = [f"--setenv={name}" for name in
                  ("DEVD_HOME", "DEVD_NO_AUTOSTART", "DEVD_RECONCILE_INTERVAL", "PYTHONPATH",
                   "DEVD_PROXY")]
        proc = subprocess.Popen(
            [activate, "-l", str(sock_path), *passed, f"--setenv=NOTIFY_SOCKET={notify_path}",
             sys.executable, "-m", "devd", "daemon"],
            env=devd_home.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(sock_path.exists, what="systemd-socket-activate to bind")
            # The first connection makes systemd-socket-activate exec the daemon; the
            # daemon then serves that queued connection on the socket it was handed.
            status = devd_home.json("status")
            assert status["daemon"]["pid"] == proc.pid
            assert notify.recv(4096).decode().split("\n")[0] == "READY=1"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, proc.stderr.read().decode() if proc.stderr else ""
            assert "STOPPING=1" in notify.recv(4096).decode().split("\n")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sock_path.exists(), "the daemon removed a socket systemd owns"
    sock_path.unlink()  # systemd's job (RemoveOnStop=yes); may live outside tmp_path
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "using the socket passed by systemd" in stderr


def test_daemon_binds_its_own_socket_and_notifies(devd_home: Devd, tmp_path: Path) -> None:
    """Type=notify without socket activation (e.g. devd.service started alone)."""
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        devd_home.env["NOTIFY_SOCKET"] = str(notify_path)
        devd_home.start()
        first = notify.recv(4096).decode().split("\n")
        assert first[0] == "READY=1" and first[1].startswith("STATUS=serving on ")
        assert devd_home.stop() == 0
        assert "STOPPING=1" in notify.recv(4096).decode().split("\n")
    assert not devd_home.paths.socket.exists()


def test_launchd_plist_key_by_key(tmp_path: Path) -> None:
    home = tmp_path / "Users" / "me"
    data = service.render_launchd("/opt/py/bin/python3", {"PATH": "/opt/homebrew/bin:/usr/bin"},
                                  home)
    assert service.PLIST_MARKER.encode() in data
    plist = plistlib.loads(data)
    assert plist["Label"] == "dev.devd"
    assert plist["ProgramArguments"] == ["/opt/py/bin/python3", "-m", "devd", "daemon"]
    assert Path(plist["ProgramArguments"][0]).is_absolute()
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["EnvironmentVariables"] == {"PATH": "/opt/homebrew/bin:/usr/bin"}
    log = str(home / "Library" / "Logs" / "devd.log")
    assert plist["StandardOutPath"] == log and plist["StandardErrorPath"] == log
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 4096
    assert plist["ThrottleInterval"] >= 10
    assert set(plist) == {"Label", "ProgramArguments", "EnvironmentVariables", "RunAtLoad",
                          "KeepAlive", "ThrottleInterval", "StandardOutPath",
                          "StandardErrorPath", "SoftResourceLimits"}


def test_install_without_user_systemd_explains_fallback(devd_home: Devd,
                                                        tmp_path: Path) -> None:
    if service.no_user_systemd(os.environ) is None:
        pytest.skip("a user systemd manager runs here; installing would touch the real session")
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    for _ in range(2):  # a second install says the same and changes nothing
        result = devd_home.run("service", "install", env=env)
        assert "no user service installed" in result.stdout
        assert "start the daemon on first use" in result.stdout
        assert "DEVD_NO_AUTOSTART is set" in result.stdout  # the fixture sets it
    assert not (tmp_path / "config" / "systemd").exists()
    status = devd_home.run("service", "status", env=env).stdout
    assert "devd.socket: not installed" in status and "daemon: not running" in status
    assert "nothing to stop" in devd_home.run("service", "uninstall", env=env).stdout


def test_never_overwrites_a_users_unit(tmp_path: Path) -> None:
    target = tmp_path / "devd.service"
    target.write_text("[Service]\nExecStart=/my/own/devd\n")
    with pytest.raises(OwnershipConflict):
        service._write_owned(target, b"new", service.MARKER, print)
    assert target.read_text() == "[Service]\nExecStart=/my/own/devd\n"
    service._remove_owned(target, service.MARKER, print)
    assert target.exists()
