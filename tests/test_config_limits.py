"""devd.toml is bounded: its size, each list and each string, with errors naming the key."""

from __future__ import annotations

import pytest
from conftest import Devd

NAMES_990 = "[ports]\nnames = [" + ", ".join(f'"p{i}"' for i in range(990)) + "]\n"


@pytest.mark.parametrize(("toml", "expected"), [
    (NAMES_990, "ports: 'names' has 990 entries; at most 32"),
    ("[ports]\nnames = [" + ", ".join(f'"p{i}"' for i in range(33)) + "]\n",
     "ports: 'names' has 33 entries; at most 32"),
    ("[env]\ncopy = [" + ", ".join(f'".env{i}"' for i in range(100)) + "]\n",
     "env: 'copy' has 100 entries; at most 64"),
    ('[postgres]\nurl = "' + "x" * 5000 + '"\n',
     "postgres: 'url' holds a string of 5000 characters; at most 4096"),
    ("# padding\n" * 30000, "bytes; devd reads at most 262144"),
], ids=["990-port-names", "33-port-names", "100-copies", "long-url", "huge-file"])
def test_oversized_config_is_refused_naming_the_key(devd: Devd, make_repo, toml: str,
                                                    expected: str) -> None:
    repo = make_repo(devd_toml=toml)
    done = devd.run("provision", str(repo.main), check=False)
    assert done.returncode == 1 and expected in done.stderr, done.stderr
    assert devd.json("ports") == []  # nothing was leased


def test_32_port_names_are_fine(devd: Devd, make_repo) -> None:
    names = ", ".join(f'"p{i}"' for i in range(32))
    repo = make_repo(devd_toml=f"[ports]\nnames = [{names}]\n")
    devd.run("provision", str(repo.main))
    assert len(devd.worktree(repo.main)["ports"]) == 32
