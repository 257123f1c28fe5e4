"""Dotenv writing and scanning, shared by the CLI (`devd env --format dotenv`) and the .env
provisioner.

One quoting that python-dotenv, npm's dotenv, direnv, Docker Compose (1.29 and v2) and a
POSIX shell (`set -a; . ./.env`) all read back as the same value, and that no shell can
execute. Each loader has its own escapes, so there is no escape at all:
- bare when every character is inert everywhere;
- else single quotes: literal in every loader, except that python-dotenv decodes `\\\\` and
  `\\'` inside them and several loaders end the value early at a quote;
- else (the value holds `'`) double quotes, with nothing inside that any loader expands or
  unescapes: no `"`, `$`, backtick or backslash.
Anything else (a `'` together with `$`, a newline, `${`, ...) is refused, naming the key.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator

from devd.errors import DevdError

_BARE = re.compile(r"^[A-Za-z0-9_./:@,+=-]*\Z")  # \Z: "$" would pass a trailing \n
# A line defining KEY as any common loader reads it: `KEY=`, `export KEY =`, python-dotenv's
# `'KEY'=`, node's `KEY: value`, Compose v2's `KEY:value`. python-dotenv and npm dotenv skip
# any Unicode space (NBSP, U+2000...) and a BOM before the key, and end lines at \r too.
_ASSIGN = re.compile(r"^[\s\ufeff]*(?:export\s+)?'?([A-Za-z_][A-Za-z0-9_.-]*)'?\s*[=:]")
_NEWLINE = re.compile(r"(\r\n|\r|\n)")
# JavaScript line terminators: node's dotenv ends a line at these (and at \n, \r).
_LINE_ENDS = {"\x85", "\u2028", "\u2029"}


def quote(key: str, value: str) -> str:
    """The dotenv spelling of `value`; raises DevdError if no spelling reads back the same."""
    if _BARE.match(value):
        return value
    problem = _refusal(value)
    if problem:
        raise DevdError(
            f"{key}: its value holds {problem}, which .env loaders (sh, python-dotenv, npm "
            "dotenv, direnv, Docker Compose) would not all read back the same; devd did not "
            "write it",
            "rename what it comes from (e.g. the worktree's directory); `devd run` and "
            "`devd env --format sh` still pass it exactly", code="env_value")
    return f"'{value}'" if "'" not in value else f'"{value}"'


def _refusal(value: str) -> str | None:
    """Why `value` has no spelling every loader agrees on, or None."""
    for char in value:
        if char in _LINE_ENDS or (unicodedata.category(char) == "Cc" and char != "\t"):
            return f"the character U+{ord(char):04X} (a control or line break)"
    if "${" in value:
        return "'${' (python-dotenv expands it even inside quotes)"
    if "'" in value:
        bad = next((c for c in '"$`\\' if c in value), None)
        return f"both ' and {bad}" if bad else None
    if "\\\\" in value or value.endswith("\\"):
        return "a backslash before another backslash or at the end"
    return None


def render(env: dict[str, str]) -> list[str]:
    """KEY=value lines; raises DevdError (naming the key) for a value that has no spelling."""
    return [f"{key}={quote(key, value)}" for key, value in env.items()]


def render_each(env: dict[str, str]) -> tuple[list[str], list[DevdError]]:
    """Like render, but a refused value becomes a comment line and its error is returned."""
    lines, errors = [], []
    for key, value in env.items():
        try:
            lines.append(f"{key}={quote(key, value)}")
        except DevdError as exc:
            lines.append(f"# {key}: not written, see `devd status` (its value has no safe "
                         "spelling)")
            errors.append(exc)
    return lines, errors


def split_lines(text: str) -> list[str]:
    """The lines of `text` as loaders see them: \n, \r\n and a lone \r end a line."""
    return _NEWLINE.split(text)[0::2]


def definitions(text: str) -> Iterator[tuple[str, int, int]]:
    """(key, first line, last line) of every assignment, 0-based; a quoted value may span
    lines (python-dotenv, node and Compose read those)."""
    lines = split_lines(text)
    number = 0
    while number < len(lines):
        match = _ASSIGN.match(lines[number])
        if match is None:
            number += 1
            continue
        last = _value_end(lines, number, match.end())
        yield match[1], number, last
        number = last + 1


def _value_end(lines: list[str], first: int, start: int) -> int:
    """The last line of a value starting at lines[first][start:]."""
    rest = lines[first][start:].lstrip(" \t")
    if not rest or rest[0] not in "'\"`":
        return first
    # A quote closes unless an odd number of backslashes precede it: `"C:\\"` is closed.
    closing = re.compile(rf"(?<!\\)(?:\\\\)*{re.escape(rest[0])}")
    body, number = rest[1:], first
    while not closing.search(body):
        number += 1
        if number >= len(lines):
            return first  # unterminated: loaders read it as one line (or fail)
        body = lines[number]
    return number


def keys_with(text: str, pattern: re.Pattern[str]) -> set[str]:
    """Keys whose definition (key and value, every line of it) matches `pattern`."""
    lines = split_lines(text)
    return {key for key, first, last in definitions(text)
            if pattern.search("\n".join(lines[first:last + 1]))}


def neutralise(text: str, managed: Callable[[str], bool], comment: Callable[[str], str]
               ) -> tuple[str, list[str]]:
    """`text` with every definition of a managed key replaced by comment(key): the value is
    dropped, not kept in a comment. Returns the new text and the keys removed; line endings
    (\n, \r\n, \r) are kept."""
    parts = _NEWLINE.split(text)  # line, ending, line, ending, ..., last line
    removed: list[str] = []
    for key, first, last in reversed(list(definitions(text))):
        if managed(key):
            parts[2 * first:2 * last + 1] = [comment(key)]
            removed.append(key)
    return "".join(parts), removed[::-1]
