"""Registered names: resolving them, and finding the name a server knows a callable by.

A name is looked up in a registry (the server's, or the one a server started here would have).
Without a server, ``"mypkg.ops:fused_gelu"`` also resolves by importing ``mypkg.ops`` and applying
the rule an operator's ``serve --functions mypkg.ops`` applies: only what the module exposes (its
``__all__``, else its public functions, autograd.Functions and nn.Modules), one name after the
colon, never an attribute walk. So a test suite names functions the same way with and without a
server.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Collection, Container
from typing import TYPE_CHECKING, Any

from gradcheck_svc.binding.call import named_object
from gradcheck_svc.errors import UnknownFunctionError

if TYPE_CHECKING:
    from gradcheck_svc.specs import FunctionRegistry, RegisteredFunction

__all__ = ["is_registered_name", "local_registry", "registered_name", "resolve_entry", "why_not_remote"]

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*\Z")
_NAME = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$")


@functools.cache
def local_registry() -> FunctionRegistry:
    """The registry a server started here would have: built-ins plus installed entry points."""
    from gradcheck_svc.specs import FunctionRegistry

    return FunctionRegistry.default()


@functools.cache
def _module_registry(module: str) -> FunctionRegistry:
    from gradcheck_svc.specs import FunctionRegistry

    registry = FunctionRegistry()
    registry.add_module(module)
    return registry


def _split(name: str) -> tuple[str, str] | None:
    """``("mypkg.ops", "fused_gelu")`` for ``"mypkg.ops:fused_gelu"``; None when not of that shape."""
    module, sep, attr = name.partition(":")
    if not sep or not _MODULE_NAME.match(module) or not _IDENTIFIER.match(attr):
        return None
    return module, attr


def resolve_entry(name: str, registry: FunctionRegistry) -> RegisteredFunction:
    """The entry ``name`` denotes: in ``registry``, else (``module:name`` only) in the module itself."""
    __tracebackhide__ = True
    if name in registry:
        return registry.get(name)
    split = _split(name)
    if split is None:
        hint = " (a module's function is named 'package.module:function')" if ":" in name else ""
        raise UnknownFunctionError(f"no registered function named {name[:200]!r}{hint}")
    module, attr = split
    try:
        exposed = _module_registry(module)
    except ImportError as exc:
        raise UnknownFunctionError(f"{name!r}: cannot import {module}: {exc}") from None
    except ValueError as exc:  # the module exposes nothing
        raise UnknownFunctionError(f"no registered function named {name!r}: {exc}") from None
    if name not in exposed:
        listed = ", ".join(n.split(":")[1] for n in exposed.names())
        raise UnknownFunctionError(f"{module} does not expose {attr!r} (exposed: {listed})")
    return exposed.get(name)


def is_registered_name(text: str, registry: Container[str]) -> bool:
    """Whether ``text`` names a function rather than being an expression."""
    if text in registry:
        return True
    if _split(text) is not None:
        return True
    from gradcheck_svc.errors import SpecError
    from gradcheck_svc.specs import parse_expression

    try:
        parse_expression(text)
    except SpecError:
        return bool(_NAME.match(text))  # not an expression but shaped like a name: the registry judges
    return False


def why_not_remote(fn: Callable[..., Any]) -> str:
    """Why a server can never run ``fn`` whatever it registered; "" when it might."""
    import torch

    fn = named_object(fn)
    if isinstance(fn, torch.nn.Module):
        fn = type(fn)
    qualname = getattr(fn, "__qualname__", "") or ""
    if qualname.endswith("<lambda>"):
        return "lambda"
    if "<locals>" in qualname:
        return "closure (defined inside a function)"
    if not hasattr(fn, "__module__") or not hasattr(fn, "__qualname__"):
        return f"callable object of class {type(fn).__qualname__}, not a function or an nn.Module"
    return ""


def _resolve_loaded(name: str) -> Any:
    """The object ``name`` denotes among modules already imported here; None if not loaded.

    Only ``sys.modules`` is consulted: resolving a server's list must not import anything locally.
    """
    module, _, attrs = name.partition(":")
    if not attrs:  # dotted: the longest loaded module prefix
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:cut]) in sys.modules:
                module, attrs = ".".join(parts[:cut]), ".".join(parts[cut:])
                break
        else:
            return None
    obj: Any = sys.modules.get(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def registered_name(fn: Callable[..., Any], registered: Collection[str]) -> str | None:
    """The name under which a server registered ``fn`` (for a module: its class), if any."""
    import torch

    named = named_object(fn)
    if isinstance(named, torch.nn.Module):
        named = type(named)
    module = getattr(named, "__module__", None)
    qualname = getattr(named, "__qualname__", None)
    if module and qualname:
        for candidate in (f"{module}:{qualname}", f"{module}.{qualname}"):
            if candidate in registered:
                return candidate
    # Builtins such as torch.sin live in private modules (torch._C._nn.gelu is torch.nn.functional.gelu):
    # compare identities with the registered names that end in the same short name.
    short = getattr(fn, "__name__", None)
    if short:
        for name in registered:
            if name.rsplit(".", 1)[-1].rsplit(":", 1)[-1] == short and _resolve_loaded(name) is fn:
                return name
    return None
