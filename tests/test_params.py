"""Every request parameter of every method, sent with the wrong type: always `usage`."""

from __future__ import annotations

import json
import socket
import types
import typing
from typing import Any

from conftest import Devd

from devd import params, protocol
from devd.handlers import Service

# Wrong values per declared type, written out by hand (not derived from the checker).
WRONG: dict[Any, list[Any]] = {
    str: [1, 1.5, True, [], ["x"], {}, {"path": "x"}],
    int: ["1", 1.5, True, False, [], {}, 2 ** 70, -(2 ** 70)],
    bool: ["false", "true", "", 0, 1, [], {}],
    float: ["1", True, [], {}],
    list[str]: ["x", [1], ["x", None], [["x"]], {}, 1, True],
}
VALID: dict[Any, Any] = {str: "/nonexistent/devd-params", int: 1, bool: False, float: 1.0,
                         list[str]: ["x"]}


def methods() -> dict[str, params.Spec]:
    return {name[3:]: params.signature(getattr(Service, name))
            for name in dir(Service) if name.startswith("do_")}


def base(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(rest) == 1, hint
        return rest[0], True
    return hint, False


def wrong_values(hint: Any) -> list[Any]:
    kind, nullable = base(hint)
    return WRONG[kind] + ([] if nullable else [None])


def valid_params(spec: params.Spec) -> dict[str, Any]:
    return {name: VALID[base(hint)[0]] for name, (hint, required) in spec.items() if required}


def ask(devd: Devd, method: str, body: dict[str, Any] | bytes) -> dict[str, Any]:
    payload = body if isinstance(body, bytes) else \
        json.dumps(protocol.request(method, body)).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(devd.paths.socket))
        sock.sendall(payload + b"\n")
        lines = sock.makefile("rb").read().splitlines()
    return json.loads(lines[-1])


def test_every_parameter_with_a_wrong_type_is_a_usage_error(devd: Devd) -> None:
    cases = 0
    for method, spec in methods().items():
        for name, (hint, _required) in spec.items():
            for value in wrong_values(hint):
                reply = ask(devd, method, valid_params(spec) | {name: value})
                assert reply["ok"] is False and reply["error"]["code"] == "usage", \
                    (method, name, value, reply)
                assert repr(name) in reply["error"]["message"], reply
                cases += 1
    assert cases > 200
    assert ask(devd, "ping", {})["result"]["pid"] == devd.proc.pid


def test_a_path_no_file_system_takes_is_a_usage_error(devd: Devd) -> None:
    for method, spec in methods().items():
        if "path" in spec:
            for path in ("/" + "x" * 5000, "/a" + "/.." * 3000):
                reply = ask(devd, method, valid_params(spec) | {"path": path})
                assert reply["error"]["code"] in ("usage", "protocol", "not_a_worktree",
                                                  "not_registered"), (method, reply)


def test_unknown_and_missing_parameters_are_usage_errors(devd: Devd) -> None:
    for method, spec in methods().items():
        unknown = ask(devd, method, valid_params(spec) | {"bogus": 1})
        assert unknown["error"]["code"] == "usage" and "'bogus'" in unknown["error"]["message"]
        for name, (_hint, required) in spec.items():
            if required:
                missing = ask(devd, method, {k: v for k, v in valid_params(spec).items()
                                             if k != name})
                assert missing["error"]["code"] == "usage", (method, name, missing)
                assert f"missing parameter {name!r}" in missing["error"]["message"]


def test_the_string_false_never_releases_without_a_dump(devd: Devd, repo) -> None:
    devd.run("provision", str(repo.main))
    reply = ask(devd, "release", {"path": str(repo.main), "yes": "false",
                                  "no_backup": "false"})
    assert reply["error"]["code"] == "usage" and "'yes' must be a boolean" in \
        reply["error"]["message"]
    assert devd.worktree(repo.main)["state"] == "ready"  # nothing was released


def test_non_standard_json_is_refused(devd: Devd) -> None:
    for raw in (b'{"v": 1, "method": "watchers_preflight", "params": {"path": "/", '
                b'"max_watches": NaN}}',
                b'{"v": 1, "method": "watchers_preflight", "params": {"path": "/", '
                b'"max_watches": Infinity}}',
                b'{"v": 1, "method": "watchers_preflight", "params": {"path": "/", '
                b'"max_watches": 1e999}}',
                b'{"v": 1, "method": "ping", "params": {"x": ' + b"9" * 5000 + b"}}"):
        reply = ask(devd, "", raw)
        assert reply["error"]["code"] == "protocol", reply
    assert ask(devd, "ping", {})["ok"] is True


def test_replies_are_strict_json() -> None:
    line = protocol.encode({"ok": True, "result": {"ratio": float("inf"), "nan": float("nan"),
                                                   "list": [float("-inf"), 1.5]}})
    assert line == b'{"ok":true,"result":{"ratio":null,"nan":null,"list":[null,1.5]}}\n'
    json.loads(line, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
