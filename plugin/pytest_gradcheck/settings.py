"""Plugin defaults (ini, environment, command line) and the precedence that merges them with a test's own.

Precedence, strongest first: the fixture call > ``@pytest.mark.gradcheck`` (closest marker first) >
command line > environment (``GRADCHECK_SERVER`` only) > ini / TOML config > the engine's built-in
defaults (an option nobody set is simply not passed on).

Pure stdlib + pytest: nothing here imports torch, grpc or gradcheck_svc.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

__all__ = [
    "ENGINE_SETTINGS",
    "SETTINGS",
    "Defaults",
    "RemotePolicy",
    "Resolved",
    "Setting",
    "add_options",
    "read_defaults",
    "resolve",
]

RemotePolicy = Literal["prefer", "require", "never"]
REMOTE_POLICIES: tuple[RemotePolicy, ...] = ("prefer", "require", "never")
SERVER_ENV = "GRADCHECK_SERVER"

# pytest >= 8.4 reads typed floats from ini files and from native TOML; older ones only strings.
_FLOAT_INI = pytest.version_tuple[:2] >= (8, 4)


@dataclass(frozen=True)
class Setting:
    """One plugin setting: ini key ``gradcheck_<name>``, flag ``--gradcheck-<name>``."""

    name: str
    kind: type[float] | type[str]
    help: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def ini(self) -> str:
        return f"gradcheck_{self.name}"

    @property
    def flag(self) -> str:
        return f"--gradcheck-{self.name}"


SETTINGS: tuple[Setting, ...] = (
    Setting("atol", float, "absolute tolerance floor (default: derived from the dtype)", metavar="FLOAT"),
    Setting("rtol", float, "relative tolerance (default: derived from the dtype)", metavar="FLOAT"),
    Setting("mode", str, "full Jacobian, random projections, or auto by size", ("auto", "full", "fast")),
    Setting("kinks", str, "allow (report) or fail non-differentiable points", ("allow", "fail")),
    Setting("device", str, "device the check runs on", ("auto", "cpu", "cuda")),
    Setting(
        "server",
        str,
        f"run checks on this gradcheck-svc server (also ${SERVER_ENV}); unset: run in-process",
        metavar="ADDR",
    ),
    Setting(
        "remote",
        str,
        "with a server: prefer (fall back to local for callables it cannot run), require "
        "(fail instead), never (ignore the server)",
        REMOTE_POLICIES,
    ),
)
ENGINE_SETTINGS: tuple[str, ...] = ("atol", "rtol", "mode", "kinks", "device")
# Keywords the fixture and the marker take besides the engine's options; the call also takes
# input_names (names of a callable's positional inputs in the report).
# expect= ("match" | "mismatch") may come from the marker too; fn_kwargs and wrt only from the call.
PLUGIN_KEYWORDS: frozenset[str] = frozenset({"remote", "params", "expect"})
CALL_KEYWORDS: frozenset[str] = PLUGIN_KEYWORDS | {"input_names", "fn_kwargs", "wrt"}
# Keywords of gradcheck_svc.check that are not engine options: kept apart from the options
# (which travel to a server as they are).
CHECK_ARGUMENTS: tuple[str, ...] = ("fn_kwargs", "wrt", "expect")


def add_options(parser: pytest.Parser) -> None:
    """Register every setting as an ini key and a flag in its own ``pytest --help`` group."""
    group = parser.getgroup("gradcheck", "gradient checks (assert_grads fixture)")
    for s in SETTINGS:
        group.addoption(
            s.flag,
            dest=s.ini,
            default=None,
            type=float if s.kind is float else str,
            choices=list(s.choices) or None,
            metavar=s.metavar,
            help=s.help + (f" [ini: {s.ini}]"),
        )
        ini_type = "float" if s.kind is float and _FLOAT_INI else "string"
        parser.addini(s.ini, s.help, type=ini_type, default=None)


@dataclass(frozen=True)
class Defaults:
    """Session-wide settings after ini < env < command line."""

    options: Mapping[str, Any] = field(default_factory=dict)  # engine options, only those set
    server: str | None = None
    remote: RemotePolicy = "never"


def _from_ini(config: pytest.Config, s: Setting) -> Any:
    value = config.getini(s.ini)
    if value is None or value == "":
        return None
    if s.kind is float and isinstance(value, str):  # ini file on an old pytest
        try:
            return float(value)
        except ValueError:
            raise pytest.UsageError(f"{s.ini} = {value!r}: expected a number") from None
    if s.choices and value not in s.choices:
        raise pytest.UsageError(f"{s.ini} = {value!r}: expected one of {', '.join(s.choices)}")
    return value


def read_defaults(config: pytest.Config, environ: Mapping[str, str] | None = None) -> Defaults:
    """Merge ini, environment and command line; raise ``pytest.UsageError`` on a bad value."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        ini = _from_ini(config, s)
        env = (environ.get(SERVER_ENV) or None) if s.name == "server" else None
        cli = config.getoption(s.ini)
        for value in (ini, env, cli):  # weakest first; a later one wins
            if value is not None:
                values[s.name] = value
    for name in ("atol", "rtol"):
        if name in values and values[name] < 0:
            raise pytest.UsageError(f"gradcheck {name} must be >= 0, got {values[name]}")
    server = values.pop("server", None)
    remote = values.pop("remote", None)
    if server is None:
        if remote == "require":
            raise pytest.UsageError(
                f"--gradcheck-remote=require needs a server: --gradcheck-server ADDR or ${SERVER_ENV}"
            )
        remote = "never"
    return Defaults(options=values, server=server, remote=remote or "prefer")


@dataclass(frozen=True)
class Resolved:
    """What one fixture call runs with."""

    options: dict[str, Any]  # engine options
    remote: RemotePolicy
    params: dict[str, Any] | None = None  # parameters of a registered function named by a string
    input_names: list[str] | None = None  # names of a callable's positional inputs
    arguments: dict[str, Any] = field(default_factory=dict)  # fn_kwargs, wrt, expect when given


def _check_keywords(
    source: str, kwargs: Mapping[str, Any], engine_names: Iterable[str], extra: frozenset[str]
) -> None:
    __tracebackhide__ = True  # a wrong keyword is the user's line's fault
    allowed = set(engine_names) | extra
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"unknown gradcheck option(s) {', '.join(map(repr, unknown))} in {source}; "
            f"known: {', '.join(sorted(allowed))}"
        )


def resolve(
    defaults: Defaults,
    markers: Iterable[tuple[tuple[Any, ...], Mapping[str, Any]]],
    call: Mapping[str, Any],
    engine_names: Iterable[str],
) -> Resolved:
    """Apply call > markers (closest first, as ``iter_markers`` yields them) > defaults."""
    __tracebackhide__ = True
    engine_names = tuple(engine_names)
    layers: list[Mapping[str, Any]] = []
    for args, kwargs in markers:
        if args:
            raise TypeError("@pytest.mark.gradcheck takes keyword options only, e.g. gradcheck(atol=1e-6)")
        _check_keywords("@pytest.mark.gradcheck", kwargs, engine_names, PLUGIN_KEYWORDS)
        layers.append(kwargs)
    _check_keywords("the assert_grads call", call, engine_names, CALL_KEYWORDS)
    merged: dict[str, Any] = dict(defaults.options)
    merged["remote"] = defaults.remote
    for layer in [*reversed(layers), call]:  # weakest first
        merged.update(layer)
    remote = merged.pop("remote")
    if remote not in REMOTE_POLICIES:
        raise ValueError(f"remote={remote!r}: expected one of {', '.join(REMOTE_POLICIES)}")
    if defaults.server is None:
        if remote == "require":
            raise ValueError(f"remote='require' needs a server: --gradcheck-server ADDR or ${SERVER_ENV}")
        remote = "never"
    params = merged.pop("params", None)
    names = merged.pop("input_names", None)
    arguments = {k: merged.pop(k) for k in CHECK_ARGUMENTS if k in merged}
    return Resolved(merged, remote, params, list(names) if names is not None else None, arguments)
