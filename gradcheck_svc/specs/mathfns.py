"""The functions an expression may call: an explicit allowlist of torch math functions.

Positional arguments are tensors (numbers are promoted to tensors of the first tensor argument's
dtype and device); everything else is a constant keyword argument checked by its ``ParamKind``.
Names are looked up in this table only, never on a module, so a client cannot reach anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from gradcheck_svc.specs.params import BOOL, FLOAT, INT, INTS, OPT_FLOAT, ParamKind, choice

__all__ = ["EXPRESSION_FUNCTIONS", "MathFunction"]


@dataclass(frozen=True)
class MathFunction:
    """One callable of the expression language."""

    name: str
    fn: Callable[..., torch.Tensor]
    min_args: int = 1
    max_args: int = 1
    params: Mapping[str, ParamKind] = field(default_factory=dict)
    required: tuple[str, ...] = ()


def _norm(x: torch.Tensor, *, ord: float = 2, dim: Any = None, keepdim: bool = False) -> torch.Tensor:
    norm: torch.Tensor = torch.linalg.vector_norm(x, ord=ord, dim=dim, keepdim=keepdim)
    return norm


def _reshape(x: torch.Tensor, *, shape: Any) -> torch.Tensor:
    return torch.reshape(x, (shape,) if isinstance(shape, int) else shape)


def _words(text: str) -> list[str]:
    return text.split()


_UNARY_TORCH = _words(
    "sin cos tan asin acos atan sinh cosh tanh asinh acosh atanh exp exp2 expm1 log log2 log10 "
    "log1p sqrt rsqrt abs sign sigmoid erf erfc erfinv lgamma digamma reciprocal square neg "
    "floor ceil round trunc frac sinc relu det inverse trace"
)
_BINARY_TORCH = _words("atan2 pow maximum minimum hypot fmod remainder xlogy matmul dot outer kron")
_DIM = {"dim": INTS, "keepdim": BOOL}


def _table() -> dict[str, MathFunction]:
    fns: list[MathFunction] = []
    fns += [MathFunction(n, getattr(torch, n)) for n in _UNARY_TORCH]
    fns += [MathFunction(n, getattr(torch, n), 2, 2) for n in _BINARY_TORCH]
    fns += [
        MathFunction("logit", torch.logit, params={"eps": OPT_FLOAT}),
        MathFunction("clamp", torch.clamp, params={"min": OPT_FLOAT, "max": OPT_FLOAT}),
        MathFunction("gelu", F.gelu, params={"approximate": choice("none", "tanh")}),
        MathFunction("silu", F.silu),
        MathFunction("mish", F.mish),
        MathFunction("selu", F.selu),
        MathFunction("softsign", F.softsign),
        MathFunction("tanhshrink", F.tanhshrink),
        MathFunction("logsigmoid", F.logsigmoid),
        MathFunction("hardswish", F.hardswish),
        MathFunction("hardsigmoid", F.hardsigmoid),
        MathFunction("relu6", F.relu6),
        MathFunction("elu", F.elu, params={"alpha": FLOAT}),
        MathFunction("celu", F.celu, params={"alpha": FLOAT}),
        MathFunction("leaky_relu", F.leaky_relu, params={"negative_slope": FLOAT}),
        MathFunction("softplus", F.softplus, params={"beta": FLOAT, "threshold": FLOAT}),
        MathFunction("hardtanh", F.hardtanh, params={"min_val": FLOAT, "max_val": FLOAT}),
        MathFunction("softmax", F.softmax, params={"dim": INT}, required=("dim",)),
        MathFunction("log_softmax", F.log_softmax, params={"dim": INT}, required=("dim",)),
        MathFunction("normalize", F.normalize, params={"p": FLOAT, "dim": INT, "eps": FLOAT}),
        MathFunction("sum", torch.sum, params=_DIM),
        MathFunction("mean", torch.mean, params=_DIM),
        MathFunction("amax", torch.amax, params=_DIM),
        MathFunction("amin", torch.amin, params=_DIM),
        MathFunction("prod", torch.prod, params={"dim": INT, "keepdim": BOOL}),
        MathFunction("logsumexp", torch.logsumexp, params=_DIM, required=("dim",)),
        MathFunction("std", torch.std, params={**_DIM, "correction": INT}),
        MathFunction("var", torch.var, params={**_DIM, "correction": INT}),
        MathFunction("norm", _norm, params={"ord": FLOAT, **_DIM}),
        MathFunction("cumsum", torch.cumsum, params={"dim": INT}, required=("dim",)),
        MathFunction("cumprod", torch.cumprod, params={"dim": INT}, required=("dim",)),
        MathFunction(
            "transpose", torch.transpose, params={"dim0": INT, "dim1": INT}, required=("dim0", "dim1")
        ),
        MathFunction("reshape", _reshape, params={"shape": INTS}, required=("shape",)),
        MathFunction("flatten", torch.flatten, params={"start_dim": INT, "end_dim": INT}),
        MathFunction("squeeze", torch.squeeze, params={"dim": INTS}),
        MathFunction("unsqueeze", torch.unsqueeze, params={"dim": INT}, required=("dim",)),
        MathFunction("diagonal", torch.diagonal, params={"offset": INT, "dim1": INT, "dim2": INT}),
        MathFunction("tril", torch.tril, params={"diagonal": INT}),
        MathFunction("triu", torch.triu, params={"diagonal": INT}),
        MathFunction("solve", torch.linalg.solve, 2, 2),
        MathFunction("cholesky", torch.linalg.cholesky, params={"upper": BOOL}),
        MathFunction("eigvalsh", torch.linalg.eigvalsh, params={"UPLO": choice("L", "U")}),
        MathFunction("svdvals", torch.linalg.svdvals),
        MathFunction("matrix_exp", torch.linalg.matrix_exp),
        MathFunction("pinv", torch.linalg.pinv),
        MathFunction("logdet", torch.logdet),
    ]
    return {f.name: f for f in fns}


EXPRESSION_FUNCTIONS: Mapping[str, MathFunction] = MappingProxyType(_table())
