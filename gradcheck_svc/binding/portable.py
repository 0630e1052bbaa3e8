"""A call in the form that travels to a server, and the call a server rebuilds from it.

What travels: the registered name; the positional arguments in order, each either a tensor of the
evaluation point (by name) or a plain constant (None, bool, int, float, short str, a flat list or
tuple of those); constant keyword arguments; and for an ``nn.Module`` whose class the operator
registered, its constructor arguments and its parameters and buffers as tensors. The server builds
only what its operator registered, from plain values: no client code runs there.

A module declares its constructor arguments with a ``gradcheck_init_args()`` method returning an
``InitArgs`` (or a dict of keyword arguments, or a tuple of positional ones).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_svc.binding.call import Call
from gradcheck_svc.binding.names import registered_name, why_not_remote
from gradcheck_svc.errors import BindingError, SpecError

if TYPE_CHECKING:
    import torch

    from gradcheck_svc.specs import RegisteredFunction

__all__ = [
    "INIT_HOOK",
    "InitArgs",
    "Input",
    "Portable",
    "build_module",
    "fill_arguments",
    "init_args",
    "portable",
    "portable_named",
]

INIT_HOOK = "gradcheck_init_args"


@dataclass(frozen=True)
class InitArgs:
    """Constructor arguments of a module: ``InitArgs(3, 4, bias=False)``."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "args", tuple(args))
        object.__setattr__(self, "kwargs", dict(kwargs))


@dataclass(frozen=True)
class Input:
    """A positional argument that is the point's tensor of this name."""

    name: str


@dataclass(frozen=True)
class Portable:
    """A call as it travels: ``tensors`` is the point (by name), ``arguments`` the positional template."""

    name: str
    arguments: tuple[Any, ...]  # Input(name) or a constant, in call order
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]
    init: InitArgs | None = None  # set for a module
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # a module's parameters and buffers


def _constant_problem(value: Any) -> str:
    """Why ``value`` cannot travel as a constant ("" when it can)."""
    if value is None or isinstance(value, bool | int | float | str):
        return ""
    if isinstance(value, list | tuple):
        for item in value:
            if item is not None and not isinstance(item, bool | int | float | str):
                return f"a {type(value).__name__} holding a {type(item).__name__}"
        return ""
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def init_args(module: Any) -> InitArgs | str:
    """The constructor arguments a module declares, or why it declares none usable."""
    hook = getattr(module, INIT_HOOK, None)
    if hook is None:
        cls = type(module).__qualname__
        return f"module {cls} does not declare its constructor arguments ({INIT_HOOK}())"
    declared = hook() if callable(hook) else hook
    if isinstance(declared, InitArgs):
        init = declared
    elif isinstance(declared, Mapping):
        init = InitArgs(**declared)
    elif isinstance(declared, list | tuple):
        init = InitArgs(*declared)
    else:
        return f"{INIT_HOOK}() of {type(module).__qualname__} returned a {type(declared).__name__}"
    for i, value in enumerate(init.args):
        if why := _constant_problem(value):
            return f"constructor argument {i} of {type(module).__qualname__} is {why}"
    for key, value in init.kwargs.items():
        if why := _constant_problem(value):
            return f"constructor argument {key!r} of {type(module).__qualname__} is {why}"
    return init


def portable(call: Call, registered: Collection[str]) -> Portable | str:
    """``call`` as it would travel to a server knowing ``registered``, or one line saying why it cannot."""
    import torch

    if call.expression:
        raise BindingError("an expression travels as its text, not as a registered call")
    fn = call.fn
    name = call.registered if call.registered in registered else None
    if name is None:
        if why := why_not_remote(fn):
            return why
        name = registered_name(fn, registered)
    if name is None:
        what = f"class {type(fn).__qualname__}" if isinstance(fn, torch.nn.Module) else call.label
        return f"{what} is not registered on the server"

    travelling = _arguments(call.input_names(), call.args, call.kwargs)
    if isinstance(travelling, str):
        return travelling
    arguments, tensors = travelling
    init: InitArgs | None = None
    state: dict[str, torch.Tensor] = {}
    if isinstance(fn, torch.nn.Module):
        declared = init_args(fn)
        if isinstance(declared, str):
            return declared
        init = declared
        state = dict(fn.named_parameters()) | dict(fn.named_buffers())
    return Portable(name, arguments, tensors, dict(call.kwargs), init, state)


def portable_named(
    name: str,
    inputs: Sequence[Any],
    *,
    names: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Portable | str:
    """A call of the server's function ``name`` (which need not exist here) as it travels."""
    from gradcheck_svc.binding.call import _positional

    args, arg_names = _positional(inputs, names, name)
    labels = list(arg_names) if arg_names is not None else [f"inputs[{i}]" for i in range(len(args))]
    travelling = _arguments(labels, args, params or {})
    if isinstance(travelling, str):
        return travelling
    return Portable(name, travelling[0], travelling[1], dict(params or {}))


def _arguments(
    names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, torch.Tensor]] | str:
    """The positional template and the point's tensors, or why some argument cannot travel."""
    import torch

    arguments: list[Any] = []
    tensors: dict[str, torch.Tensor] = {}
    for arg_name, value in zip(names, args, strict=True):
        if isinstance(value, torch.Tensor):
            arguments.append(Input(arg_name))
            tensors[arg_name] = value
        elif why := _constant_problem(value):
            return f"argument {arg_name} is {why}, which cannot travel"
        else:
            arguments.append(value)
    if not tensors:
        return "no tensor argument to send"
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return f"keyword argument {key!r} is a tensor: pass tensors positionally to check remotely"
        if why := _constant_problem(value):
            return f"keyword argument {key!r} is {why}, which cannot travel"
    return tuple(arguments), tensors


# ----------------------------------------------------------------------------- the server's side


def fill_arguments(
    arguments: Sequence[Any], point: Mapping[str, torch.Tensor], where: str
) -> tuple[list[Any], list[str]]:
    """The positional arguments of one point, and their names (tensors by their point name).

    Every tensor of the point is used exactly once; constants are checked like any parameter.
    """
    where = f"{where}: " if where else ""
    from gradcheck_svc.specs.params import check_scalar_value

    values: list[Any] = []
    names: list[str] = []
    used: set[str] = set()
    for i, argument in enumerate(arguments):
        if isinstance(argument, Input):
            if argument.name not in point:
                raise BindingError(f"{where}argument {i} names {argument.name!r}, not in the point")
            if argument.name in used:
                raise BindingError(f"{where}input {argument.name!r} is used twice")
            used.add(argument.name)
            values.append(point[argument.name])
            names.append(argument.name)
        else:
            try:
                value = check_scalar_value(f"args[{i}]", argument)
            except SpecError as exc:
                raise BindingError(f"{where}{exc}") from None
            values.append(tuple(value) if isinstance(value, list) else value)  # lists travel for tuples
            names.append(f"args[{i}]")
    unused = [n for n in point if n not in used]
    if unused:
        raise BindingError(f"{where}input(s) {', '.join(unused)} are not among the arguments")
    return values, names


def build_module(entry: RegisteredFunction, init: InitArgs, state: Mapping[str, torch.Tensor] | None) -> Any:
    """An instance of the registered module class ``entry``, built from plain values, its parameters
    and buffers replaced by ``state`` (every one, by name, same shape; dtype and requires_grad as sent).
    ``state=None`` keeps the constructor's own."""
    import torch

    from gradcheck_svc.specs.params import check_scalar_value

    cls = entry.fn
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise BindingError(f"{entry.name} is not a module class: it takes no constructor arguments")
    try:
        args = [check_scalar_value(f"init.args[{i}]", v) for i, v in enumerate(init.args)]
        kwargs = {k: check_scalar_value(f"init.{k}", v) for k, v in init.kwargs.items()}
    except SpecError as exc:
        raise BindingError(f"{entry.name}: {exc}") from None
    try:
        module = cls(*args, **kwargs)
    except Exception as exc:  # the operator's constructor refused these arguments
        raise BindingError(f"{entry.name}(...) raised {type(exc).__name__}: {exc}") from None
    if state is None:
        return module
    expected = dict(module.named_parameters()) | dict(module.named_buffers())
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        )
        raise BindingError(f"{entry.name}: state does not match the module: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise BindingError(
                f"{entry.name}: {name} has shape {list(tensor.shape)}, "
                f"the module's is {list(expected[name].shape)}"
            )
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
        else:
            owner._buffers[leaf] = tensor.detach()
    return module
