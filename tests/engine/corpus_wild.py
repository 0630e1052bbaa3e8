"""Custom autograd.Functions as they are written in well-known public code, with planted-bug twins.

corpus.py holds small textbook Functions; this module holds the plumbing and the numerically
careful tricks of published ones: entmax-1.5 by sort and entmax by bisection (deep-spin/entmax),
Mish, Swish with a trainable beta (EfficientNet's memory-efficient Swish), fairseq's GradMultiply,
Megatron's fused bias+GeLU (one gradient returned for both inputs, the bias's reduced by
autograd), RMSNorm and the Triton tutorial's LayerNorm backward, Megatron's cross-entropy with
label smoothing (an integer target), mmcv's sigmoid focal loss, flash-attention's rotary
embedding (cos/sin that need no gradient), smooth-L1 (a kink), log-sigmoid under
@once_differentiable, bilinear sampling at fractional points, the PyTorch docs' LinearFunction
(setup_context and ctx.needs_input_grad), a softmax that also returns its logsumexp (two
outputs) and a recomputing (checkpoint-like) Function whose backward runs autograd itself.

The math is the originals'; only the plumbing is adapted: every Function takes a ``bug`` name as
its last argument ("none" is the correct code). The bugs are the ones people make: 1% on one row
or element, a dropped term, a sign in one branch, a missing factor, the gradient of the wrong
input, a wrong reduction axis, grad_output ignored, a detach in the wrong place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["WILD_CASES", "WildCase", "make_wild_inputs"]


def _first_row(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` with its first row (first element along dim 0) scaled by ``factor``: a 1% slip."""
    scale = torch.ones(t.shape[0], *([1] * (t.dim() - 1)), dtype=t.dtype, device=t.device)
    scale[0] = factor
    return t * scale


def _one_element(t: torch.Tensor, factor: float) -> torch.Tensor:
    scale = torch.ones_like(t).reshape(-1)
    scale[scale.numel() // 2] = factor
    return t * scale.reshape(t.shape)


# --- entmax (deep-spin/entmax, activations.py) --------------------------------------------------


def _make_ix_like(x: torch.Tensor, dim: int) -> torch.Tensor:
    d = x.size(dim)
    rho = torch.arange(1, d + 1, device=x.device, dtype=x.dtype)
    view = [1] * x.dim()
    view[0] = -1
    return rho.view(view).transpose(0, dim)


def _entmax_threshold_and_support(x: torch.Tensor, dim: int) -> torch.Tensor:
    xsrt, _ = torch.sort(x, dim=dim, descending=True)
    rho = _make_ix_like(xsrt, dim)
    mean = xsrt.cumsum(dim) / rho
    mean_sq = (xsrt**2).cumsum(dim) / rho
    ss = rho * (mean_sq - mean**2)
    delta = (1 - ss) / rho
    delta_nz = torch.clamp(delta, 0)
    tau = mean - torch.sqrt(delta_nz)
    support_size = (tau <= xsrt).sum(dim).unsqueeze(dim)
    return tau.gather(dim, support_size - 1)


class Entmax15(torch.autograd.Function):
    """Exact entmax-1.5 by sort (old style: forward(ctx, ...)); ``dim`` a plain int."""

    @staticmethod
    def forward(ctx, x, dim, bug):
        ctx.dim, ctx.bug = dim, bug
        max_val, _ = x.max(dim=dim, keepdim=True)
        x = (x - max_val) / 2  # the original's stability shift, then / 2 for the actual entmax
        tau_star = _entmax_threshold_and_support(x, dim)
        y = torch.clamp(x - tau_star, min=0) ** 2
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if ctx.bug == "ignores_grad_output":
            dy = torch.ones_like(dy)
        gppr = y.sqrt()  # 1 / g''(y)
        dx = dy * gppr
        axis = 0 if ctx.bug == "wrong_axis" else ctx.dim
        q = dx.sum(axis) / gppr.sum(axis)
        dx = dx - q.unsqueeze(axis) * gppr
        if ctx.bug == "one_percent_row":
            dx = _first_row(dx, 1.01)
        return dx, None, None


class EntmaxBisect(torch.autograd.Function):
    """alpha-entmax by bisection (root_finding.py), alpha a tensor with its own gradient."""

    @staticmethod
    def _p(x, alpha):
        return torch.clamp(x, min=0) ** (1 / (alpha - 1))

    @staticmethod
    def forward(ctx, x, alpha, bug):
        dim, n_iter = -1, 50
        alpha_shape = list(x.shape)
        alpha_shape[dim] = 1
        alpha = alpha.expand(*alpha_shape)
        ctx.alpha, ctx.dim, ctx.bug = alpha, dim, bug
        d = x.shape[dim]
        x = x * (alpha - 1)
        max_val, _ = x.max(dim=dim, keepdim=True)
        tau_lo = max_val - 1  # _gp(1, alpha)
        tau_hi = max_val - (1 / d) ** (alpha - 1)
        f_lo = EntmaxBisect._p(x - tau_lo, alpha).sum(dim) - 1
        dm = tau_hi - tau_lo
        for _ in range(n_iter):
            dm = dm / 2
            tau_m = tau_lo + dm
            p_m = EntmaxBisect._p(x - tau_m, alpha)
            f_m = p_m.sum(dim) - 1
            mask = (f_m * f_lo >= 0).unsqueeze(dim)
            tau_lo = torch.where(mask, tau_m, tau_lo)
        p_m = p_m / p_m.sum(dim=dim).unsqueeze(dim=dim)  # ensure_sum_one
        ctx.save_for_backward(p_m)
        return p_m

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        alpha = ctx.alpha
        exponent = (alpha - 1) if ctx.bug == "wrong_exponent" else (2 - alpha)
        gppr = torch.where(y > 0, y**exponent, y.new_zeros(1))
        dx = dy * gppr
        q = dx.sum(ctx.dim) / gppr.sum(ctx.dim)
        dx = dx - q.unsqueeze(ctx.dim) * gppr
        if ctx.bug == "one_percent_element":
            dx = _one_element(dx, 1.01)
        d_alpha = None
        if ctx.needs_input_grad[1]:
            s = torch.where(y > 0, y * torch.log(y), y.new_zeros(1))
            ent = s.sum(ctx.dim).unsqueeze(ctx.dim)
            y_skewed = gppr / gppr.sum(ctx.dim).unsqueeze(ctx.dim)
            d_alpha = dy * (y - y_skewed) / ((alpha - 1) ** 2)
            entropy_term = dy * (s - y_skewed * ent) / (alpha - 1)
            d_alpha = d_alpha + entropy_term if ctx.bug == "alpha_sign" else d_alpha - entropy_term
            d_alpha = d_alpha.sum(ctx.dim).unsqueeze(ctx.dim)
        return dx, d_alpha, None


# --- activations ---------------------------------------------------------------------------------


class Mish(torch.autograd.Function):
    """x * tanh(softplus(x)), softplus with torch's threshold of 20 (the mish-cuda reference)."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x * torch.tanh(F.softplus(x))

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        sigmoid = torch.sigmoid(x)
        tanh_sp = torch.tanh(F.softplus(x))
        inner = F.softplus(x) if ctx.bug == "softplus_for_sigmoid" else sigmoid
        second = x * inner * (1 - tanh_sp * tanh_sp)
        if ctx.bug == "dropped_term":
            return grad_output * tanh_sp, None
        grad = grad_output * (tanh_sp + second)
        if ctx.bug == "one_percent_element":
            grad = _one_element(grad, 1.01)
        return grad, None


class BetaSwish(torch.autograd.Function):
    """x * sigmoid(beta * x) with a trainable scalar beta, new style (setup_context); the x
    gradient is EfficientNet's memory-efficient ``s * (1 + i * (1 - s))`` with beta inside."""

    @staticmethod
    def forward(x, beta, bug):
        return x * torch.sigmoid(beta * x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, beta, bug = inputs
        ctx.save_for_backward(x, beta)
        ctx.bug = bug

    @staticmethod
    def backward(ctx, grad_output):
        x, beta = ctx.saved_tensors
        s = torch.sigmoid(beta * x)
        gx = grad_output * (s * (1 + beta * x * (1 - s)))
        if ctx.bug == "sign_negative_branch":
            gx = torch.where(x < 0, grad_output * (s * (1 - beta * x * (1 - s))), gx)
        dbeta = x * x * s * (1 - s)
        if ctx.bug == "missing_factor":
            dbeta = x * s * (1 - s)
        gbeta = (grad_output * dbeta).sum().reshape(beta.shape)
        if ctx.bug == "wrong_input":
            gbeta = gx.sum().reshape(beta.shape)
        return gx, gbeta, None


class GradMultiply(torch.autograd.Function):
    """fairseq's GradMultiply (scale 1 is the identity's true gradient); a view of its input out.
    The "reversal" twin is DANN's ReverseLayerF, a deliberate mismatch a checker must report."""

    @staticmethod
    def forward(ctx, x, scale, bug):
        ctx.scale, ctx.bug = scale, bug
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.bug == "reversal":
            return grad.neg() * ctx.scale, None, None
        if ctx.bug == "ignores_grad_output":
            return torch.ones_like(grad) * ctx.scale, None, None
        return grad * ctx.scale, None, None


_K = 0.79788456  # Megatron's sqrt(2 / pi)


class BiasGelu(torch.autograd.Function):
    """Megatron's fused bias + tanh-GeLU: backward returns one tensor for input and bias alike,
    and autograd sums the bias's over the broadcast rows."""

    @staticmethod
    def forward(ctx, x, bias, bug):
        ctx.save_for_backward(x, bias)
        ctx.bug = bug
        y = bias + x
        return y * 0.5 * (1.0 + torch.tanh(_K * y * (1 + 0.044715 * y * y)))

    @staticmethod
    def backward(ctx, g):
        x, bias = ctx.saved_tensors
        y = bias + x
        tanh_out = torch.tanh(_K * y * (1 + 0.044715 * y * y))
        # sqrt(2/pi) * 3 * 0.044715 -> 0.1070322243; the twin forgot the 3
        c = 0.0356774081 if ctx.bug == "constant_without_3" else 0.1070322243
        ff = 0.5 * y * ((1 - tanh_out * tanh_out) * (_K + c * y * y)) + 0.5 * (1 + tanh_out)
        tmp = ff * g
        if ctx.bug == "one_percent_row":
            return _first_row(tmp, 1.01), tmp, None
        if ctx.bug == "bias_only_first_row":
            return tmp, tmp[0], None
        return tmp, tmp, None


class LogSigmoid(torch.autograd.Function):
    """Stable log-sigmoid, min(x, 0) - log1p(exp(-|x|)), backward under @once_differentiable."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.clamp(x, max=0) - torch.log1p(torch.exp(-x.abs()))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x) if ctx.bug == "sign" else torch.sigmoid(-x)
        out = grad * s
        if ctx.bug == "one_percent_element":
            out = _one_element(out, 1.01)
        return out, None


# --- normalisations ------------------------------------------------------------------------------


class RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last axis (the fused-kernel references)."""

    @staticmethod
    def forward(ctx, x, w, eps, bug):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
        ctx.save_for_backward(x, w, rstd)
        ctx.bug = bug
        return xhat * w

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        xhat = x * rstd
        wdy = dy * w
        axis = 0 if ctx.bug == "wrong_axis" else -1
        c1 = (xhat * wdy).mean(axis, keepdim=True)
        if ctx.bug == "dropped_term":
            c1 = torch.zeros_like(c1)
        dx = (wdy - xhat * c1) * rstd
        dw = (dy * (x if ctx.bug == "missing_factor" else xhat)).sum(0)
        return dx, dw, None, None


class TritonLayerNorm(torch.autograd.Function):
    """LayerNorm with the Triton tutorial's backward: dx = (wdy - (xhat * c1 + c2)) * rstd."""

    @staticmethod
    def forward(ctx, x, w, b, eps, bug):
        mean = x.mean(-1, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(-1, keepdim=True)
        rstd = 1 / torch.sqrt(var + eps)
        y = xc * rstd * w + b
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        n = x.shape[-1]
        xhat = (x - mean) * rstd
        wdy = w * dy
        c1 = (xhat * wdy).sum(-1, keepdim=True) / n
        c2 = wdy.sum(-1, keepdim=True) / n
        if ctx.bug == "dropped_term":
            c2 = torch.zeros_like(c2)
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if ctx.bug == "one_percent_row":
            dx = _first_row(dx, 1.01)
        dw = (dy * xhat).sum(0)
        db = (dy * w).sum(0) if ctx.bug == "wrong_input" else dy.sum(0)
        return dx, dw, db, None, None


# --- losses --------------------------------------------------------------------------------------


class VocabCrossEntropy(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy on one partition, with label smoothing: per-token
    losses from logits and an integer target."""

    @staticmethod
    def forward(ctx, logits, target, label_smoothing, bug):
        logits_max = logits.max(dim=-1)[0]
        logits = logits - logits_max.unsqueeze(-1)
        rows = torch.arange(logits.shape[0], device=logits.device)
        predicted = logits[rows, target]
        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(-1)
        loss = torch.log(sum_exp) - predicted
        softmax = exp_logits / sum_exp.unsqueeze(-1)
        vocab = logits.shape[-1]
        if label_smoothing > 0:
            smoothing = label_smoothing * vocab / (vocab - 1)
            log_probs = torch.log(softmax)
            mean_log_probs = log_probs.mean(dim=-1)
            loss = (1.0 - smoothing) * loss - smoothing * mean_log_probs
        ctx.label_smoothing, ctx.vocab, ctx.bug = label_smoothing, vocab, bug
        ctx.save_for_backward(softmax, target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        smoothing = ctx.label_smoothing * ctx.vocab / (ctx.vocab - 1)
        update = (1.0 - smoothing) if ctx.label_smoothing > 0 else 1.0
        if ctx.bug == "sign":
            grad[rows, target] += update
        else:
            grad[rows, target] -= update
        if ctx.label_smoothing > 0 and ctx.bug != "dropped_term":
            grad -= smoothing / ctx.vocab
        if ctx.bug != "ignores_grad_output":
            grad = grad * grad_output.unsqueeze(-1)
        return grad, None, None, None


class SigmoidFocalLoss(torch.autograd.Function):
    """mmcv's sigmoid focal loss kernels, vectorised: per-element losses, an integer target."""

    @staticmethod
    def forward(ctx, x, target, gamma, alpha, bug):
        ctx.save_for_backward(x, target)
        ctx.gamma, ctx.alpha, ctx.bug = gamma, alpha, bug
        cls = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        flag_p = (target.unsqueeze(1) == cls).to(x.dtype)
        flag_n = 1 - flag_p
        p = 1.0 / (1.0 + torch.exp(-x))
        tiny = torch.finfo(torch.float32).tiny  # the kernel's FLT_MIN
        term_p = (1.0 - p) ** gamma * torch.log(torch.clamp(p, min=tiny))
        term_n = p**gamma * torch.log(torch.clamp(1.0 - p, min=tiny))
        return -flag_p * alpha * term_p - flag_n * (1.0 - alpha) * term_n

    @staticmethod
    def backward(ctx, grad_output):
        x, target = ctx.saved_tensors
        gamma, alpha = ctx.gamma, ctx.alpha
        cls = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        flag_p = (target.unsqueeze(1) == cls).to(x.dtype)
        flag_n = 1 - flag_p
        p = 1.0 / (1.0 + torch.exp(-x))
        tiny = torch.finfo(torch.float32).tiny
        g_p = 1.0 if ctx.bug == "missing_factor" else gamma
        term_p = (1.0 - p) ** gamma * (1.0 - p - g_p * p * torch.log(torch.clamp(p, min=tiny)))
        term_n = p**gamma * (gamma * (1.0 - p) * torch.log(torch.clamp(1.0 - p, min=tiny)) - p)
        sign_n = 1.0 if ctx.bug == "sign_one_branch" else -1.0
        grad = -flag_p * alpha * term_p + sign_n * flag_n * (1.0 - alpha) * term_n
        grad = grad * grad_output
        if ctx.bug == "one_percent_element":
            grad = _one_element(grad, 1.01)
        return grad, None, None, None, None


class SmoothL1(torch.autograd.Function):
    """Huber / smooth-L1 with beta (detectron's formula), both input and target differentiable."""

    @staticmethod
    def forward(ctx, x, target, beta, bug):
        diff = x - target
        n = diff.abs()
        ctx.save_for_backward(diff)
        ctx.beta, ctx.bug = beta, bug
        return torch.where(n < beta, 0.5 * n * n / beta, n - 0.5 * beta)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        beta = ctx.beta
        quad = diff if ctx.bug == "missing_factor" else diff / beta
        linear = torch.sign(diff)
        if ctx.bug == "sign_one_branch":
            linear = torch.where(diff < 0, -linear, linear)
        gx = grad * torch.where(diff.abs() < beta, quad, linear)
        gt = gx if ctx.bug == "target_sign" else -gx
        return gx, gt, None, None


# --- geometry ------------------------------------------------------------------------------------


class RotaryEmbedding(torch.autograd.Function):
    """flash-attention's ApplyRotaryEmb (non-interleaved): the backward is the conjugate rotation."""

    @staticmethod
    def _rotate(x, cos, sin, conjugate):
        ro_dim = cos.shape[-1] * 2
        x_ro = x[..., :ro_dim]
        x1, x2 = x_ro.chunk(2, dim=-1)
        c = cos[:, None, :]  # (seqlen, 1, rotary_dim / 2) over (batch, seqlen, heads, dim)
        s = sin[:, None, :]
        if conjugate:
            s = -s
        o1 = x1 * c - x2 * s
        o2 = x1 * s + x2 * c
        return torch.cat([o1, o2, x[..., ro_dim:]], dim=-1)

    @staticmethod
    def forward(ctx, x, cos, sin, bug):
        ctx.save_for_backward(cos, sin)
        ctx.bug = bug
        return RotaryEmbedding._rotate(x, cos, sin, conjugate=False)

    @staticmethod
    def backward(ctx, do):
        cos, sin = ctx.saved_tensors
        if ctx.bug == "swapped_halves":
            ro = cos.shape[-1] * 2
            d1, d2 = do[..., :ro].chunk(2, dim=-1)
            do = torch.cat([d2, d1, do[..., ro:]], dim=-1)
        dx = RotaryEmbedding._rotate(do, cos, sin, conjugate=ctx.bug != "not_conjugate")
        return dx, None, None, None


class BilinearSample(torch.autograd.Function):
    """Bilinear sampling of a (C, H, W) map at fractional (y, x) points, the gradient of both the
    map (scattered with index_add_) and the points (the corner differences)."""

    @staticmethod
    def _corners(img, pts):
        _, h, w = img.shape
        y = pts[:, 0].clamp(0, h - 1.000001)
        x = pts[:, 1].clamp(0, w - 1.000001)
        y0, x0 = y.floor().long(), x.floor().long()
        wy, wx = y - y0.to(y.dtype), x - x0.to(x.dtype)
        return y0, x0, wy, wx

    @staticmethod
    def forward(ctx, img, pts, bug):
        y0, x0, wy, wx = BilinearSample._corners(img, pts)
        v00, v01 = img[:, y0, x0], img[:, y0, x0 + 1]
        v10, v11 = img[:, y0 + 1, x0], img[:, y0 + 1, x0 + 1]
        out = (1 - wy) * ((1 - wx) * v00 + wx * v01) + wy * ((1 - wx) * v10 + wx * v11)
        ctx.save_for_backward(img, pts)
        ctx.bug = bug
        return out.T  # (points, channels)

    @staticmethod
    def backward(ctx, grad):
        img, pts = ctx.saved_tensors
        g = grad.T  # (channels, points)
        c, h, w = img.shape
        y0, x0, wy, wx = BilinearSample._corners(img, pts)
        v00, v01 = img[:, y0, x0], img[:, y0, x0 + 1]
        v10, v11 = img[:, y0 + 1, x0], img[:, y0 + 1, x0 + 1]
        flat = torch.zeros(c, h * w, dtype=img.dtype, device=img.device)
        corners = (
            (y0, x0, (1 - wy) * (1 - wx)),
            (y0, x0 + 1, (1 - wy) * wx),
            (y0 + 1, x0, wy * (1 - wx)),
            (y0 + 1, x0 + 1, wy * wx),
        )
        for yy, xx, weight in corners:
            if ctx.bug == "wrong_corner" and xx is not x0:
                xx = x0
            flat.index_add_(1, yy * w + xx, g * weight)
        dwy = (1 - wx) * (v10 - v00) + wx * (v11 - v01)
        dwx = (1 - wy) * (v01 - v00) + wy * (v11 - v10)
        if ctx.bug == "swapped_coordinates":
            dwy, dwx = dwx, dwy
        gpts = torch.stack([(g * dwy).sum(0), (g * dwx).sum(0)], dim=1)
        return flat.reshape(c, h, w), gpts, None


# --- linear algebra and plumbing -----------------------------------------------------------------


class LinearFunction(torch.autograd.Function):
    """The PyTorch docs' LinearFunction: setup_context and ctx.needs_input_grad, optional bias."""

    @staticmethod
    def forward(x, weight, bias, bug):
        output = x.mm(weight.t())
        if bias is not None:
            output += bias.unsqueeze(0).expand_as(output)
        return output

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, bug = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.bug = bug

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.mm(weight)
        weight_flag = 0 if ctx.bug == "needs_grad_index" else 1
        if ctx.needs_input_grad[weight_flag]:
            grad_weight = x.t().mm(grad_output) if ctx.bug == "transposed" else grad_output.t().mm(x)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_output.mean(0) if ctx.bug == "mean_for_sum" else grad_output.sum(0)
        return grad_input, grad_weight, grad_bias, None


class SoftmaxWithLse(torch.autograd.Function):
    """Row softmax that also returns its logsumexp (as attention kernels do): two outputs."""

    @staticmethod
    def forward(ctx, x, bug):
        lse = torch.logsumexp(x, dim=-1)
        y = torch.exp(x - lse.unsqueeze(-1))
        ctx.save_for_backward(y)
        ctx.bug = bug
        return y, lse

    @staticmethod
    def backward(ctx, gy, glse):
        (y,) = ctx.saved_tensors
        dot = (gy * y).sum(-1, keepdim=True)
        gx = y * (gy - dot)
        if ctx.bug != "ignores_second_output":
            gx = gx + glse.unsqueeze(-1) * y
        if ctx.bug == "one_percent_row":
            gx = _first_row(gx, 1.01)
        return gx, None


class RecomputeGatedTanh(torch.autograd.Function):
    """A checkpoint-like Function: forward without a graph, backward recomputes under
    enable_grad and calls autograd.grad (f = x * tanh(x @ w))."""

    @staticmethod
    def _f(x, w, bug):
        gate = torch.tanh(x @ w)
        return (x.detach() if bug == "detach" else x) * gate

    @staticmethod
    def forward(ctx, x, w, bug):
        ctx.save_for_backward(x, w)
        ctx.bug = bug
        with torch.no_grad():
            return RecomputeGatedTanh._f(x, w, "none")

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            x_ = x.detach().requires_grad_()
            w_ = w.detach().requires_grad_()
            out = RecomputeGatedTanh._f(x_, w_, ctx.bug)
            gx, gw = torch.autograd.grad(out, (x_, w_), grad)
        if ctx.bug == "one_percent_row":
            gw = _first_row(gw, 1.01)
        return gx, gw, None


# --- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WildCase:
    name: str
    fn: Callable[..., object]  # fn(*inputs, bug)
    inputs: Callable[[torch.Generator, tuple[int, int]], tuple[torch.Tensor, ...]]  # float64 / long
    bugs: tuple[str, ...]
    # which inputs require grad; None: none set, so the checker takes every floating input
    grad: tuple[bool, ...] | None = None

    def bound(self, bug: str = "none") -> Callable[..., object]:
        fn = self.fn

        def call(*inputs: torch.Tensor) -> object:
            return fn(*inputs, bug)

        call.__name__ = call.__qualname__ = self.name if bug == "none" else f"{self.name}[{bug}]"
        return call


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _uniform(g: torch.Generator, *shape: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)


def _rotary_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    seqlen, dim = s[0], 2 * ((s[1] + 1) // 2) + 2  # two channels past the rotary part
    rot = dim - 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angles = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return (_randn(g, 2, seqlen, 2, dim), torch.cos(angles), torch.sin(angles))


def _bilinear_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    h, w = s[0], s[1]
    pts = torch.stack(
        [_uniform(g, s[0], low=0.1, high=h - 1.1), _uniform(g, s[0], low=0.1, high=w - 1.1)], dim=1
    )
    # keep the points off the integer grid, where the map is not differentiable
    frac = pts - pts.floor()
    pts = pts.floor() + frac.clamp(0.05, 0.95)
    return (_randn(g, 3, h, w), pts)


def _targets(g: torch.Generator, rows: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (rows,), generator=g)


def _entmax_bisect(x, alpha, bug):
    return EntmaxBisect.apply(x, alpha, bug)


WILD_CASES: tuple[WildCase, ...] = (
    WildCase(
        "entmax15",
        lambda x, bug: Entmax15.apply(x, -1, bug),
        lambda g, s: (_randn(g, *s, scale=2.0),),
        ("one_percent_row", "wrong_axis", "ignores_grad_output"),
    ),
    WildCase(
        "entmax_bisect",
        _entmax_bisect,
        lambda g, s: (_randn(g, *s, scale=2.0), torch.tensor(1.3, dtype=torch.float64)),
        ("wrong_exponent", "one_percent_element", "alpha_sign"),
    ),
    WildCase(
        "mish",
        Mish.apply,
        lambda g, s: (_randn(g, *s, scale=3.0),),
        ("softplus_for_sigmoid", "dropped_term", "one_percent_element"),
    ),
    WildCase(
        "beta_swish",
        BetaSwish.apply,
        lambda g, s: (_randn(g, *s, scale=3.0), torch.tensor([1.2], dtype=torch.float64)),
        ("sign_negative_branch", "missing_factor", "wrong_input"),
    ),
    WildCase(
        "grad_multiply",
        lambda x, bug: GradMultiply.apply(x, 1.0, bug),
        lambda g, s: (_randn(g, *s),),
        ("reversal", "ignores_grad_output"),
    ),
    WildCase(
        "bias_gelu",
        BiasGelu.apply,
        lambda g, s: (_randn(g, *s, scale=2.0), _randn(g, s[1])),
        ("constant_without_3", "one_percent_row", "bias_only_first_row"),
    ),
    WildCase(
        "log_sigmoid",
        LogSigmoid.apply,
        lambda g, s: (_randn(g, *s, scale=4.0),),
        ("sign", "one_percent_element"),
    ),
    WildCase(
        "rms_norm",
        lambda x, w, bug: RMSNorm.apply(x, w, 1e-6, bug),
        lambda g, s: (_randn(g, *s, scale=2.0), 1 + _randn(g, s[1], scale=0.1)),
        ("wrong_axis", "dropped_term", "missing_factor"),
    ),
    WildCase(
        "triton_layer_norm",
        lambda x, w, b, bug: TritonLayerNorm.apply(x, w, b, 1e-5, bug),
        lambda g, s: (_randn(g, *s, scale=2.0) + 0.5, 1 + _randn(g, s[1], scale=0.1), _randn(g, s[1])),
        ("dropped_term", "one_percent_row", "wrong_input"),
    ),
    WildCase(
        "vocab_cross_entropy",
        lambda logits, target, bug: VocabCrossEntropy.apply(logits, target, 0.1, bug),
        lambda g, s: (_randn(g, *s, scale=3.0), _targets(g, s[0], s[1])),
        ("ignores_grad_output", "dropped_term", "sign"),
    ),
    WildCase(
        "sigmoid_focal_loss",
        lambda x, target, bug: SigmoidFocalLoss.apply(x, target, 2.0, 0.25, bug),
        lambda g, s: (_randn(g, *s, scale=2.0), _targets(g, s[0], s[1])),
        ("missing_factor", "sign_one_branch", "one_percent_element"),
    ),
    WildCase(
        "smooth_l1",
        lambda x, t, bug: SmoothL1.apply(x, t, 0.5, bug),
        lambda g, s: (_randn(g, *s), _randn(g, *s)),
        ("missing_factor", "sign_one_branch", "target_sign"),
    ),
    WildCase(
        "rotary",
        RotaryEmbedding.apply,
        _rotary_inputs,
        ("not_conjugate", "swapped_halves"),
        grad=(True, False, False),
    ),
    WildCase(
        "bilinear_sample",
        BilinearSample.apply,
        _bilinear_inputs,
        ("wrong_corner", "swapped_coordinates"),
    ),
    WildCase(
        "linear_function",
        LinearFunction.apply,
        lambda g, s: (_randn(g, *s), _randn(g, s[1], s[1], scale=1 / math.sqrt(s[1])), _randn(g, s[1])),
        ("needs_grad_index", "transposed", "mean_for_sum"),
        grad=(False, True, True),
    ),
    WildCase(
        "softmax_with_lse",
        SoftmaxWithLse.apply,
        lambda g, s: (_randn(g, *s, scale=2.0),),
        ("ignores_second_output", "one_percent_row"),
    ),
    WildCase(
        "recompute_gated_tanh",
        RecomputeGatedTanh.apply,
        lambda g, s: (_randn(g, *s), _randn(g, s[1], s[1], scale=1 / math.sqrt(s[1]))),
        ("detach", "one_percent_row"),
    ),
)


_COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64}


def make_wild_inputs(
    case: WildCase, seed: int, dtype: torch.dtype, shape: tuple[int, int] = (6, 5)
) -> tuple[torch.Tensor, ...]:
    """The case's inputs for ``seed``: floating ones drawn in float64 and rounded to ``dtype``
    (complex ones to its complex dtype), integer and boolean ones as drawn; ``requires_grad``
    set where the case says."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(case.inputs(g, shape)):
        if t.is_floating_point() or t.is_complex():
            t = t.to(dtype if t.is_floating_point() else _COMPLEX[dtype])
            if case.grad is not None:
                t.requires_grad_(case.grad[i])
        out.append(t)
    return tuple(out)
