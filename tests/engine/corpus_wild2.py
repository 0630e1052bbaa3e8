"""Custom autograd.Functions modelled on public code, a second batch, with planted-bug twins.

corpus_wild.py holds the first batch and the plumbing (``WildCase``, ``make_wild_inputs``). Here:
sparsemax (the sort-and-threshold version most ports share), soft-DTW with the E-matrix backward
of the numba/CUDA ports, the old fused GRU cell backward, a depthwise conv1d by unfold, GroupNorm
and weight standardisation with their closed-form backwards, a memory-efficient causal attention
that recomputes its probabilities from the saved logsumexp, logsumexp with the max trick, a mean
Charbonnier loss with a broadcast target, a Chamfer distance that also returns its integer
nearest-neighbour indices (mark_non_differentiable), interp1d, a complex multiply (conjugate
Wirtinger gradients), an in-place ELU under mark_dirty, a polar transform under
set_materialize_grads(False), a sort that returns its permutation, a FlowNet-style correlation
(cost volume) layer and a Gumbel-softmax with its noise as an input.

As in the first batch, every Function takes a ``bug`` name last ("none" is the correct code). The
bugs are the kinds real ones take: a wrong sign, a dropped term, a transposed or shifted index, a
wrong reduction axis, a factor off, the wrong saved tensor, an error at the border or in one row
only, an error only for a non-contiguous input, and one only when needs_input_grad is partly False.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from corpus_wild import WildCase, _first_row, _one_element, _randn, _uniform

__all__ = ["WILD_CASES_2"]


# --- sparse normalisers --------------------------------------------------------------------------


class Sparsemax(torch.autograd.Function):
    """Sparsemax over the last axis: sort, cumulative sum, threshold tau; the backward projects
    the cotangent onto the support (mean removed over the support only)."""

    @staticmethod
    def forward(ctx, x, bug):
        x = x - x.max(dim=-1, keepdim=True).values
        zs = torch.sort(x, dim=-1, descending=True).values
        rng = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
        is_gt = (1 + rng * zs > zs.cumsum(-1)).to(x.dtype)
        k = (is_gt * rng).max(dim=-1, keepdim=True).values
        tau = ((is_gt * zs).sum(-1, keepdim=True) - 1) / k
        out = torch.clamp(x - tau, min=0)
        ctx.save_for_backward(out)
        ctx.bug = bug
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        support = (out != 0).to(grad.dtype)
        k = support.sum(-1, keepdim=True)
        if ctx.bug == "count_off_by_one":
            k = k + 1
        masked = grad if ctx.bug == "unmasked_sum" else grad * support
        v_hat = masked.sum(-1, keepdim=True) / k
        gx = support * (grad - v_hat)
        if ctx.bug == "one_percent_row":
            gx = _first_row(gx, 1.01)
        return gx, None


class GumbelSoftmax(torch.autograd.Function):
    """The soft Gumbel-softmax, softmax((logits + g) / tau), with the Gumbel noise g an input
    that needs no gradient (drawn outside, so the check sees a deterministic function)."""

    @staticmethod
    def forward(ctx, logits, noise, tau, bug):
        y = torch.softmax((logits + noise) / tau, dim=-1)
        ctx.save_for_backward(y)
        ctx.tau, ctx.bug = tau, bug
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        tau = 1.0 if ctx.bug == "missing_tau" else ctx.tau
        dot = (gy * y).sum(-1, keepdim=True)
        if ctx.bug == "dot_over_wrong_axis":
            dot = (gy * y).sum(0, keepdim=True)
        return y * (gy - dot) / tau, None, None, None


# --- sequences -----------------------------------------------------------------------------------


class SoftDTW(torch.autograd.Function):
    """Soft-DTW of a cost matrix D (N, M) with smoothing gamma: the forward recursion over R with
    a soft minimum, the backward recursion over E (the numba port's), Python loops over cells."""

    @staticmethod
    def forward(ctx, D, gamma, bug):
        n, m = D.shape
        inf = torch.tensor(math.inf, dtype=D.dtype, device=D.device)
        R = [[inf] * (m + 2) for _ in range(n + 2)]
        R[0][0] = torch.zeros((), dtype=D.dtype, device=D.device)
        for i in range(1, n + 1):
            for j in range(1, m + 1):
                r = -torch.stack([R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]]) / gamma
                R[i][j] = D[i - 1, j - 1] - gamma * torch.logsumexp(r, dim=0)
        ctx.save_for_backward(D, torch.stack([torch.stack(row) for row in R]))
        ctx.gamma, ctx.bug = gamma, bug
        return R[n][m]

    @staticmethod
    def backward(ctx, grad):
        D, R = ctx.saved_tensors
        gamma, bug = ctx.gamma, ctx.bug
        n, m = D.shape
        Dp = F.pad(D, (1, 1, 1, 1))
        R = R.clone()
        R[:, m + 1] = -math.inf
        R[n + 1, :] = -math.inf
        R[n + 1, m + 1] = R[n, m]
        E = torch.zeros_like(R)
        E[n + 1, m + 1] = 1
        for j in range(m, 0, -1):
            for i in range(n, 0, -1):
                d_down = Dp[i, j + 1] if bug == "transposed_neighbour" else Dp[i + 1, j]
                a = torch.exp((R[i + 1, j] - R[i, j] - d_down) / gamma)
                b_scale = 1.0 if bug == "gamma_in_one_term" else gamma
                b = torch.exp((R[i, j + 1] - R[i, j] - Dp[i, j + 1]) / b_scale)
                c = torch.exp((R[i + 1, j + 1] - R[i, j] - Dp[i + 1, j + 1]) / gamma)
                E[i, j] = E[i + 1, j] * a + E[i, j + 1] * b + E[i + 1, j + 1] * c
        return grad * E[1 : n + 1, 1 : m + 1], None, None


class FusedGRUCell(torch.autograd.Function):
    """The pointwise part of a GRU cell fused into one Function (the old THNN GRUFused): gate
    pre-activations from the input and from the hidden state, and hx, give hy."""

    @staticmethod
    def forward(ctx, input_gate, hidden_gate, hx, bug):
        ir, ii, in_ = input_gate.chunk(3, 1)
        hr, hi, hn = hidden_gate.chunk(3, 1)
        resetgate = torch.sigmoid(ir + hr)
        inputgate = torch.sigmoid(ii + hi)
        newgate = torch.tanh(in_ + resetgate * hn)
        hy = newgate + inputgate * (hx - newgate)
        ctx.save_for_backward(hx, hn, resetgate, inputgate, newgate)
        ctx.bug = bug
        return hy

    @staticmethod
    def backward(ctx, gh):
        hx, hn, resetgate, inputgate, newgate = ctx.saved_tensors
        bug = ctx.bug
        d_hx = gh * (1 - inputgate) if bug == "hx_one_minus" else gh * inputgate
        d_input = gh * (hx - newgate) * inputgate * (1 - inputgate)
        d_new = gh * (1 - inputgate) * (1 - newgate * newgate)
        d_reset = d_new * hn * resetgate * (1 - resetgate)
        grad_input = torch.cat([d_reset, d_input, d_new], 1)
        hidden_new = d_new if bug == "hidden_new_without_reset" else d_new * resetgate
        parts = [d_input, d_reset, hidden_new] if bug == "gate_order" else [d_reset, d_input, hidden_new]
        return grad_input, torch.cat(parts, 1), d_hx, None


# --- convolution and normalisation --------------------------------------------------------------


class DepthwiseConv1d(torch.autograd.Function):
    """Depthwise conv1d by unfold, 'same' zero padding: x (B, C, L), weight (C, K) with K odd."""

    @staticmethod
    def forward(ctx, x, w, bug):
        k = w.shape[1]
        p = k // 2
        cols = F.pad(x, (p, p)).unfold(2, k, 1)  # (B, C, L, K)
        ctx.save_for_backward(x, w)
        ctx.bug = bug
        return (cols * w[None, :, None, :]).sum(-1)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        bug = ctx.bug
        length, k = x.shape[2], w.shape[1]
        p = k // 2
        cols = F.pad(x, (p, p)).unfold(2, k, 1)
        gw = (cols * gy[..., None]).sum((0, 2))
        if bug == "first_batch_only":
            gw = (cols[:1] * gy[:1, ..., None]).sum((0, 2))
        gxp = torch.zeros(x.shape[0], x.shape[1], length + 2 * p, dtype=x.dtype, device=x.device)
        for j in range(k):
            tap = k - 1 - j if bug == "flipped_kernel" else j
            gxp[:, :, j : j + length] += gy * w[None, :, tap, None]
        start = 0 if bug == "padding_offset" else p
        return gxp[:, :, start : start + length], gw, None


class GroupNorm(torch.autograd.Function):
    """GroupNorm over (N, C, L) with per-channel weight and bias, closed-form backward. The
    weight is frozen here (needs_input_grad partly False)."""

    @staticmethod
    def forward(ctx, x, w, b, groups, eps, bug):
        n, c, length = x.shape
        xg = x.reshape(n, groups, -1)
        mean = xg.mean(-1, keepdim=True)
        rstd = torch.rsqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)
        xhat = ((xg - mean) * rstd).reshape(n, c, length)
        ctx.save_for_backward(xhat, w, rstd)
        ctx.groups, ctx.bug = groups, bug
        return xhat * w[:, None] + b[:, None]

    @staticmethod
    def backward(ctx, gy):
        xhat, w, rstd = ctx.saved_tensors
        bug, groups = ctx.bug, ctx.groups
        n, c, length = xhat.shape
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            dxhat = gy * w[:, None]
            if bug == "per_channel_stats":
                dg, xg = dxhat, xhat
                m1 = dg.mean(-1, keepdim=True)
                m2 = (dg * xg).mean(-1, keepdim=True)
                gx = (dg - m1 - xg * m2).reshape(n, groups, -1) * rstd
            else:
                dg, xg = dxhat.reshape(n, groups, -1), xhat.reshape(n, groups, -1)
                m1 = dg.mean(-1, keepdim=True)
                if bug == "dropped_mean":
                    m1 = torch.zeros_like(m1)
                m2 = (dg * xg).mean(-1, keepdim=True)
                gx = (dg - m1 - xg * m2) * rstd
            gx = gx.reshape(n, c, length)
        if ctx.needs_input_grad[1]:
            gw = (gy * xhat).sum((0, 2))
            if bug == "bias_inside_weight_branch":
                gb = gy.sum((0, 2))
        if ctx.needs_input_grad[2] and bug != "bias_inside_weight_branch":
            gb = gy.sum((0, 2))
        return gx, gw, gb, None, None, None


class WeightStandardization(torch.autograd.Function):
    """Weight standardisation of a conv weight (out, in * k * k) per output row, with the
    unbiased std and eps added to it (the WS paper's code). The weight arrives as a transposed
    view (non-contiguous), as a weight shared with a transposed layer does."""

    @staticmethod
    def forward(ctx, w, eps, bug):
        mean = w.mean(1, keepdim=True)
        c = w - mean
        s = c.pow(2).sum(1, keepdim=True).div(w.shape[1] - 1).sqrt()
        ctx.save_for_backward(w, s)
        ctx.eps, ctx.bug = eps, bug
        return c / (s + eps)

    @staticmethod
    def backward(ctx, g):
        w, s = ctx.saved_tensors
        bug = ctx.bug
        if bug == "assumes_contiguous":  # reads the storage as if the weight were row-major
            w = w.as_strided(w.shape, (w.shape[1], 1))
        n = w.shape[1]
        c = w - w.mean(1, keepdim=True)
        d = s + ctx.eps
        gc = g / d
        gd = -(g * c).sum(1, keepdim=True) / (d * d)
        dof = n if bug == "biased_in_backward" else n - 1
        centred = gc if bug == "dropped_mean" else gc - gc.mean(1, keepdim=True)
        return centred + gd * c / (dof * s), None, None


# --- attention -----------------------------------------------------------------------------------


class RecomputeAttention(torch.autograd.Function):
    """Single-head attention with a boolean mask, saving q, k, v, the output and the rows'
    logsumexp only: the backward recomputes P = exp(S - lse) (flash-attention's reference)."""

    @staticmethod
    def _scores(q, k, mask, scale):
        return (q @ k.T * scale).masked_fill(~mask, -math.inf)

    @staticmethod
    def forward(ctx, q, k, v, mask, bug):
        scale = 1 / math.sqrt(q.shape[-1])
        s = RecomputeAttention._scores(q, k, mask, scale)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        out = torch.exp(s - lse) @ v
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale, ctx.bug = scale, bug
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask, out, lse = ctx.saved_tensors
        scale, bug = ctx.scale, ctx.bug
        keep = torch.ones_like(mask) if bug == "mask_not_reapplied" else mask
        p = torch.exp(RecomputeAttention._scores(q, k, keep, scale) - lse)
        dv = p.T @ do
        dp = do @ v.T
        delta = dp.sum(-1, keepdim=True) if bug == "delta_without_p" else (do * out).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq = ds @ k * scale
        dk = ds.T @ q * (1.0 if bug == "missing_scale_dk" else scale)
        return dq, dk, dv, None, None


class LogSumExp(torch.autograd.Function):
    """logsumexp over the last axis with the max trick; backward g * exp(x - y)."""

    @staticmethod
    def forward(ctx, x, bug):
        m = x.max(dim=-1, keepdim=True).values
        y = m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))
        ctx.save_for_backward(x, y, m)
        ctx.bug = bug
        return y.squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        x, y, m = ctx.saved_tensors
        shift = m if ctx.bug == "max_for_lse" else y  # exp(x - m): unnormalised
        gx = g.unsqueeze(-1) * torch.exp(x - shift)
        if ctx.bug == "one_percent_element":
            gx = _one_element(gx, 1.01)
        return gx, None


# --- losses --------------------------------------------------------------------------------------


class CharbonnierLoss(torch.autograd.Function):
    """mean(sqrt((x - t)^2 + eps^2)) with the target t broadcast over rows (one per column)."""

    @staticmethod
    def forward(ctx, x, t, eps, bug):
        diff = x - t
        ctx.save_for_backward(diff)
        ctx.eps, ctx.bug = eps, bug
        return torch.sqrt(diff * diff + eps * eps).mean()

    @staticmethod
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        eps, bug = ctx.eps, ctx.bug
        e2 = eps if bug == "eps_not_squared" else eps * eps
        gx = g * diff / torch.sqrt(diff * diff + e2) / diff.numel()
        gt = -gx.mean(0) if bug == "target_mean_for_sum" else -gx.sum(0)
        return gx, gt, None, None


class ChamferDistance(torch.autograd.Function):
    """Chamfer distance between point sets p1 (N, 3) and p2 (M, 3): squared distances to the
    nearest neighbour each way, and the neighbours' indices (non-differentiable outputs)."""

    @staticmethod
    def forward(ctx, p1, p2, bug):
        d = (p1[:, None, :] - p2[None, :, :]).pow(2).sum(-1)
        dist1, idx1 = d.min(1)
        dist2, idx2 = d.min(0)
        ctx.save_for_backward(p1, p2, idx1, idx2)
        ctx.mark_non_differentiable(idx1, idx2)
        ctx.bug = bug
        return dist1, dist2, idx1, idx2

    @staticmethod
    def backward(ctx, gd1, gd2, _gi1, _gi2):
        p1, p2, idx1, idx2 = ctx.saved_tensors
        bug = ctx.bug
        two = 1.0 if bug == "missing_factor_two" else 2.0
        d1 = two * gd1[:, None] * (p1 - p2[idx1])
        d2 = two * gd2[:, None] * (p2 - p1[idx2])
        g1 = d1.clone()
        if bug != "dropped_second_term":
            g1.index_add_(0, idx2, -d2)
        g2 = d2.clone()
        if bug == "assign_not_add":  # duplicate neighbours overwrite each other
            g2[idx1] = g2[idx1] - d1
        else:
            g2.index_add_(0, idx1, -d1)
        return g1, g2, None


# --- interpolation and geometry ------------------------------------------------------------------


class Interp1d(torch.autograd.Function):
    """Linear interpolation of (x, y) at xnew (torchinterp1d), gradients for y and xnew; the
    knots x are fixed."""

    @staticmethod
    def forward(ctx, x, y, xnew, bug):
        idx = (torch.searchsorted(x, xnew) - 1).clamp(0, x.numel() - 2)
        x0, x1 = x[idx], x[idx + 1]
        slope = (y[idx + 1] - y[idx]) / (x1 - x0)
        ctx.save_for_backward(x, xnew, idx, slope)
        ctx.bug = bug
        return y[idx] + slope * (xnew - x0)

    @staticmethod
    def backward(ctx, g):
        x, xnew, idx, slope = ctx.saved_tensors
        bug = ctx.bug
        x0, x1 = x[idx], x[idx + 1]
        w1 = (xnew - x0) / (x1 - x0)
        upper = idx + 1
        if bug == "last_interval":  # the upper weight lands on the lower knot in the last interval
            upper = torch.where(idx == x.numel() - 2, idx, upper)
        gy = torch.zeros(x.numel(), dtype=g.dtype, device=g.device)
        gy.index_add_(0, idx, g * (1 - w1))
        gy.index_add_(0, upper, g * w1)
        gxnew = -g * slope if bug == "slope_sign" else g * slope
        return None, gy, gxnew, None


class ComplexMultiply(torch.autograd.Function):
    """Elementwise complex product a * b; PyTorch's convention: grad_a = grad * conj(b)."""

    @staticmethod
    def forward(ctx, a, b, bug):
        ctx.save_for_backward(a, b)
        ctx.bug = bug
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        if ctx.bug == "no_conjugate":
            return grad * b, grad * a, None
        if ctx.bug == "conjugate_grad":
            return grad.conj() * b, grad * a.conj(), None
        return grad * b.conj(), grad * a.conj(), None


class InplaceELU(torch.autograd.Function):
    """ELU written into its input (mark_dirty), the backward from the saved output alone:
    y > 0: 1, else y + alpha (InPlace-ABN's trick)."""

    @staticmethod
    def forward(ctx, x, alpha, bug):
        x.copy_(torch.where(x > 0, x, alpha * torch.expm1(x)))
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.alpha, ctx.bug = alpha, bug
        return x

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        alpha = ctx.alpha
        # exp(x) = y + alpha on the negative side; the twin takes y for x
        negative = alpha * torch.exp(y) if ctx.bug == "output_taken_for_input" else y + alpha
        gx = g * torch.where(y > 0, torch.ones_like(y), negative)
        if ctx.bug == "one_percent_element":
            gx = _one_element(gx, 1.01)
        return gx, None, None


def _inplace_elu(x, bug):
    return InplaceELU.apply(x * 1.0, 1.0, bug)  # a non-leaf copy to write into


class Polar(torch.autograd.Function):
    """(x, y) -> (r, theta) with set_materialize_grads(False): a None cotangent stays None."""

    @staticmethod
    def forward(ctx, x, y, bug):
        ctx.set_materialize_grads(False)
        r = torch.sqrt(x * x + y * y)
        ctx.save_for_backward(x, y, r)
        ctx.bug = bug
        return r, torch.atan2(y, x)

    @staticmethod
    def backward(ctx, gr, gtheta):
        x, y, r = ctx.saved_tensors
        bug = ctx.bug
        gx = torch.zeros_like(x)
        gy = torch.zeros_like(y)
        if gr is not None:
            rr = r * r if bug == "r_squared" else r
            gx = gx + gr * x / rr
            gy = gy + gr * y / rr
        if gtheta is not None:
            r2 = r * r
            sign = 1.0 if bug == "atan2_sign" else -1.0
            gx = gx + sign * gtheta * y / r2
            gy = gy + gtheta * x / r2
        return gx, gy, None


class SortWithIndices(torch.autograd.Function):
    """Sort along the last axis returning the values and the permutation (mark_non_differentiable);
    the backward scatters the cotangent back through the permutation."""

    @staticmethod
    def forward(ctx, x, bug):
        values, idx = torch.sort(x, dim=-1)
        ctx.save_for_backward(idx)
        ctx.mark_non_differentiable(idx)
        ctx.bug = bug
        return values, idx

    @staticmethod
    def backward(ctx, gv, _gi):
        (idx,) = ctx.saved_tensors
        if ctx.bug == "gather_for_scatter":  # the inverse permutation
            gx = gv.gather(-1, idx)
        else:
            gx = torch.zeros_like(gv).scatter(-1, idx, gv)
        if ctx.bug == "one_percent_row":
            gx = _first_row(gx, 1.01)
        return gx, None


class Correlation(torch.autograd.Function):
    """FlowNet's correlation layer (spatial-correlation-sampler, kernel 1): for each displacement
    (dy, dx) within ``radius``, mean over channels of f1 * f2 shifted, zero outside the map."""

    @staticmethod
    def _shift(t, dy, dx, roll=False):
        """t[:, i + dy, j + dx], zero outside (or wrapped around with ``roll``)."""
        if roll:
            return torch.roll(t, shifts=(-dy, -dx), dims=(1, 2))
        _, h, w = t.shape
        out = torch.zeros_like(t)
        ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h - max(dy, 0))
        xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w - max(dx, 0))
        out[:, yd, xd] = t[:, ys, xs]
        return out

    @staticmethod
    def _displacements(radius):
        return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]

    @staticmethod
    def forward(ctx, f1, f2, radius, bug):
        c = f1.shape[0]
        out = [
            (f1 * Correlation._shift(f2, dy, dx)).sum(0) / c for dy, dx in Correlation._displacements(radius)
        ]
        ctx.save_for_backward(f1, f2)
        ctx.radius, ctx.bug = radius, bug
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        f1, f2 = ctx.saved_tensors
        bug = ctx.bug
        c = f1.shape[0]
        norm = 1.0 if bug == "missing_normalisation" else c
        g1 = torch.zeros_like(f1)
        g2 = torch.zeros_like(f2)
        for d, (dy, dx) in enumerate(Correlation._displacements(ctx.radius)):
            g1 += g[d] * Correlation._shift(f2, dy, dx, roll=bug == "wrap_border") / norm
            back = (dy, dx) if bug == "shift_sign" else (-dy, -dx)
            g2 += Correlation._shift(g[d] * f1 / c, *back)
        return g1, g2, None, None


# --- cases ---------------------------------------------------------------------------------------


def _sorted_knots(g: torch.Generator, n: int) -> torch.Tensor:
    gaps = _uniform(g, n, low=0.5, high=1.5)
    return torch.cumsum(gaps, 0) - 1.0


def _interp_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    x = _sorted_knots(g, s[0] + 2)
    xnew = _uniform(g, 2 * s[1], low=float(x[0]), high=float(x[-1]))
    # keep the points off the knots, where the interpolant is not differentiable in xnew
    nearest = (xnew[:, None] - x[None, :]).abs().min(1).values
    xnew = torch.where(nearest < 0.05, xnew + 0.1, xnew).clamp(float(x[0]) + 0.05, float(x[-1]) - 0.05)
    # ... and make sure the last interval holds a point
    xnew[0] = 0.5 * (x[-2] + x[-1])
    return x, _randn(g, s[0] + 2), xnew


def _chamfer_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    return _randn(g, s[0] + 2, 3), _randn(g, s[1], 3)


def _attention_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    n, d = s[0], s[1] - 1
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return _randn(g, n, d), _randn(g, n, d), _randn(g, n, d), mask


def _gumbel_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    u = _uniform(g, *s, low=1e-4, high=1 - 1e-4)
    return _randn(g, *s, scale=2.0), -torch.log(-torch.log(u))


def _complex_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    a = torch.complex(_randn(g, *s), _randn(g, *s))
    b = torch.complex(_randn(g, *s), _randn(g, *s))
    return a, b


def _weight_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    # (in, out) storage seen as (out, in): a transposed view, as a tied weight is
    return (_randn(g, 3 * s[1], s[0]).T,)


WILD_CASES_2: tuple[WildCase, ...] = (
    WildCase(
        "sparsemax",
        Sparsemax.apply,
        lambda g, s: (_randn(g, *s, scale=0.7),),
        ("count_off_by_one", "unmasked_sum", "one_percent_row"),
    ),
    WildCase(
        "gumbel_softmax",
        lambda logits, noise, bug: GumbelSoftmax.apply(logits, noise, 0.5, bug),
        _gumbel_inputs,
        ("missing_tau", "dot_over_wrong_axis"),
        grad=(True, False),
    ),
    WildCase(
        "soft_dtw",
        lambda D, bug: SoftDTW.apply(D, 0.5, bug),
        lambda g, s: (_uniform(g, min(s[0], 5), min(s[1], 4), low=0.1, high=2.0),),
        ("transposed_neighbour", "gamma_in_one_term"),
    ),
    WildCase(
        "fused_gru_cell",
        FusedGRUCell.apply,
        lambda g, s: (_randn(g, s[0], 3 * s[1]), _randn(g, s[0], 3 * s[1]), _randn(g, s[0], s[1])),
        ("hx_one_minus", "hidden_new_without_reset", "gate_order"),
    ),
    WildCase(
        "depthwise_conv1d",
        DepthwiseConv1d.apply,
        lambda g, s: (_randn(g, 2, 3, s[0] + 2), _randn(g, 3, 3)),
        ("flipped_kernel", "first_batch_only", "padding_offset"),
    ),
    WildCase(
        "group_norm",
        lambda x, w, b, bug: GroupNorm.apply(x, w, b, 2, 1e-5, bug),
        lambda g, s: (_randn(g, 2, 4, s[0], scale=2.0) + 0.3, 1 + _randn(g, 4, scale=0.2), _randn(g, 4)),
        ("per_channel_stats", "dropped_mean", "bias_inside_weight_branch"),
        grad=(True, False, True),
    ),
    WildCase(
        "weight_standardization",
        lambda w, bug: WeightStandardization.apply(w, 1e-5, bug),
        _weight_inputs,
        ("biased_in_backward", "dropped_mean", "assumes_contiguous"),
    ),
    WildCase(
        "recompute_attention",
        RecomputeAttention.apply,
        _attention_inputs,
        ("mask_not_reapplied", "delta_without_p", "missing_scale_dk"),
    ),
    WildCase(
        "logsumexp",
        LogSumExp.apply,
        lambda g, s: (_randn(g, *s, scale=3.0),),
        ("max_for_lse", "one_percent_element"),
    ),
    WildCase(
        "charbonnier",
        lambda x, t, bug: CharbonnierLoss.apply(x, t, 0.1, bug),
        lambda g, s: (_randn(g, *s), _randn(g, s[1])),
        ("eps_not_squared", "target_mean_for_sum"),
    ),
    WildCase(
        "chamfer",
        ChamferDistance.apply,
        _chamfer_inputs,
        ("missing_factor_two", "dropped_second_term", "assign_not_add"),
    ),
    WildCase(
        "interp1d",
        Interp1d.apply,
        _interp_inputs,
        ("last_interval", "slope_sign"),
        grad=(False, True, True),
    ),
    WildCase(
        "complex_multiply",
        ComplexMultiply.apply,
        _complex_inputs,
        ("no_conjugate", "conjugate_grad"),
    ),
    WildCase(
        "inplace_elu",
        _inplace_elu,
        lambda g, s: (_randn(g, *s, scale=2.0),),
        ("output_taken_for_input", "one_percent_element"),
    ),
    WildCase(
        "polar",
        Polar.apply,
        lambda g, s: (_randn(g, *s), _randn(g, *s)),
        ("atan2_sign", "r_squared"),
    ),
    WildCase(
        "sort_with_indices",
        SortWithIndices.apply,
        lambda g, s: (_randn(g, *s),),
        ("gather_for_scatter", "one_percent_row"),
    ),
    WildCase(
        "correlation",
        lambda f1, f2, bug: Correlation.apply(f1, f2, 1, bug),
        lambda g, s: (_randn(g, 3, s[0] - 1, s[1]), _randn(g, 3, s[0] - 1, s[1])),
        ("missing_normalisation", "shift_sign", "wrap_border"),
    ),
)
