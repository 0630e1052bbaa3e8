"""A function and its arguments, made into the one call the engine checks, with its label.

Every face builds its check here: the pytest plugin, the CLI and the server's plan. A callable,
an expression string or a registered name goes in with positional arguments (tensors and plain
constants, in order), optional input names and constant keyword arguments; a ``Call`` comes out.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_svc.errors import BindingError

if TYPE_CHECKING:
    from gradcheck_svc.engine.progress import ProgressFn
    from gradcheck_svc.report import Report
    from gradcheck_svc.specs import FunctionRegistry

__all__ = [
    "Call",
    "bind",
    "bind_callable",
    "bind_expression",
    "bind_names",
    "bind_point",
    "bind_registered",
    "bind_variables",
    "label_of",
]


@dataclass(frozen=True)
class Call:
    """``fn(*args, **kwargs)``, checked with ``names`` labelling ``args`` in the report.

    ``registered`` is the registry name ``fn`` came from (or "" for a plain callable or an
    expression); ``expression`` is the expression text when the call is one.
    """

    label: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    names: tuple[str, ...] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    registered: str = ""
    expression: str = ""

    def input_names(self) -> list[str]:
        """One name per positional argument (the engine's default where none was given)."""
        return list(self.names) if self.names is not None else [f"inputs[{i}]" for i in range(len(self.args))]

    def check(self, *, progress: ProgressFn | None = None, **options: Any) -> Report:
        """Run the engine on this call; the report carries this call's label."""
        __tracebackhide__ = True
        import gradcheck_svc as gc

        extra: dict[str, Any] = {}  # only what is set, so the engine sees the call the user wrote
        if self.kwargs:
            extra["fn_kwargs"] = dict(self.kwargs)
        if self.names is not None:
            extra["input_names"] = list(self.names)
        if progress is not None:
            extra["progress"] = progress
        report = gc.check(self.fn, *self.args, **extra, **options)
        return report.model_copy(update={"function": self.label})


def named_object(fn: Any) -> Any:
    """The class behind ``MyFunction.apply`` (autograd.Functions are registered by class name)."""
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, type) and getattr(fn, "__name__", "") == "apply" else fn


def label_of(fn: Any) -> str:
    """How reports and summaries name a callable: ``Cube`` for ``Cube.apply``, ``torch.sin`` for the
    builtin, the class of a module or callable object, the qualified name of a function."""
    import torch

    fn = named_object(fn)
    if isinstance(fn, torch.nn.Module):
        return type(fn).__qualname__
    if isinstance(fn, types.BuiltinFunctionType):  # torch.sin's qualname is _VariableFunctionsClass.sin
        module = getattr(fn, "__module__", None)
        if module in (None, "torch._C._VariableFunctions") and getattr(torch, fn.__name__, None) is fn:
            module = "torch"
        return f"{module}.{fn.__name__}" if module else fn.__name__
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__
    return str(name)


def bind_names(names: Sequence[str], inputs: Sequence[Any], what: str) -> dict[str, Any]:
    """Inputs by name: one dict keyed by ``names``, or one positional input per name in order."""
    __tracebackhide__ = True
    if len(inputs) == 1 and isinstance(inputs[0], Mapping) and names and set(inputs[0]) == set(names):
        return {name: inputs[0][name] for name in names}  # in ``names`` order, not the dict's
    if len(inputs) != len(names):
        raise BindingError(
            f"{what} takes {len(names)} input(s) ({', '.join(names) or 'none'}), got {len(inputs)}; "
            f"pass them in that order or as one dict keyed by name"
        )
    return dict(zip(names, inputs, strict=True))


def bind_variables(
    names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any], what: str
) -> dict[str, Any]:
    """Values for ``names`` from positional ``args`` (in order) and keyword ``kwargs``, each once."""
    __tracebackhide__ = True
    if len(args) > len(names):
        raise BindingError(f"{what} takes {len(names)} inputs, got {len(args)}")
    env = dict(zip(names, args, strict=False))
    for name, value in kwargs.items():
        if name not in names:
            raise BindingError(f"{what} has no variable {name!r} (variables: {', '.join(names)})")
        if name in env:
            raise BindingError(f"{what} got two values for {name!r}")
        env[name] = value
    missing = [n for n in names if n not in env]
    if missing:
        raise BindingError(f"{what} is missing a value for {', '.join(missing)}")
    return env


def bind_point(
    named: Sequence[tuple[str, Any]], variables: Sequence[str] | None = None
) -> tuple[list[str], list[Any]]:
    """A point's named inputs as positional arguments with their names: in ``variables`` order for
    an expression, as given otherwise. Each name once; an expression needs exactly its variables."""
    names = [n for n, _ in named]
    seen: set[str] = set()
    for j, name in enumerate(names):
        if name in seen:
            raise BindingError(f"{name!r} is given twice", position=j)
        seen.add(name)
    if variables is None:
        return names, [v for _, v in named]
    for j, name in enumerate(names):
        if name not in variables:
            listed = ", ".join(variables)
            raise BindingError(f"{name!r} is not a variable of the expression (variables: {listed})", j)
    missing = [v for v in variables if v not in seen]
    if missing:
        raise BindingError(f"no value for the variable(s) {', '.join(missing)}")
    values = dict(named)
    return list(variables), [values[v] for v in variables]


def _positional(
    inputs: Sequence[Any], names: Sequence[str] | None, what: str
) -> tuple[tuple[Any, ...], tuple[str, ...] | None]:
    """Positional arguments and their names: given names, one dict keyed by name, or plain order."""
    __tracebackhide__ = True
    if names is not None:
        named = bind_names(list(names), inputs, f"{what} with input_names={list(names)!r}")
        return tuple(named.values()), tuple(named)
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        keys = [str(k) for k in inputs[0]]
        return tuple(inputs[0].values()), tuple(keys)
    return tuple(inputs), None


def bind_callable(
    fn: Any,
    inputs: Sequence[Any],
    *,
    names: Sequence[str] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Call:
    """A Python callable called with ``inputs`` (and constant ``kwargs``)."""
    __tracebackhide__ = True
    if not callable(fn):
        raise BindingError(
            f"a check needs a callable, an expression string or a registered name, got {type(fn).__name__}"
        )
    if names is not None and len(names) != len(inputs):
        raise BindingError(f"{len(names)} input_names given for {len(inputs)} inputs")
    arg_names = tuple(names) if names is not None else None
    return Call(label_of(fn), fn, tuple(inputs), arg_names, dict(kwargs or {}))


def bind_expression(text: str, inputs: Sequence[Any], *, max_length: int | None = None) -> Call:
    """An expression, its inputs in the order its variables first appear or one dict keyed by name."""
    __tracebackhide__ = True
    from gradcheck_svc.specs import ExpressionLimits, compile_expression

    limits = ExpressionLimits(max_length=max_length) if max_length is not None else ExpressionLimits()
    expression = compile_expression(text, limits)
    variables = list(expression.variables)
    if len(inputs) == 1 and isinstance(inputs[0], Mapping) and set(inputs[0]) != set(variables):
        raise BindingError(
            f"the inputs name {', '.join(map(str, inputs[0])) or 'nothing'}; "
            f"the variables of expression {expression.text!r} are {', '.join(variables)}"
        )
    named = bind_names(variables, inputs, f"expression {expression.text!r}")
    args = tuple(named.values())
    return Call(expression.text, expression, args, tuple(variables), expression=expression.text)


def bind_registered(
    name: str,
    inputs: Sequence[Any],
    registry: FunctionRegistry,
    *,
    names: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Call:
    """A registered function by name, its constant keywords checked against what it accepts."""
    __tracebackhide__ = True
    from gradcheck_svc.binding.names import resolve_entry

    entry = resolve_entry(name, registry)
    args, arg_names = _positional(inputs, names, name)
    if entry.module_class:  # by name, a module is built with its default constructor arguments
        from gradcheck_svc.binding.portable import InitArgs, build_module

        module = build_module(entry, InitArgs(), None)
        kwargs = entry.check_params(params)
        return Call(entry.name, module, args, arg_names, kwargs, registered=entry.name)
    fn = entry.bind(params)  # SpecError names a parameter the function does not take
    return Call(entry.name, fn, args, arg_names, registered=entry.name)


def bind(
    target: Any,
    inputs: Sequence[Any],
    *,
    names: Sequence[str] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    registry: FunctionRegistry | None = None,
) -> Call:
    """Any target: a callable, an expression string, or a registered name (``kwargs`` are its params).

    A string that parses as an expression is one, unless ``registry`` knows it by that name.
    """
    __tracebackhide__ = True
    if not isinstance(target, str):
        return bind_callable(target, inputs, names=names, kwargs=kwargs)
    from gradcheck_svc.binding.names import is_registered_name, local_registry

    text = target.strip()
    registry = registry if registry is not None else local_registry()
    if is_registered_name(text, registry):
        return bind_registered(text, inputs, registry, names=names, params=kwargs)
    if names is not None:
        raise BindingError("input_names is for callables: an expression's inputs are named by its variables")
    if kwargs:
        raise BindingError("params are for registered functions: an expression takes none")
    return bind_expression(text, inputs)
