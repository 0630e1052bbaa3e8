"""What the user asked to check: a Python callable, an expression string, or a registered name.

Also the naming rules that decide whether a server can run a callable: a server runs only functions
its operator registered (``"module:qualname"`` or dotted names such as ``"torch.sin"``), never code
sent by the client, so a lambda or a closure always runs locally.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Target", "bind_names", "classify", "named_object", "registered_name", "renamed", "why_not_remote"]

Kind = Literal["callable", "expression", "registered"]
_NAME = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$")


@dataclass(frozen=True)
class Target:
    kind: Kind
    label: str  # shown in the summary
    fn: Callable[..., Any] | None = None  # the Python callable (kind == "callable")
    text: str = ""  # the expression or the registered name


def _label(fn: Callable[..., Any]) -> str:
    fn = named_object(fn)
    if isinstance(fn, types.BuiltinFunctionType):  # torch.sin's qualname is _VariableFunctionsClass.sin
        module = getattr(fn, "__module__", None)
        return f"{module}.{fn.__name__}" if module else fn.__name__
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__
    return str(name)


def classify(fn: Any, registered: Container[str] = ()) -> Target:
    """Sort ``fn`` into one of the three kinds; ``registered``: names a server (or registry) knows."""
    __tracebackhide__ = True
    if isinstance(fn, str):
        text = fn.strip()
        if text in registered:
            return Target("registered", text, text=text)
        from gradcheck_svc.errors import SpecError
        from gradcheck_svc.specs import parse_expression

        try:
            parse_expression(text)
        except SpecError:
            if _NAME.match(text):  # not an expression but shaped like a name: let the registry judge
                return Target("registered", text, text=text)
            raise
        return Target("expression", text, text=text)
    if not callable(fn):
        raise TypeError(
            "assert_grads needs a callable, an expression string or a registered name, "
            f"got {type(fn).__name__}"
        )
    return Target("callable", _label(fn), fn=fn)


def renamed(fn: Callable[..., Any]) -> bool:
    """Whether reports should carry our label: the engine would say "Function.apply" or
    "_VariableFunctionsClass.sin" for these."""
    return named_object(fn) is not fn or isinstance(fn, types.BuiltinFunctionType)


def why_not_remote(fn: Callable[..., Any]) -> str:
    """Why a server can never run ``fn`` whatever it registered; "" when it might."""
    fn = named_object(fn)
    qualname = getattr(fn, "__qualname__", "") or ""
    if qualname.endswith("<lambda>"):
        return "lambda"
    if "<locals>" in qualname:
        return "closure (defined inside a function)"
    if not hasattr(fn, "__module__") or not hasattr(fn, "__qualname__"):
        return "callable object, not a module-level function"
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


def named_object(fn: Callable[..., Any]) -> Any:
    """The class behind ``MyFunction.apply`` (servers register autograd.Functions by class name)."""
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, type) and getattr(fn, "__name__", "") == "apply" else fn


def registered_name(fn: Callable[..., Any], registered: Collection[str]) -> str | None:
    """The name under which a server registered ``fn``, if any."""
    named = named_object(fn)
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


def bind_names(names: Sequence[str], inputs: Sequence[Any], what: str) -> dict[str, Any]:
    """Inputs by name: one dict keyed by ``names``, or one positional input per name in order."""
    __tracebackhide__ = True
    if len(inputs) == 1 and isinstance(inputs[0], Mapping) and set(inputs[0]) == set(names) and names:
        return {name: inputs[0][name] for name in names}  # in ``names`` order, not the dict's
    if len(inputs) != len(names):
        raise TypeError(
            f"{what} takes {len(names)} input(s) ({', '.join(names) or 'none'}), got {len(inputs)}; "
            f"pass them in that order or as one dict keyed by name"
        )
    return dict(zip(names, inputs, strict=True))
