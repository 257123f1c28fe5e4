"""[services.NAME] in devd.toml: what runs, on which [ports] name, wired how.

    [services.web]
    command = "npm run dev"            # through `sh -c`, in the worktree (or `dir`)
    port = "web"                       # a [ports] name: PORT is set to it
    env = { API_URL = "{url:api}" }    # {port:NAME} and {url:NAME} of [ports] names
    ready = "/health"                  # "port" (default): listening; or an HTTP path
    port_arg = "--listen {port}"       # instead of the detected flags ("" = none)
    idle_stop = "30m"                  # stop when nobody connected for that long
    ready_timeout = "60s"              # `devd up` gives up after this
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A DNS label (RFC 1123), lowercase: service names become hostnames under the proxy.
SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TEMPLATE = re.compile(r"\{(port|url):([^{}]*)\}")
MAX_SERVICES = 32
MAX_ENV = 64
MAX_TEXT = 4096


class ServiceConfig(BaseModel):
    """One declared dev server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(min_length=1, max_length=MAX_TEXT)
    port: str | None = None
    dir: str = "."
    env: dict[str, str] = Field(default={}, max_length=MAX_ENV)
    ready: str = "port"
    port_arg: str | None = Field(default=None, max_length=MAX_TEXT)
    idle_stop: str = ""
    ready_timeout: str = "60s"

    @field_validator("dir")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{value!r} must be a directory relative to the worktree, "
                             "without '..'")
        return value

    @field_validator("env")
    @classmethod
    def _names(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if len(value) > MAX_TEXT or "\0" in value:
                raise ValueError(f"{key}: at most {MAX_TEXT} characters, no NUL")
        return env

    @field_validator("ready")
    @classmethod
    def _ready(cls, value: str) -> str:
        if value != "port" and not value.startswith("/"):
            raise ValueError(f"ready = {value!r}: \"port\" (listening), or an HTTP path "
                             "such as \"/health\"")
        return value

    @field_validator("idle_stop", "ready_timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        _seconds(value)  # a malformed duration raises
        return value

    @property
    def idle_seconds(self) -> float:
        return _seconds(self.idle_stop)

    @property
    def timeout_seconds(self) -> float:
        return _seconds(self.ready_timeout) or 60.0


def _seconds(value: str) -> float:
    from devd.settings import parse_duration  # settings imports this module

    return parse_duration(value) if value.strip() else 0.0


def check(services: Mapping[str, ServiceConfig], port_names: list[str]) -> None:
    """What one service cannot know alone: its name, its port and the ports it refers to
    exist, and no two services serve one port."""
    if len(services) > MAX_SERVICES:
        raise ValueError(f"{len(services)} services; at most {MAX_SERVICES}")
    taken: dict[str, str] = {}
    for name, service in services.items():
        if not SERVICE_NAME.match(name):
            raise ValueError(f"service name {name!r} must be a DNS label: lowercase letters, "
                             "digits and '-', not at either end, at most 63 (it becomes a "
                             "hostname)")
        if service.port is not None:
            _known(name, "port", service.port, port_names)
            if service.port in taken:
                raise ValueError(f"services {taken[service.port]!r} and {name!r} both serve "
                                 f"port {service.port!r}; give each its own [ports] name")
            taken[service.port] = name
        for key, value in service.env.items():
            for _, ref in TEMPLATE.findall(value):
                _known(name, f"env.{key}", ref, port_names)


def _known(service: str, where: str, name: str, port_names: list[str]) -> None:
    if name not in port_names:
        raise ValueError(f"services.{service}.{where}: {name!r} is not a [ports] name "
                         f"(names = {port_names})")


def expand(value: str, ports: Mapping[str, int], env: Mapping[str, str]) -> str:
    """{port:NAME} → the leased port; {url:NAME} → DEVD_URL_<NAME> where the proxy set it,
    else http://127.0.0.1:<port>."""
    def one(match: re.Match[str]) -> str:
        kind, name = match[1], match[2]
        if kind == "port":
            return str(ports[name])
        return env.get(f"DEVD_URL_{name.upper()}") or f"http://127.0.0.1:{ports[name]}"
    return TEMPLATE.sub(one, value)


def url_of(port_name: str | None, ports: Mapping[str, int], env: Mapping[str, str]
           ) -> str | None:
    """Where a service answers: its named URL if the env has one, else the direct port."""
    if port_name is None or port_name not in ports:
        return None
    return expand(f"{{url:{port_name}}}", ports, env)
