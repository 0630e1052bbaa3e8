"""Functions people write and check: custom autograd.Functions and native layers.

Each case builds ``(fn, inputs)`` in float64 with fixed seeds; a case with a planted
bug also builds its twin, the same function with one realistic mistake in the
backward (a dropped term, a wrong factor, a flipped kernel). The custom Functions
follow the shapes found in public code: old-style ``forward(ctx, ...)`` with
``ctx.save_for_backward``, and new-style ``forward(...)`` + ``setup_context``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CASES", "Case"]

Built = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    build: Callable[[bool], Built]  # build(buggy) -> (fn, inputs)
    has_bug: bool = True


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).requires_grad_()


# ---------------------------------------------------------------- old-style elementwise: swish
def _swish(buggy: bool) -> type[torch.autograd.Function]:
    class Swish(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            s = torch.sigmoid(x)
            ctx.save_for_backward(x, s)
            return x * s

        @staticmethod
        def backward(ctx, g):
            x, s = ctx.saved_tensors
            # d/dx x s(x) = s + x s (1 - s); the planted bug drops the second factor's (1 - s)
            inner = s if buggy else s * (1 - s)
            return g * (s + x * inner)

    return Swish


def build_swish(buggy: bool) -> Built:
    return _swish(buggy).apply, (_randn(1000, seed=1),)


# ---------------------------------------------------------------- new-style elementwise: mish
def _mish(buggy: bool) -> type[torch.autograd.Function]:
    class Mish(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * torch.tanh(F.softplus(x))

        @staticmethod
        def setup_context(ctx, inputs, output):
            (x,) = inputs
            ctx.save_for_backward(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            t = torch.tanh(F.softplus(x))
            sig = torch.sigmoid(x)
            # The bug: sech^2 written as 1 - t instead of 1 - t^2.
            sech2 = (1 - t) if buggy else (1 - t * t)
            return g * (t + x * sech2 * sig)

    return Mish


def build_mish(buggy: bool) -> Built:
    return _mish(buggy).apply, (_randn(1000, seed=2),)


# ---------------------------------------------------------------- old-style row-wise: sparsemax
def _sparsemax(buggy: bool) -> type[torch.autograd.Function]:
    class Sparsemax(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            z, _ = torch.sort(x, dim=-1, descending=True)
            k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
            cumsum = z.cumsum(-1)
            support = (1 + k * z) > cumsum
            k_z = support.sum(-1, keepdim=True)
            tau = (cumsum.gather(-1, k_z - 1) - 1) / k_z.to(x.dtype)
            out = torch.clamp(x - tau, min=0)
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, g):
            (out,) = ctx.saved_tensors
            nz = (out > 0).to(g.dtype)
            if buggy:  # the projection term forgotten: a diagonal Jacobian
                return g * nz
            v = (g * nz).sum(-1, keepdim=True) / nz.sum(-1, keepdim=True)
            return nz * (g - v)

    return Sparsemax


def build_sparsemax(buggy: bool) -> Built:
    return _sparsemax(buggy).apply, (_randn(20, 50, seed=3),)


# ---------------------------------------------------------------- old-style fused bias + GeLU
def _bias_gelu(buggy: bool) -> type[torch.autograd.Function]:
    c = math.sqrt(2 / math.pi)

    class BiasGeLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, bias):
            ctx.save_for_backward(x, bias)
            y = x + bias
            return 0.5 * y * (1 + torch.tanh(c * (y + 0.044715 * y**3)))

        @staticmethod
        def backward(ctx, g):
            x, bias = ctx.saved_tensors
            y = x + bias
            t = torch.tanh(c * (y + 0.044715 * y**3))
            d = 0.5 * (1 + t) + 0.5 * y * (1 - t * t) * c * (1 + 3 * 0.044715 * y * y)
            gx = g * d
            # The bug: the bias gradient takes only the first row instead of the sum over rows.
            gb = gx[0] if buggy else gx.sum(0)
            return gx, gb

    return BiasGeLU


def build_bias_gelu(buggy: bool) -> Built:
    return _bias_gelu(buggy).apply, (_randn(32, 24, seed=4), _randn(24, seed=5))


# ---------------------------------------------------------------- new-style soft threshold
def _soft_threshold(buggy: bool) -> type[torch.autograd.Function]:
    class SoftShrinkSmooth(torch.autograd.Function):
        """A smooth soft-threshold: x - lam * tanh(x / lam)."""

        @staticmethod
        def forward(x, lam):
            return x - lam * torch.tanh(x / lam)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, lam = inputs
            ctx.save_for_backward(x)
            ctx.lam = lam

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            t = torch.tanh(x / ctx.lam)
            # The bug: the chain rule's 1/lam applied twice.
            dt = (1 - t * t) / ctx.lam if buggy else (1 - t * t)
            return g * (1 - dt), None

    return SoftShrinkSmooth


def build_soft_threshold(buggy: bool) -> Built:
    fn = _soft_threshold(buggy).apply
    return (lambda x: fn(x, 0.7)), (_randn(1500, seed=6),)


# ---------------------------------------------------------------- old-style smooth clipping
def _soft_clip(buggy: bool) -> type[torch.autograd.Function]:
    class SoftClip(torch.autograd.Function):
        """Clip to (-3, 3) smoothly: 3 tanh(x / 3)."""

        @staticmethod
        def forward(ctx, x):
            t = torch.tanh(x / 3)
            ctx.save_for_backward(t)
            return 3 * t

        @staticmethod
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            return g * (1 - t * t) * (3.0 if buggy else 1.0)

    return SoftClip


def build_soft_clip(buggy: bool) -> Built:
    return _soft_clip(buggy).apply, (_randn(2000, seed=7, scale=3.0),)


# ---------------------------------------------------------------- new-style logsumexp
def _logsumexp(buggy: bool) -> type[torch.autograd.Function]:
    class LogSumExp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            m = x.amax(-1, keepdim=True)
            return (m + (x - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)

        @staticmethod
        def setup_context(ctx, inputs, output):
            (x,) = inputs
            ctx.save_for_backward(x, output)

        @staticmethod
        def backward(ctx, g):
            x, out = ctx.saved_tensors
            # The bug: the max shift kept in the softmax (exp(x - max) instead of exp(x - lse)).
            shift = x.amax(-1, keepdim=True) if buggy else out.unsqueeze(-1)
            return g.unsqueeze(-1) * (x - shift).exp()

    return LogSumExp


def build_logsumexp(buggy: bool) -> Built:
    return _logsumexp(buggy).apply, (_randn(40, 25, seed=8),)


# ---------------------------------------------------------------- old-style attention with hand backward
def _attention(buggy: bool) -> type[torch.autograd.Function]:
    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            scale = q.shape[-1] ** -0.5
            p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
            ctx.save_for_backward(q, k, v, p)
            return p @ v

        @staticmethod
        def backward(ctx, g):
            q, k, v, p = ctx.saved_tensors
            scale = q.shape[-1] ** -0.5
            dv = p.transpose(-1, -2) @ g
            dp = g @ v.transpose(-1, -2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            if not buggy:  # the bug: the 1/sqrt(d) scale forgotten in the score gradient
                ds = ds * scale
            return ds @ k, ds.transpose(-1, -2) @ q, dv

    return Attention


def build_attention(buggy: bool) -> Built:
    return _attention(buggy).apply, (
        _randn(2, 8, 16, seed=9),
        _randn(2, 8, 16, seed=10),
        _randn(2, 8, 16, seed=11),
    )


# ---------------------------------------------------------------- old-style banded: 1-D conv
def _banded_conv(buggy: bool) -> type[torch.autograd.Function]:
    class Conv1dSame(torch.autograd.Function):
        """y = conv1d(x, w) with 'same' padding; w a fixed 5-tap filter."""

        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(w)
            return F.conv1d(x, w, padding=w.shape[-1] // 2)

        @staticmethod
        def backward(ctx, g):
            (w,) = ctx.saved_tensors
            # Adjoint of a correlation is the correlation with the flipped kernel; the bug forgets the flip.
            kernel = w if buggy else w.flip(-1)
            return F.conv1d(g, kernel.transpose(0, 1), padding=w.shape[-1] // 2), None

    return Conv1dSame


def build_banded_conv(buggy: bool) -> Built:
    fn = _banded_conv(buggy).apply
    w = torch.tensor([[[0.1, -0.4, 1.0, 0.3, -0.2]]], dtype=torch.float64)
    return (lambda x: fn(x, w)), (_randn(2, 1, 400, seed=12),)


# ---------------------------------------------------------------- native layers
def build_gelu(buggy: bool) -> Built:
    return F.gelu, (_randn(1000, seed=13),)


def build_layer_norm(buggy: bool) -> Built:
    torch.manual_seed(14)
    layer = torch.nn.LayerNorm(64).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer, (_randn(8, 64, seed=15),)


def build_conv2d(buggy: bool) -> Built:
    return (lambda x, w: F.conv2d(x, w, padding=1)), (
        _randn(1, 4, 10, 10, seed=16),
        _randn(6, 4, 3, 3, seed=17),
    )


def build_mlp(buggy: bool) -> Built:
    def mlp(x, w1, w2):
        return torch.tanh(x @ w1) @ w2

    return mlp, (
        _randn(8, 32, seed=18),
        _randn(32, 32, seed=19, scale=0.2),
        _randn(32, 8, seed=20, scale=0.2),
    )


def build_attention_module(buggy: bool) -> Built:
    torch.manual_seed(21)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).double()

    def attend(x):
        return mha(x, x, x, need_weights=False)[0]

    return attend, (_randn(2, 16, 16, seed=22),)


def build_mha_params(buggy: bool) -> Built:
    """A module whose parameters are checked too (gradcheck sees them as extra inputs)."""
    torch.manual_seed(23)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).double()
    return _ModuleAsFunction(mha), (_randn(2, 6, 16, seed=24),)


class _ModuleAsFunction(torch.nn.Module):
    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


CASES: list[Case] = [
    Case("swish (old-style)", "elementwise", build_swish),
    Case("mish (new-style)", "elementwise", build_mish),
    Case("soft clip (old-style)", "smooth clipping", build_soft_clip),
    Case("soft threshold (new-style)", "soft threshold", build_soft_threshold),
    Case("sparsemax (old-style)", "row-wise", build_sparsemax),
    Case("logsumexp (new-style)", "row-wise", build_logsumexp),
    Case("bias-GeLU (old-style)", "fused linear+act", build_bias_gelu),
    Case("attention (old-style)", "custom attention", build_attention),
    Case("conv1d 'same' (old-style)", "banded", build_banded_conv),
    Case("F.gelu", "native", build_gelu, has_bug=False),
    Case("LayerNorm(64) + params", "native module", build_layer_norm, has_bug=False),
    Case("F.conv2d", "native", build_conv2d, has_bug=False),
    Case("MLP tanh(x W1) W2", "native", build_mlp, has_bug=False),
    Case("MultiheadAttention", "native", build_attention_module, has_bug=False),
    Case("MultiheadAttention + params", "native module", build_mha_params, has_bug=False),
]
