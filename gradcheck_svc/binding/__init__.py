"""Function + arguments -> the call the engine checks: one path for the plugin, the CLI and the server.

    from gradcheck_svc.binding import bind
    call = bind("mypkg.ops:sparsemax", [x], kwargs={"dim": -1})   # or a callable, or an expression
    report = call.check(mode="full")

``bind`` gives a ``Call`` (callable, positional arguments, their names, constant keywords, label);
``portable`` turns a Call into what travels to a server (or says in one line why it cannot);
``fill_arguments`` and ``build_module`` are the server's side of that. Every mistake raises
``BindingError`` (a TypeError), or ``UnknownFunctionError`` / ``SpecError`` for names and parameters.
"""

from gradcheck_svc.binding.call import (
    Call,
    bind,
    bind_callable,
    bind_expression,
    bind_names,
    bind_point,
    bind_registered,
    bind_variables,
    label_of,
    named_object,
)
from gradcheck_svc.binding.names import (
    is_registered_name,
    local_registry,
    registered_name,
    resolve_entry,
    why_not_remote,
)
from gradcheck_svc.binding.portable import (
    INIT_HOOK,
    InitArgs,
    Input,
    Portable,
    build_module,
    fill_arguments,
    init_args,
    portable,
    portable_named,
)
from gradcheck_svc.errors import BindingError

__all__ = [
    "INIT_HOOK",
    "BindingError",
    "Call",
    "InitArgs",
    "Input",
    "Portable",
    "bind",
    "bind_callable",
    "bind_expression",
    "bind_names",
    "bind_point",
    "bind_registered",
    "bind_variables",
    "build_module",
    "fill_arguments",
    "init_args",
    "is_registered_name",
    "label_of",
    "local_registry",
    "named_object",
    "portable",
    "portable_named",
    "registered_name",
    "resolve_entry",
    "why_not_remote",
]
