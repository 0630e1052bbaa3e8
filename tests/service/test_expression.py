"""The safe expression language: what it accepts, what it computes, and what it refuses."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import gradcheck_svc.specs
from gradcheck_svc.errors import SpecError
from gradcheck_svc.specs import EXPRESSION_FUNCTIONS, ExpressionLimits, compile_expression, parse_expression


def test_seed_expressions() -> None:
    f = compile_expression("sin(x / 2**1.5)")
    assert f.variables == ("x",)
    assert f(torch.tensor(100.0, dtype=torch.float64)).item() == pytest.approx(math.sin(100 / 2**1.5))
    g = compile_expression("u**2 + v**3 + u*v")
    assert g.variables == ("u", "v")
    assert g(torch.tensor(2.0), torch.tensor(4.0)).item() == 76
    assert g(v=torch.tensor(4.0), u=torch.tensor(2.0)).item() == 76


def test_variables_in_order_of_first_appearance() -> None:
    assert parse_expression("b * a + c - a @ b").variables == ("b", "a", "c")
    assert parse_expression("pi * x").variables == ("x",)


@pytest.mark.parametrize(
    ("text", "inputs", "expected"),
    [
        ("softmax(x @ w, dim=-1)", {"x": torch.randn(2, 3), "w": torch.randn(3, 4)}, None),
        ("sum(x**2, dim=(0, 1), keepdim=True)", {"x": torch.randn(2, 3)}, None),
        ("x[0, 1:] + x[1:, -1] * x[..., 0][::2][0]", {"x": torch.randn(3, 3)}, None),
        ("gelu(x, approximate='tanh') - -x", {"x": torch.randn(4)}, None),
        ("clamp(x, min=None, max=0.5) * 2e-1", {"x": torch.randn(4)}, None),
        ("transpose(x, dim0=0, dim1=1) @ x", {"x": torch.randn(2, 3)}, None),
        ("atan2(x, 2) + pow(x, 2)", {"x": torch.randn(3, dtype=torch.float64)}, None),
        ("+x - 3 * -x / (1 + 2**-2)", {"x": torch.tensor(2.0)}, 2 + 6 / 1.25),
        ("sin(1.0) * x", {"x": torch.tensor(1.0)}, math.sin(1.0)),
    ],
)
def test_evaluates_like_torch(text: str, inputs: dict[str, torch.Tensor], expected: float | None) -> None:
    value = compile_expression(text)(**inputs)
    assert isinstance(value, torch.Tensor)
    if expected is not None:
        assert value.item() == pytest.approx(expected)


def test_matches_handwritten_torch() -> None:
    x, w = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    got = compile_expression("log_softmax(x @ w, dim=-1)[1]")(x, w)
    assert torch.equal(got, torch.log_softmax(x @ w, dim=-1)[1])


def test_numbers_promote_to_the_tensor_dtype() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert compile_expression("atan2(x, 1)")(x).dtype == torch.float64


def test_is_named_after_its_text() -> None:
    assert compile_expression("x**2").__name__ == "x**2"


def test_call_errors() -> None:
    f = compile_expression("u + v")
    with pytest.raises(TypeError, match="missing a value for v"):
        f(torch.tensor(1.0))
    with pytest.raises(TypeError, match="no variable 'w'"):
        f(torch.tensor(1.0), w=torch.tensor(1.0))
    with pytest.raises(TypeError, match="takes 2 inputs"):
        f(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))


ESCAPES = {
    "dunder attribute": "x.__class__.__bases__",
    "attribute": "x.T",
    "import": "__import__('os').system('true')",
    "getattr": "getattr(x, '__class__')",
    "eval": "eval('1')",
    "open": "open('/etc/passwd')",
    "lambda": "(lambda: 1)()",
    "list comprehension": "[i for i in x]",
    "generator": "sum(i for i in x)",
    "dict comprehension": "{i: i for i in x}",
    "walrus": "(y := x) + y",
    "f-string": "f'{x}'",
    "string": "'x' * 3",
    "bytes": "b'abc'",
    "string positional argument": "sin('x')",
    "starred": "sin(*x)",
    "double starred": "sin(**x)",
    "keyword from a variable": "softmax(x, dim=y)",
    "unknown keyword": "softmax(x, dim=0, out=x)",
    "missing keyword": "softmax(x)",
    "comparison": "x < 1",
    "boolean": "x and x",
    "conditional": "x if x else x",
    "tensor index": "x[y]",
    "float index": "x[1.5]",
    "underscore name": "_x + 1",
    "dunder name": "__builtins__",
    "non-ascii name": "\u0445 + 1",
    "bare function": "sin + x",
    "unknown function": "system(x)",
    "call of a call": "sin(x)(x)",
    "subscript call": "x[0](1)",
    "set": "{x}",
    "dict": "{x: x}",
    "tuple": "(x, x)",
    "await": "await x",
    "power tower": "10**10**10",
    "huge exponent": "x ** 1000",
    "huge negative exponent": "x ** -1000",
    "huge constant": "1" + "0" * 40,
    "infinite constant": "1e999 * x",
    "complex constant": "1j * x",
    "constant overflow": "9e17 * 9e17 + x",
    "division by zero": "x + 1 / 0",
    "complex power": "(-8) ** (1/3) + x",
    "semicolon": "x; x",
    "statement": "import os",
    "assignment": "y = x",
    "null byte": "x\x00",
    "deep nesting": "sin(" * 50 + "x" + ")" * 50,
    "too many parentheses": "(" * 250 + "x" + ")" * 250,
    "long chain": "x" + "+x" * 300,
    "too long": "x" + " " * 5000,
    "empty": "   ",
    "gelu bad keyword value": "gelu(x, approximate='exec')",
}


@pytest.mark.parametrize("text", list(ESCAPES.values()), ids=list(ESCAPES))
def test_escape_attempts_are_rejected(text: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_expression(text)
    assert str(info.value)  # says what was wrong


def test_rejections_say_what_and_where() -> None:
    with pytest.raises(SpecError, match="attribute access is not allowed in an expression at column 1"):
        parse_expression("x.__class__")
    with pytest.raises(SpecError, match="exponent 1e\\+10 is larger than 64"):
        parse_expression("10**10**10")
    with pytest.raises(SpecError, match="unknown function 'getattr'"):
        parse_expression("getattr(x, 'a')")
    with pytest.raises(SpecError, match="indices must be constants"):
        parse_expression("x[y]")


def test_limits_are_configurable() -> None:
    with pytest.raises(SpecError, match="longer than 10"):
        parse_expression("x + y + z + w", ExpressionLimits(max_length=10))
    with pytest.raises(SpecError, match="more than 5 syntax nodes"):
        parse_expression("x+y+z", ExpressionLimits(max_nodes=5))
    with pytest.raises(SpecError, match="deeper than 3"):
        parse_expression("sin(sin(x))", ExpressionLimits(max_depth=3))
    with pytest.raises(SpecError, match="larger than 2"):
        parse_expression("x**3", ExpressionLimits(max_exponent=2))
    assert parse_expression("x**2", ExpressionLimits(max_exponent=2)).variables == ("x",)


def test_largest_intermediate_is_found_without_allocating() -> None:
    f = compile_expression("sum(outer(x, x)) + y")
    big = torch.empty(10**6, device="meta")  # never materialised
    assert f.largest_intermediate({"x": big, "y": torch.empty(3, device="meta")}) == 10**12


def test_specs_never_call_eval_exec_or_compile() -> None:
    root = Path(gradcheck_svc.specs.__file__).parent
    pattern = re.compile(r"(?<![\w.])(eval|exec|compile)\s*\(")
    for path in root.glob("*.py"):
        assert not pattern.search(path.read_text()), path.name


def test_expression_functions_are_an_explicit_table() -> None:
    assert {"sin", "softmax", "solve", "sum"} <= set(EXPRESSION_FUNCTIONS)
    assert not {"eval", "getattr", "open", "__import__"} & set(EXPRESSION_FUNCTIONS)
