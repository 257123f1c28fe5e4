"""The resolved Compose file from models shaped as both Compose versions print `config`.

Compose 1.29 is run for real in test_compose.py; the v2 plugin cannot be installed on these
machines, so its documented `config` shape is checked here: ports in long form with
`published` as a string and `mode`, a top-level `name`, every volume and network with its
full `name`, labels as a mapping or a KEY=VALUE list.
"""

from __future__ import annotations

import pytest

from devd.containers import project
from devd.errors import ConfigError

LABELS = {"devd.owner": "shop-a-1", "devd.instance": "0" * 16, "devd.kind": "compose"}
V2 = {
    "name": "shop",
    "services": {
        "db": {"image": "postgres:16", "container_name": "shop-db",
               "labels": ["team=web"], "networks": {"default": None},
               "ports": [{"mode": "ingress", "target": 5432, "published": "5432",
                          "protocol": "tcp"}]},
        "dns": {"image": "coredns", "ports": [{"mode": "ingress", "target": 53,
                                               "published": "5353", "protocol": "udp"},
                                              {"target": 9000, "mode": "ingress",
                                               "protocol": "tcp"}]},
    },
    "volumes": {"pgdata": {"name": "shop_pgdata"}, "fixed": {"name": "everyones-data"},
                "ext": {"name": "ext", "external": True}},
    "networks": {"default": {"name": "shop_default"}},
}


def test_a_v2_model_gets_leased_loopback_ports_no_global_names_and_labels() -> None:
    wanted = project.wanted_ports(V2)
    assert sorted(wanted) == ["PORT_DB_5432", "PORT_DNS_53_UDP", "PORT_DNS_9000"]
    leased = {"PORT_DB_5432": 20001, "PORT_DNS_53_UDP": 20002, "PORT_DNS_9000": 20003}
    out = project.resolve(V2, leased, LABELS)
    assert "name" not in out
    db = out["services"]["db"]
    assert "container_name" not in db and db["ports"] == ["127.0.0.1:20001:5432/tcp"]
    assert db["labels"] == {"team": "web"} | LABELS
    assert out["services"]["dns"]["ports"] == ["127.0.0.1:20002:53/udp",
                                               "127.0.0.1:20003:9000/tcp"]
    assert out["volumes"]["pgdata"] == {"labels": LABELS}
    assert out["volumes"]["fixed"] == {"labels": LABELS}  # a global name would be shared
    assert out["volumes"]["ext"] == {"name": "ext", "external": True}  # not the project's
    assert out["networks"]["default"] == {"labels": LABELS}
    assert project.externals(V2) == ["volume ext"]


def test_a_v1_model_short_ports_and_host_networking() -> None:
    v1 = {"version": "2.4", "services": {"web": {"image": "x", "ports": ["8080:80/tcp",
                                                                          "9229"]}}}
    assert sorted(project.wanted_ports(v1)) == ["PORT_WEB_80", "PORT_WEB_9229"]
    out = project.resolve(v1, {"PORT_WEB_80": 1, "PORT_WEB_9229": 2}, LABELS)
    assert out["networks"] == {"default": {"labels": LABELS}} and "volumes" not in out
    with pytest.raises(ConfigError, match="network_mode: host"):
        project.wanted_ports({"services": {"web": {"image": "x", "network_mode": "host"}}})
    with pytest.raises(ConfigError, match="both give PORT_A_B_80"):
        project.wanted_ports({"services": {"a-b": {"ports": [{"target": 80}]},
                                           "a_b": {"ports": [{"target": 80}]}}})
