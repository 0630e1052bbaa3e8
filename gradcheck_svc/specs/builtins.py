"""The built-in allowlist of registered functions: torch ops by their public names.

Each entry is spelled out here (name, callable, accepted parameters); nothing is looked up by a
name a client sends. Tensors are passed positionally in the order the client gives them, then the
parameters as keywords: ``torch.linalg.solve(A, B)``, ``torch.nn.functional.softmax(x, dim=-1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from gradcheck_svc.specs.params import BOOL, FLOAT, INT, INTS, OPT_FLOAT, ParamKind, choice

__all__ = ["builtin_functions"]


def _words(text: str) -> list[str]:
    return text.split()


_UNARY = _words(
    "sin cos tan asin acos atan sinh cosh tanh asinh acosh atanh exp exp2 expm1 log log2 log10 "
    "log1p sqrt rsqrt abs sigmoid erf erfc erfinv lgamma digamma reciprocal square sinc relu "
    "det trace"
)
_BINARY = _words("atan2 pow maximum minimum hypot xlogy mul add sub div matmul mm bmm dot outer kron")
_DIM = {"dim": INTS, "keepdim": BOOL}
_REDUCTION = {"reduction": choice("mean", "sum", "none")}
_CONV = {"stride": INTS, "padding": INTS, "dilation": INTS, "groups": INT}


def _layer_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    normalized_shape: int | tuple[int, ...],
    eps: float = 1e-5,
) -> torch.Tensor:
    """F.layer_norm with the tensors first, so they can be passed positionally."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return F.layer_norm(input, shape, weight, bias, eps)


def _entries() -> Iterator[tuple[str, Callable[..., Any], Mapping[str, ParamKind]]]:
    for n in _UNARY + _BINARY:
        yield f"torch.{n}", getattr(torch, n), {}
    yield "torch.clamp", torch.clamp, {"min": OPT_FLOAT, "max": OPT_FLOAT}
    yield "torch.sum", torch.sum, _DIM
    yield "torch.mean", torch.mean, _DIM
    yield "torch.prod", torch.prod, {"dim": INT, "keepdim": BOOL}
    yield "torch.logsumexp", torch.logsumexp, _DIM
    yield "torch.cumsum", torch.cumsum, {"dim": INT}
    yield "torch.cumprod", torch.cumprod, {"dim": INT}
    yield "torch.cdist", torch.cdist, {"p": FLOAT}
    yield "torch.linalg.solve", torch.linalg.solve, {"left": BOOL}
    yield "torch.linalg.inv", torch.linalg.inv, {}
    yield "torch.linalg.det", torch.linalg.det, {}
    yield "torch.linalg.slogdet", torch.linalg.slogdet, {}
    yield "torch.linalg.cholesky", torch.linalg.cholesky, {"upper": BOOL}
    yield "torch.linalg.qr", torch.linalg.qr, {"mode": choice("reduced", "complete")}
    yield "torch.linalg.eigh", torch.linalg.eigh, {"UPLO": choice("L", "U")}
    yield "torch.linalg.eigvalsh", torch.linalg.eigvalsh, {"UPLO": choice("L", "U")}
    yield "torch.linalg.svdvals", torch.linalg.svdvals, {}
    yield "torch.linalg.pinv", torch.linalg.pinv, {"hermitian": BOOL}
    yield "torch.linalg.matrix_exp", torch.linalg.matrix_exp, {}
    yield "torch.linalg.vector_norm", torch.linalg.vector_norm, {"ord": FLOAT, **_DIM}
    yield "torch.linalg.matrix_norm", torch.linalg.matrix_norm, {"ord": choice("fro", "nuc"), **_DIM}
    yield "torch.nn.functional.relu", F.relu, {}
    yield "torch.nn.functional.gelu", F.gelu, {"approximate": choice("none", "tanh")}
    yield "torch.nn.functional.silu", F.silu, {}
    yield "torch.nn.functional.mish", F.mish, {}
    yield "torch.nn.functional.elu", F.elu, {"alpha": FLOAT}
    yield "torch.nn.functional.leaky_relu", F.leaky_relu, {"negative_slope": FLOAT}
    yield "torch.nn.functional.softplus", F.softplus, {"beta": FLOAT, "threshold": FLOAT}
    yield "torch.nn.functional.softmax", F.softmax, {"dim": INT}
    yield "torch.nn.functional.log_softmax", F.log_softmax, {"dim": INT}
    yield "torch.nn.functional.normalize", F.normalize, {"p": FLOAT, "dim": INT, "eps": FLOAT}
    yield "torch.nn.functional.layer_norm", _layer_norm, {"normalized_shape": INTS, "eps": FLOAT}
    yield "torch.nn.functional.linear", F.linear, {}
    yield "torch.nn.functional.bilinear", F.bilinear, {}
    yield "torch.nn.functional.conv1d", F.conv1d, _CONV
    yield "torch.nn.functional.conv2d", F.conv2d, _CONV
    yield (
        "torch.nn.functional.avg_pool2d",
        F.avg_pool2d,
        {"kernel_size": INTS, "stride": INTS, "padding": INTS},
    )
    yield "torch.nn.functional.mse_loss", F.mse_loss, _REDUCTION
    yield "torch.nn.functional.l1_loss", F.l1_loss, _REDUCTION
    yield "torch.nn.functional.smooth_l1_loss", F.smooth_l1_loss, {**_REDUCTION, "beta": FLOAT}
    yield "torch.nn.functional.huber_loss", F.huber_loss, {**_REDUCTION, "delta": FLOAT}
    yield "torch.nn.functional.binary_cross_entropy", F.binary_cross_entropy, _REDUCTION
    yield "torch.nn.functional.cross_entropy", F.cross_entropy, {**_REDUCTION, "label_smoothing": FLOAT}
    yield "torch.nn.functional.kl_div", F.kl_div, {**_REDUCTION, "log_target": BOOL}
    yield (
        "torch.nn.functional.scaled_dot_product_attention",
        F.scaled_dot_product_attention,
        {"is_causal": BOOL, "scale": OPT_FLOAT},
    )


def builtin_functions() -> list[tuple[str, Callable[..., Any], Mapping[str, ParamKind]]]:
    """(name, callable, accepted parameters) of every built-in registered function."""
    return list(_entries())
