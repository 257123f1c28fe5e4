"""Request parameters checked against the handler's own signature before it runs.

Every `do_<method>(progress, ...)` declares its parameters with plain types (str, int,
float, bool, list[str], X | None); a missing, unknown or mistyped one is a `usage` error
naming the field, so no handler ever sees "false" where it expects a bool.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from devd.errors import UsageError

_INT_LIMIT = 1 << 63
Spec = dict[str, tuple[Any, bool]]  # name → (type, required)
_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object", type(None): "null"}


def check(handler: Callable[..., Any], method: str, params: dict[str, Any]) -> None:
    """Raise UsageError unless `params` fit the handler's signature exactly."""
    spec = signature(handler)
    for name in params:
        if name not in spec:
            raise UsageError(f"{method}: unknown parameter {name!r}",
                             f"{method} takes {', '.join(spec) or 'no parameters'}; "
                             "see docs/protocol.md")
    for name, (hint, required) in spec.items():
        if name not in params:
            if required:
                raise UsageError(f"{method}: missing parameter {name!r}", "see docs/protocol.md")
        elif not matches(params[name], hint):
            raise UsageError(f"{method}: parameter {name!r} must be {describe(hint)}, "
                             f"not {describe(type(params[name]))}", "see docs/protocol.md")


def signature(handler: Callable[..., Any]) -> Spec:
    """The wire parameters of a handler (everything after `progress`), with their types."""
    return _signature(getattr(handler, "__func__", handler))


@functools.cache
def _signature(func: Callable[..., Any]) -> Spec:
    hints = typing.get_type_hints(func)
    names = list(inspect.signature(func).parameters.values())
    wire = names[2:] if names and names[0].name == "self" else names[1:]
    return {p.name: (hints.get(p.name, Any), p.default is inspect.Parameter.empty)
            for p in wire}


def matches(value: Any, hint: Any) -> bool:
    """True if a JSON value is of the declared type (bool is never an int, "false" never a bool)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint in (int, float):  # and within 64 bits: a pid of 10**30 is no pid
        return isinstance(value, (int, hint)) and not isinstance(value, bool) \
            and -_INT_LIMIT <= value < _INT_LIMIT
    if origin in (list, dict):
        return isinstance(value, origin) and all(matches(v, args[-1]) for v in
                                                 (value.values() if origin is dict else value))
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe(hint: Any) -> str:
    """A JSON type for people: 'a string or null', 'an array of a string'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is list:
        return f"an array of {describe(args[0]).split(' ', 1)[-1]}s" if args else "an array"
    return _JSON_NAMES.get(origin or hint, str(hint))
