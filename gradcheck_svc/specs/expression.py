"""Safe math expressions: ``sin(x / 2**1.5)``, ``u**2 + v**3 + u*v``, ``softmax(x @ w, dim=-1)``.

The text is parsed with ``ast`` and every node is checked against an allowlist, then converted into
a small tree of our own node types that is evaluated by walking it. Nothing is ever passed to
``eval``, ``exec`` or ``compile``: the only operations that can happen are the ones spelled out in
``_BINARY`` and ``EXPRESSION_FUNCTIONS``.

Accepted: numbers, names, ``+ - * / ** @``, unary minus (and plus), parentheses, calls to the
functions of ``EXPRESSION_FUNCTIONS`` with tensor positional arguments and constant keyword
arguments, integer / slice / ``...`` indexing. The name ``pi`` is the constant π. Everything else
(attributes, dunders, lambdas, comprehensions, comparisons, strings outside keyword arguments, ...)
is rejected with a SpecError that says what and where.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gradcheck_svc.errors import SpecError
from gradcheck_svc.specs.mathfns import EXPRESSION_FUNCTIONS, MathFunction
from gradcheck_svc.specs.params import MAX_MAGNITUDE, ParamKind

__all__ = ["Expression", "ExpressionLimits", "compile_expression", "parse_expression"]


@dataclass(frozen=True)
class ExpressionLimits:
    """Bounds that keep parsing and evaluation cheap whatever a client sends."""

    max_length: int = 2000  # characters
    max_nodes: int = 400  # Python AST nodes
    max_depth: int = 40  # nesting of the Python AST
    max_exponent: float = 64  # |constant exponent| of **
    max_name_length: int = 64


DEFAULT_LIMITS = ExpressionLimits()
CONSTANTS: Mapping[str, float] = {"pi": math.pi}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")  # ASCII only: no look-alike names, no leading underscore

Number = float  # ints are numbers too (PEP 484 numeric tower)
Watch = Callable[[Any], None]


# ----------------------------------------------------------------------------- the tree


class Node:
    """A node of the evaluation tree."""

    def evaluate(self, env: Mapping[str, Any], watch: Watch | None = None) -> Any:
        """Compute this node; ``watch`` sees every intermediate result (used for size checks)."""
        value = self._compute(env, watch)
        if watch is not None:
            watch(value)
        return value

    def _compute(self, env: Mapping[str, Any], watch: Watch | None) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Const(Node):
    value: Number

    def _compute(self, env: Mapping[str, Any], watch: Watch | None) -> Any:
        return self.value


@dataclass(frozen=True)
class Var(Node):
    name: str

    def _compute(self, env: Mapping[str, Any], watch: Watch | None) -> Any:
        return env[self.name]


@dataclass(frozen=True)
class Neg(Node):
    operand: Node

    def _compute(self, env: Mapping[str, Any], watch: Watch | None) -> Any:
        return -self.operand.evaluate(env, watch)


@dataclass(frozen=True)
class BinOp(Node):
    op: str
    left: Node
    right: Node

    def _compute(self, env: Mapping[str, Any], watch: Watch | None) -> Any:
        return _BINARY[self.op](self.left.evaluate(env, watch), self.right.evaluate(env, watch))


@dataclass(frozen=True)
class Call(Node):
    function: MathFunction
    args: tuple[Node, ...]
    kwargs: tuple[tuple[str, Any], ...]

    def _compute(self, env: Mapping[str, Any], watch: Watch | None) -> Any:
        values = [a.evaluate(env, watch) for a in self.args]
        like = next((v for v in values if isinstance(v, torch.Tensor)), None)
        tensors = [v if isinstance(v, torch.Tensor) else _as_tensor(v, like) for v in values]
        return self.function.fn(*tensors, **dict(self.kwargs))


@dataclass(frozen=True)
class Index(Node):
    value: Node
    index: tuple[Any, ...]

    def _compute(self, env: Mapping[str, Any], watch: Watch | None) -> Any:
        value = self.value.evaluate(env, watch)
        if not isinstance(value, torch.Tensor):
            raise SpecError("only tensors can be indexed")
        return value[self.index]


def _as_tensor(value: Number, like: torch.Tensor | None) -> torch.Tensor:
    """A number passed to a function becomes a tensor of the first tensor argument's dtype/device."""
    if like is not None and (like.is_floating_point() or like.is_complex()):
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    return torch.tensor(float(value), device=None if like is None else like.device)


_BINARY: Mapping[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "**": operator.pow,
    "@": operator.matmul,
}
_AST_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.MatMult: "@"}


# ----------------------------------------------------------------------------- the expression


class Expression:
    """A parsed expression: call it with tensors (positionally in ``variables`` order, or by name)."""

    def __init__(self, text: str, tree: Node, variables: tuple[str, ...]) -> None:
        self.text = text
        self.tree = tree
        self.variables = variables
        # The engine and reports name a function by __name__; the text is the best name we have.
        self.__name__ = self.__qualname__ = text

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from gradcheck_svc.binding import bind_variables

        env = bind_variables(self.variables, args, kwargs, repr(self.text))
        result = self.tree.evaluate(env)
        return result if isinstance(result, torch.Tensor) else torch.tensor(result)

    def largest_intermediate(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Elements of the largest tensor evaluation would create, found on the meta device (no data).

        Lets a server refuse ``outer(x, x)`` of a large ``x`` before allocating it.
        """
        env = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in inputs.items()}
        largest = max((t.numel() for t in env.values()), default=0)

        def watch(value: Any) -> None:
            nonlocal largest
            if isinstance(value, torch.Tensor):
                largest = max(largest, value.numel())

        self.tree.evaluate(env, watch)
        return largest

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def parse_expression(text: str, limits: ExpressionLimits = DEFAULT_LIMITS) -> Expression:
    """Parse and validate ``text``; raise SpecError (a ValueError) saying what is not allowed."""
    if not isinstance(text, str):
        raise SpecError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > limits.max_length:
        raise SpecError(f"expression is longer than {limits.max_length} characters")
    if not text.strip():
        raise SpecError("expression is empty")
    try:
        module = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        where = f" at column {exc.offset}" if isinstance(exc, SyntaxError) and exc.offset else ""
        raise SpecError(f"expression is not valid syntax{where}: {getattr(exc, 'msg', exc)}") from None
    _check_size(module, limits)
    builder = _Builder(limits)
    tree = builder.build(module.body)
    return Expression(text, tree, tuple(builder.variables))


def compile_expression(text: str, limits: ExpressionLimits = DEFAULT_LIMITS) -> Expression:
    """``parse_expression`` under the name of what it gives: a callable ``fn(*tensors, **tensors)``."""
    return parse_expression(text, limits)


def _check_size(root: ast.AST, limits: ExpressionLimits) -> None:
    """Count nodes and depth iteratively, before any recursive walk can run out of stack."""
    stack = [(root, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise SpecError(f"expression has more than {limits.max_nodes} syntax nodes")
        if depth > limits.max_depth:
            raise SpecError(f"expression nests deeper than {limits.max_depth} levels")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _where(node: ast.AST) -> str:
    col = getattr(node, "col_offset", None)
    return f" at column {col + 1}" if col is not None else ""


class _Builder:
    """Converts an allowlisted Python AST into our tree; anything unexpected raises SpecError."""

    def __init__(self, limits: ExpressionLimits) -> None:
        self.limits = limits
        self.variables: list[str] = []

    def build(self, node: ast.AST) -> Node:
        if isinstance(node, ast.Constant):
            return Const(self._number(node))
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = self.build(node.operand)
            if isinstance(node.op, ast.UAdd):
                return operand
            if isinstance(operand, Const):
                return Const(self._fold(operator.neg, [operand], node))
            return Neg(operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_BINARY:
            return self._binop(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Subscript):
            return Index(self.build(node.value), self._index(node.slice))
        raise SpecError(f"{_describe(node)} is not allowed in an expression{_where(node)}")

    def _number(self, node: ast.Constant) -> Number:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{_describe(node)} is not allowed here{_where(node)}")
        return _bounded(value, node)

    def _name(self, node: ast.Name) -> Node:
        name = node.id
        if name in CONSTANTS:
            return Const(CONSTANTS[name])
        if not _NAME.match(name) or len(name) > self.limits.max_name_length:
            raise SpecError(
                f"name {name[:80]!r} is not allowed{_where(node)}: variables are ASCII letters, digits and "
                f"underscores, start with a letter, at most {self.limits.max_name_length} characters"
            )
        if name in EXPRESSION_FUNCTIONS:
            raise SpecError(f"{name!r} is a function; call it as {name}(...){_where(node)}")
        if name not in self.variables:
            self.variables.append(name)
        return Var(name)

    def _binop(self, node: ast.BinOp) -> Node:
        op = _AST_BINARY[type(node.op)]
        left, right = self.build(node.left), self.build(node.right)
        if op == "**" and isinstance(right, Const) and abs(right.value) > self.limits.max_exponent:
            limit = self.limits.max_exponent
            raise SpecError(f"exponent {right.value:g} is larger than {limit:g} in magnitude{_where(node)}")
        if isinstance(left, Const) and isinstance(right, Const):
            if op == "@":
                raise SpecError(f"@ needs tensors, not numbers{_where(node)}")
            return Const(self._fold(_BINARY[op], [left, right], node))
        return BinOp(op, left, right)

    def _fold(self, fn: Callable[..., Any], args: list[Const], node: ast.AST) -> Number:
        """Evaluate constant arithmetic now (bounded: exponents are already capped)."""
        values = [a.value for a in args]
        if fn is operator.pow:
            values = [float(v) for v in values]  # float pow cannot build huge integers
        try:
            result = fn(*values)
        except (ArithmeticError, ValueError) as exc:
            raise SpecError(f"constant arithmetic failed{_where(node)}: {exc}") from None
        if isinstance(result, complex):
            raise SpecError(f"constant arithmetic gives a complex number{_where(node)}")
        return _bounded(result, node)

    def _call(self, node: ast.Call) -> Node:
        if not isinstance(node.func, ast.Name):
            raise SpecError(f"only plain function names can be called{_where(node)}, e.g. sin(x)")
        name = node.func.id
        function = EXPRESSION_FUNCTIONS.get(name)
        if function is None:
            raise SpecError(f"unknown function {name[:80]!r}{_where(node)}")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise SpecError(f"*arguments are not allowed{_where(node)}")
        if not function.min_args <= len(node.args) <= function.max_args:
            count = (
                str(function.min_args)
                if function.min_args == function.max_args
                else f"{function.min_args} to {function.max_args}"
            )
            raise SpecError(f"{name}() takes {count} tensor argument(s), got {len(node.args)}{_where(node)}")
        args = tuple(self.build(a) for a in node.args)
        kwargs = tuple(self._keyword(function, kw) for kw in node.keywords)
        given = {k for k, _ in kwargs}
        if len(given) != len(kwargs):
            raise SpecError(f"{name}() got a keyword argument twice{_where(node)}")
        missing = [r for r in function.required if r not in given]
        if missing:
            raise SpecError(f"{name}() needs the keyword argument(s) {', '.join(missing)}{_where(node)}")
        return Call(function, args, kwargs)

    def _keyword(self, function: MathFunction, kw: ast.keyword) -> tuple[str, Any]:
        if kw.arg is None:
            raise SpecError(f"**arguments are not allowed{_where(kw)}")
        kind: ParamKind | None = function.params.get(kw.arg)
        if kind is None:
            known = ", ".join(sorted(function.params)) or "none"
            raise SpecError(f"{function.name}() has no keyword argument {kw.arg!r} (accepted: {known})")
        return kw.arg, kind.check(kw.arg, _constant(kw.value))

    def _index(self, node: ast.AST) -> tuple[Any, ...]:
        items = node.elts if isinstance(node, ast.Tuple) else [node]
        return tuple(self._index_item(item) for item in items)

    def _index_item(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and node.value is Ellipsis:
            return Ellipsis
        if isinstance(node, ast.Slice):
            bounds = [None if b is None else _index_int(b) for b in (node.lower, node.upper, node.step)]
            return slice(*bounds)
        return _index_int(node)


def _bounded(value: Number, node: ast.AST) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"constant is not finite{_where(node)}")
    if abs(value) > MAX_MAGNITUDE:
        raise SpecError(f"constant is larger than {MAX_MAGNITUDE:g} in magnitude{_where(node)}")
    return value


def _index_int(node: ast.AST) -> int:
    value = _constant(node, "indices")
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"indices must be integer constants, slices or ...{_where(node)}")
    return value


def _constant(node: ast.AST, what: str = "keyword arguments") -> Any:
    """A keyword-argument or index value: number, -number, True/False/None, short string, list of ints."""
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    if negative and isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
        inner = node.operand.value
        if isinstance(inner, int | float) and not isinstance(inner, bool):
            return _bounded(-inner, node)
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return _bounded(value, node)
        if isinstance(value, str):
            return value  # checked by the parameter's kind (a fixed set of keywords)
    if isinstance(node, ast.Tuple | ast.List):
        return [_constant(e, what) for e in node.elts]
    raise SpecError(f"{_describe(node)} is not a constant{_where(node)}; {what} must be constants")


_DESCRIPTIONS = {
    ast.Attribute: "attribute access",
    ast.Lambda: "lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.NamedExpr: "the walrus operator :=",
    ast.JoinedStr: "an f-string",
    ast.Compare: "a comparison",
    ast.BoolOp: "a boolean operator",
    ast.IfExp: "a conditional expression",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.Starred: "a starred expression",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.List: "a list",
    ast.Tuple: "a tuple",
}


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r}"[:80]
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return f"the operator {type(node.op).__name__}"
    return _DESCRIPTIONS.get(type(node), type(node).__name__)
