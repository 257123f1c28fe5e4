"""The rough edges a newcomer hits (issue 13), each driven through the real CLI and daemon."""

from __future__ import annotations

import pytest
from conftest import Devd, Repo

from devd.client import Client
from devd.errors import UsageError


def test_bare_devd_prints_usage_and_commands(devd_home: Devd) -> None:
    result = devd_home.run(check=False)
    assert result.returncode == 2
    assert "usage: devd" in result.stderr and "provision" in result.stderr
    assert "kill-port" in result.stderr and "error" not in result.stderr


@pytest.mark.parametrize("command", [["env"], ["run"], ["kill-port"], ["browser"], ["init"]])
def test_path_and_options_have_help_with_defaults(devd_home: Devd, command: list[str]) -> None:
    out = " ".join(devd_home.run(*command, "--help").stdout.split())  # unwrapped
    assert "a directory in the worktree (default: ., the current directory)" in out \
        or "(default: .)" in out
    if command == ["env"]:
        assert "(default: sh)" in out
    if command == ["kill-port"]:
        assert "a TCP port, 1-65535" in out


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536", "http"])
def test_kill_port_out_of_range_is_a_usage_error(devd: Devd, repo: Repo, port: str) -> None:
    result = devd.run("kill-port", "--path", str(repo.main), "--", port, check=False)
    assert result.returncode == 2, result.stderr
    assert "nothing listens" not in result.stderr and "Traceback" not in result.stderr


def test_kill_port_out_of_range_refused_by_the_daemon(devd: Devd, repo: Repo) -> None:
    with pytest.raises(UsageError, match="out of range"):
        Client(devd.paths, autostart=False).call(
            "kill_port", {"port": 99999, "path": str(repo.main)})
