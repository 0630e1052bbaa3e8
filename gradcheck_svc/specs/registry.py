"""Registered functions: what a client may check by name.

The registry holds the built-in allowlist (``torch.sin``, ``torch.nn.functional.gelu``, ...) plus
functions the server operator exposes at start-up, from modules named on the command line
(``--functions mypkg.ops``) or by the entry-point group ``gradcheck_svc.functions``; those are
named ``mypkg.ops:fused_gelu``. Imports happen only here, at start-up, on the operator's word:
a client sends a name that is looked up in a dict, never imported or resolved as an attribute.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import torch

from gradcheck_svc.errors import SpecError, UnknownFunctionError
from gradcheck_svc.specs.builtins import builtin_functions
from gradcheck_svc.specs.params import ANY, ParamKind, validate_params

__all__ = ["ENTRY_POINT_GROUP", "FunctionRegistry", "RegisteredFunction"]

ENTRY_POINT_GROUP = "gradcheck_svc.functions"


@dataclass(frozen=True)
class RegisteredFunction:
    """A function a client may name; ``params`` is None when any keyword its signature takes is accepted.

    ``builtin`` marks the torch allowlist; everything else is operator code, which the server may
    run in a worker process it can kill (see gradcheck_svc.server.isolation).
    """

    name: str
    fn: Callable[..., Any]
    params: Mapping[str, ParamKind] | None = None
    builtin: bool = False

    @property
    def module_class(self) -> bool:
        """An nn.Module class: a check builds an instance (see gradcheck_svc.binding.build_module)."""
        return inspect.isclass(self.fn) and issubclass(self.fn, torch.nn.Module)

    def check_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """``params`` validated against what the function (a module: its forward) accepts."""
        return validate_params(self.name, params or {}, self._kinds(params or {}))

    def bind(self, params: Mapping[str, Any] | None = None) -> Callable[..., Any]:
        """Validate ``params`` and return ``fn`` with them applied, named after this entry."""
        checked = self.check_params(params)
        bound = functools.partial(self.fn, **checked) if checked else self.fn
        return _named(bound, self.name)

    def _kinds(self, params: Mapping[str, Any]) -> Mapping[str, ParamKind]:
        if self.params is not None:
            return self.params
        try:
            # A module class: its forward's keywords (the class object carries ``forward``).
            target = getattr(self.fn, "forward", self.fn) if self.module_class else self.fn
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return dict.fromkeys(params, ANY)
        parameters = list(signature.parameters.values())[1 if self.module_class else 0 :]  # forward's self
        kinds = {p.name: ANY for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if any(p.kind == p.VAR_KEYWORD for p in parameters):
            kinds.update(dict.fromkeys(params, ANY))
        return kinds


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A wrapper that carries the registered name (the engine labels reports with __name__)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


class FunctionRegistry:
    """Name -> RegisteredFunction. Build with ``FunctionRegistry.default(modules=...)``."""

    def __init__(self, functions: Iterable[RegisteredFunction] = ()) -> None:
        self._functions: dict[str, RegisteredFunction] = {}
        for f in functions:
            self.add(f)

    @classmethod
    def default(cls, modules: Iterable[str] = (), *, load_entry_points: bool = True) -> FunctionRegistry:
        """Built-ins, then operator modules, then the ``gradcheck_svc.functions`` entry points."""
        registry = cls(RegisteredFunction(n, f, p, builtin=True) for n, f, p in builtin_functions())
        for module in modules:
            registry.add_module(module)
        if load_entry_points:
            registry.add_entry_points()
        return registry

    def add(self, function: RegisteredFunction) -> None:
        if function.name in self._functions:
            raise ValueError(f"function {function.name!r} is registered twice")
        self._functions[function.name] = function

    def register(
        self, name: str, fn: Callable[..., Any], params: Mapping[str, ParamKind] | None = None
    ) -> None:
        self.add(RegisteredFunction(name, fn, params))

    def add_module(self, module: str | ModuleType) -> list[str]:
        """Expose a module's public functions as ``module:function`` (``__all__`` when it has one)."""
        mod = importlib.import_module(module) if isinstance(module, str) else module
        added = []
        for attr, fn in _public_callables(mod):
            name = f"{mod.__name__}:{attr}"
            self.register(name, fn)
            added.append(name)
        if not added:
            raise ValueError(f"module {mod.__name__!r} exposes no functions")
        return added

    def add_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Entry points name a module (``mypkg.ops``) or one function (``mypkg.ops:fused_gelu``)."""
        added = []
        for ep in entry_points(group=group):
            obj = ep.load()
            if isinstance(obj, ModuleType):
                added += self.add_module(obj)
            else:
                name = f"{ep.module}:{ep.attr}"
                self.register(name, _callable(obj))
                added.append(name)
        return added

    def get(self, name: str) -> RegisteredFunction:
        try:
            return self._functions[name]
        except (KeyError, TypeError):
            raise UnknownFunctionError(f"no registered function named {str(name)[:200]!r}") from None

    def bind(self, name: str, params: Mapping[str, Any] | None = None) -> Callable[..., Any]:
        """The callable for ``name`` with ``params`` applied (UnknownFunctionError / SpecError)."""
        return self.get(name).bind(params)

    def names(self) -> list[str]:
        return sorted(self._functions)

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __len__(self) -> int:
        return len(self._functions)


_CLASSES = (torch.autograd.Function, torch.nn.Module)


def _exposable(obj: Any) -> Callable[..., Any] | None:
    """What a module may expose: functions, callable instances, nn.Module classes and
    autograd.Function subclasses (through ``.apply``). Other classes and plain values are skipped."""
    if inspect.isclass(obj):
        if issubclass(obj, torch.nn.Module):
            return obj  # built from plain constructor arguments when checked
        return obj.apply if issubclass(obj, torch.autograd.Function) else None
    return obj if callable(obj) else None


def _callable(obj: Any) -> Callable[..., Any]:
    fn = _exposable(obj)
    if fn is None:
        raise SpecError(f"{obj!r} cannot be exposed: not a function, callable object or autograd.Function")
    return fn


def _public_callables(mod: ModuleType) -> list[tuple[str, Callable[..., Any]]]:
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [
            n
            for n, v in vars(mod).items()
            if not n.startswith("_")
            and (inspect.isfunction(v) or (inspect.isclass(v) and issubclass(v, _CLASSES)))
            and getattr(v, "__module__", None) == mod.__name__
        ]
    found = ((n, _exposable(getattr(mod, n))) for n in sorted(names))
    return [(n, fn) for n, fn in found if fn is not None]
