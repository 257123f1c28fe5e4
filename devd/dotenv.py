"""Dotenv formatting shared by the CLI (`devd env --format dotenv`) and the .env provisioner."""

from __future__ import annotations

import re

_BARE = re.compile(r"^[A-Za-z0-9_./:@,+=-]*$")


def quote(value: str) -> str:
    """A value that dotenv parsers (python-dotenv, Node's dotenv, compose) read back as is:
    bare when safe, else single quotes (literal everywhere), else escaped double quotes."""
    if _BARE.match(value):
        return value
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def render(env: dict[str, str]) -> list[str]:
    return [f"{key}={quote(value)}" for key, value in env.items()]
