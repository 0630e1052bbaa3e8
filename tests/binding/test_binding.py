"""gradcheck_svc.binding: function + arguments -> the checked call, what travels, and the server's side."""

from __future__ import annotations

import binding_ops
import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.binding import (
    BindingError,
    InitArgs,
    Input,
    Portable,
    bind,
    build_module,
    fill_arguments,
    init_args,
    label_of,
    portable,
    portable_named,
    resolve_entry,
)
from gradcheck_svc.codec import decode_arguments, decode_module, encode_arguments, encode_module
from gradcheck_svc.errors import SpecError, UnknownFunctionError
from gradcheck_svc.specs import FunctionRegistry

X = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
REGISTERED = {"binding_ops:power", "binding_ops:Softmax", "binding_ops:Affine", "binding_ops:NoArgs"}


@pytest.fixture(scope="module")
def registry() -> FunctionRegistry:
    registry = FunctionRegistry.default(load_entry_points=False)
    registry.add_module(binding_ops)
    return registry


# ----------------------------------------------------------------------------- bind


def test_the_three_seeds_bind_and_check() -> None:
    square = bind("x**2", [torch.tensor(9.0)]).check()
    assert square.pairs[0].analytic == pytest.approx([18.0])
    sine = bind("sin(x / 2**1.5)", [torch.tensor(100.0)]).check()
    assert sine.pairs[0].analytic == pytest.approx([-0.2469], abs=1e-4)
    u, v = torch.tensor(2.0), torch.tensor(4.0)
    call = bind("u*v + u**2 + v**3", [{"v": v, "u": u}])
    assert call.names == ("u", "v")
    grads = {p.input: p.analytic for p in call.check().pairs}
    assert grads == {"u": pytest.approx([8.0]), "v": pytest.approx([50.0])}


def test_callable_with_constants_and_names() -> None:
    call = bind(binding_ops.Softmax.apply, [X.reshape(1, 3), 1], names=["x", "dim"])
    assert (call.label, call.names, call.args[1]) == ("Softmax", ("x", "dim"), 1)
    report = call.check()
    assert report.ok and report.function == "Softmax" and [p.input for p in report.pairs] == ["x"]


def test_keywords_reach_the_function() -> None:
    call = bind(binding_ops.power, [X], kwargs={"p": 3, "scale": 2.0})
    jacobian = torch.tensor(call.check().pairs[0].analytic).reshape(3, 3)
    assert jacobian.diagonal().tolist() == pytest.approx((6 * X**2).tolist())


def test_registered_name_validates_params(registry: FunctionRegistry) -> None:
    call = bind("binding_ops:power", [X], kwargs={"p": 3}, registry=registry)
    assert call.label == call.registered == "binding_ops:power"
    assert call.check().ok
    with pytest.raises(SpecError, match="has no parameter 'q'"):
        bind("binding_ops:power", [X], kwargs={"q": 3}, registry=registry)


@pytest.mark.parametrize(
    ("target", "inputs", "options", "message"),
    [
        ("u * v", [X], {}, r"expression 'u \* v' takes 2 input\(s\) \(u, v\), got 1"),
        ("x * 2", [X], {"names": ["x"]}, "input_names is for callables"),
        ("x * 2", [{"y": X}], {}, "the inputs name y; the variables of expression 'x \\* 2' are x"),
        ("x * 2", [X], {"kwargs": {"dim": 1}}, "params are for registered functions"),
        (torch.sin, [X], {"names": ["a", "b"]}, "2 input_names given for 1 inputs"),
        (3, [X], {}, "needs a callable, an expression string or a registered name, got int"),
    ],
)
def test_binding_mistakes_are_one_error_type(
    target: object, inputs: list, options: dict, message: str
) -> None:
    with pytest.raises(BindingError, match=message) as caught:
        bind(target, inputs, **options)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, gc.GradcheckError)


def test_expression_call_binds_through_the_same_rules() -> None:
    f = gc.specs.compile_expression("u * v")
    assert float(f(torch.tensor(2.0), v=torch.tensor(3.0))) == 6.0
    for args, kwargs, message in [
        ((X, X, X), {}, "takes 2 inputs, got 3"),
        ((X,), {"w": X}, "has no variable 'w'"),
        ((X,), {"u": X}, "got two values for 'u'"),
        ((X,), {}, "is missing a value for v"),
    ]:
        with pytest.raises(BindingError, match=message):
            f(*args, **kwargs)


def test_labels() -> None:
    assert label_of(binding_ops.Softmax.apply) == "Softmax"
    assert label_of(torch.sin) == "torch.sin"
    assert label_of(binding_ops.Affine(2, 1)) == "Affine"
    assert label_of(binding_ops.power) == "power"


# ----------------------------------------------------------------------------- names


def test_module_names_resolve_by_the_operator_rule() -> None:
    empty = FunctionRegistry()
    assert resolve_entry("binding_ops:power", empty).fn is binding_ops.power
    assert resolve_entry("binding_ops:Affine", empty).module_class
    for name, message in [
        ("binding_ops:Softmax.apply", "no registered function named"),  # no attribute walks
        ("binding_ops:torch", "binding_ops does not expose 'torch'"),  # only what it exposes
        ("binding_ops", "no registered function named"),
        ("no_such_module_here:f", "cannot import no_such_module_here"),
    ]:
        with pytest.raises(UnknownFunctionError, match=message):
            resolve_entry(name, empty)


# ----------------------------------------------------------------------------- what travels


def test_constants_travel_in_order() -> None:
    call = bind(binding_ops.Softmax.apply, [X.reshape(1, 3), -1])
    travelling = portable(call, REGISTERED)
    assert isinstance(travelling, Portable)
    assert travelling.name == "binding_ops:Softmax"
    assert travelling.arguments == (Input("inputs[0]"), -1)
    assert list(travelling.tensors) == ["inputs[0]"]


@pytest.mark.parametrize(
    ("fn", "inputs", "kwargs", "why"),
    [
        (lambda x: x, [X], {}, "lambda"),
        (
            binding_ops.power,
            [X, torch.float64],
            {},
            "argument inputs[1] is a torch.dtype, which cannot travel",
        ),
        (binding_ops.power, [X, [1, object()]], {}, "argument inputs[1] is a list holding a object"),
        (binding_ops.power, [X], {"scale": X}, "keyword argument 'scale' is a tensor"),
        (binding_ops.power, [3.0], {}, "no tensor argument to send"),
        (torch.special.expit, [X], {}, "is not registered on the server"),
    ],
)
def test_what_cannot_travel_says_why(fn: object, inputs: list, kwargs: dict, why: str) -> None:
    travelling = portable(bind(fn, inputs, kwargs=kwargs), REGISTERED)
    assert isinstance(travelling, str) and why in travelling


def test_modules_travel_with_their_constructor_arguments_and_state() -> None:
    module = binding_ops.Affine(3, 2)
    travelling = portable(bind(module, [X.float()]), REGISTERED)
    assert isinstance(travelling, Portable)
    assert travelling.init == InitArgs(3, 2, bias=True)
    assert set(travelling.state) == {"linear.weight", "linear.bias", "shift"}
    assert isinstance(init_args(binding_ops.NoArgs()), InitArgs)
    assert "does not declare" in str(init_args(torch.nn.Linear(2, 2)))


def test_a_name_the_server_knows_travels_without_resolving_here() -> None:
    travelling = portable_named("mypkg.private:op", [{"a": X, "b": X}], params={"k": 1})
    assert isinstance(travelling, Portable)
    assert travelling.arguments == (Input("a"), Input("b")) and travelling.params == {"k": 1}


def test_codec_round_trip() -> None:
    arguments = (Input("x"), -1, (1, 2), None, "mean", 0.5, True)
    decoded = decode_arguments(encode_arguments(arguments))
    assert decoded == [Input("x"), -1, [1, 2], None, "mean", 0.5, True]
    module = binding_ops.Affine(3, 2)
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    init, tensors = decode_module(encode_module(InitArgs(3, 2, bias=True), state), max_elements=1000)
    assert init == InitArgs(3, 2, bias=True)
    assert all(torch.equal(tensors[k], v.detach()) for k, v in state.items())
    assert tensors["linear.weight"].requires_grad and not tensors["shift"].requires_grad


# ----------------------------------------------------------------------------- the server's side


def test_fill_arguments_checks_the_template() -> None:
    values, names = fill_arguments([Input("x"), [0, 1], 2.5], {"x": X}, "")
    assert values[1:] == [(0, 1), 2.5] and names == ["x", "args[1]", "args[2]"]
    for arguments, point, message in [
        ([Input("y")], {"x": X}, "names 'y', not in the point"),
        ([Input("x"), Input("x")], {"x": X}, "input 'x' is used twice"),
        ([Input("x")], {"x": X, "w": X}, "input\\(s\\) w are not among the arguments"),
        ([Input("x"), "a" * 100], {"x": X}, "longer than 64 characters"),
    ]:
        with pytest.raises(BindingError, match=message):
            fill_arguments(arguments, point, "")


def test_build_module_rebuilds_exactly(registry: FunctionRegistry) -> None:
    local = binding_ops.Affine(3, 2).double()
    local.linear.bias.requires_grad_(False)
    state = dict(local.named_parameters()) | dict(local.named_buffers())
    rebuilt = build_module(registry.get("binding_ops:Affine"), InitArgs(3, 2), state)
    here, there = gc.check(local, X), gc.check(rebuilt, X)
    assert [p.input for p in here.pairs] == [p.input for p in there.pairs] == ["inputs[0]", "linear.weight"]
    assert [p.analytic for p in here.pairs] == [p.analytic for p in there.pairs]


def test_build_module_refuses_what_does_not_fit(registry: FunctionRegistry) -> None:
    entry = registry.get("binding_ops:Affine")
    good = dict(binding_ops.Affine(3, 2).named_parameters()) | {"shift": torch.zeros(2)}
    for init, state, message in [
        (InitArgs(0, 2), good, r"raised ValueError: n must be positive"),
        (InitArgs(3, 2), {k: v for k, v in good.items() if k != "shift"}, "missing shift"),
        (InitArgs(3, 2), good | {"extra": X}, "unexpected extra"),
        (InitArgs(4, 2), good, r"linear.weight has shape \[2, 3\], the module's is \[2, 4\]"),
        (InitArgs(3, 2, bias=object()), good, "unsupported type object"),
    ]:
        with pytest.raises(BindingError, match=message):
            build_module(entry, init, state)
    assert entry.check_params({"x": 1}) == {"x": 1}  # forward's parameters, not its self
    with pytest.raises(SpecError, match="has no parameter 'self'"):
        entry.check_params({"self": 1})
    with pytest.raises(BindingError, match="not a module class"):
        build_module(registry.get("binding_ops:power"), InitArgs(), {})


def test_bind_point_orders_by_variables_and_names_the_culprit() -> None:
    from gradcheck_svc.binding import bind_point

    assert bind_point([("v", 2), ("u", 1)], ("u", "v")) == (["u", "v"], [1, 2])
    assert bind_point([("b", 2), ("a", 1)]) == (["b", "a"], [2, 1])  # no expression: as given
    for named, variables, message, position in [
        ([("u", 1), ("u", 2)], None, "'u' is given twice", 1),
        ([("u", 1), ("w", 2)], ("u",), "'w' is not a variable of the expression", 1),
        ([("u", 1)], ("u", "v"), r"no value for the variable\(s\) v", None),
    ]:
        with pytest.raises(BindingError, match=message) as caught:
            bind_point(named, variables)
        assert caught.value.position == position
