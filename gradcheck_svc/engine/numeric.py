"""Finite differences with error bars.

Each perturbed element is evaluated at the nodes ``x - h, x + h, x + 2h``
(``f(x)`` is shared by all elements). From those four values:

* ``D``   the central difference over ``[x - h, x + h]`` (second order),
* ``R``   the Richardson combination of steps ``h`` and ``2h`` over all four
          nodes (third order) — the reported numeric derivative,
* ``|R - D|``  an estimate of ``D``'s truncation error, hence a conservative
          error bar for ``R``,
* ``D+ / D-``  the forward and backward one-sided differences, kept to tell a
          kink (relu at 0) from a wrong gradient.

Round-off is estimated from the data rather than from a formula: ``R - D`` is
a third difference, pure noise for a smooth function at these steps, and its
median over the perturbed elements of a chunk gives each output element's
evaluation noise. Steps are powers of two scaled to ``max(|x|, 1)`` and to the
dtype; the offsets actually applied (after rounding ``x + h`` to the dtype)
are used in every formula, so float32 perturbations lose nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DTYPE_DEFAULTS",
    "NODES",
    "DTypeDefaults",
    "Differences",
    "defaults_for",
    "differences",
    "perturb",
    "steps",
]

NODES = (-1.0, 1.0, 2.0)  # multiples of h, besides the shared f(x)
_MIN_NOISE_SAMPLES = 4
_NOISE_COLUMNS = 128
_FLOOR_ULPS = 4.0


@dataclass(frozen=True)
class DTypeDefaults:
    eps: float  # relative finite-difference step
    rtol: float
    atol: float  # relative to the largest |numeric| of the compared block
    machine_eps: float


DTYPE_DEFAULTS: dict[torch.dtype, DTypeDefaults] = {
    torch.float64: DTypeDefaults(eps=2.0**-16, rtol=1e-7, atol=1e-10, machine_eps=2.0**-52),
    torch.float32: DTypeDefaults(eps=2.0**-10, rtol=1e-4, atol=1e-6, machine_eps=2.0**-23),
    torch.float16: DTypeDefaults(eps=2.0**-5, rtol=1e-2, atol=1e-3, machine_eps=2.0**-10),
    torch.bfloat16: DTypeDefaults(eps=2.0**-4, rtol=2e-2, atol=1e-2, machine_eps=2.0**-7),
}


def defaults_for(*dtypes: torch.dtype) -> DTypeDefaults:
    """Defaults of the least precise of ``dtypes`` (complex dtypes count as their real part)."""
    real = [torch.empty(0, dtype=d).real.dtype if d.is_complex else d for d in dtypes]
    known = [DTYPE_DEFAULTS.get(d, DTYPE_DEFAULTS[torch.float32]) for d in real]
    return max(known, key=lambda d: d.machine_eps)


def steps(values: torch.Tensor, eps: float) -> torch.Tensor:
    """Power-of-two steps ``~ eps * max(|x|, 1)``, float64."""
    scale = values.detach().to(torch.float64).abs().clamp(min=1.0) * eps
    return torch.exp2(torch.round(torch.log2(scale)))


def perturb(base: torch.Tensor, columns: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbed copies of ``base``: node-major rows ``(3 * c, n)``, and actual offsets ``(3, c)``."""
    c = columns.numel()
    x = base.detach().to(torch.float64)[columns]
    batch = base.detach().unsqueeze(0).repeat(len(NODES) * c, 1)
    offsets = torch.empty(len(NODES), c, dtype=torch.float64, device=base.device)
    rows = torch.arange(c, device=base.device)
    for k, node in enumerate(NODES):
        moved = (x + node * h).to(base.dtype)
        offsets[k] = moved.to(torch.float64) - x  # exact: both are representable in float64
        batch[k * c + rows, columns] = moved
    return batch, offsets


def _derivative_weights(
    t_minus: torch.Tensor, t_plus: torch.Tensor, t_plus2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights of f(x + t) - f(x) in f'(x) ~ sum_k w_k (f(x + t_k) - f(x)), nodes {0, t_k}.

    The derivative at 0 of the Lagrange basis polynomial of node ``a`` (other nodes 0, b, c)
    is ``b c / (a (a - b) (a - c))``; the weight of f(x) itself is minus their sum.
    """

    def weight(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return b * c / (a * (a - b) * (a - c))

    return (
        weight(t_minus, t_plus, t_plus2),
        weight(t_plus, t_minus, t_plus2),
        weight(t_plus2, t_minus, t_plus),
    )


@dataclass
class Differences:
    """Numeric Jacobian block ``(m, c)`` with its error bars and one-sided differences."""

    value: torch.Tensor
    bar: torch.Tensor
    forward: torch.Tensor
    backward: torch.Tensor
    one_sided_bar: torch.Tensor

    def rows(self, rows: slice | torch.Tensor) -> Differences:
        return Differences(
            *(t[rows] for t in (self.value, self.bar, self.forward, self.backward, self.one_sided_bar))
        )


def differences(
    evaluated: torch.Tensor,
    f0: torch.Tensor,
    offsets: torch.Tensor,
    machine_eps: float,
    x_scale: torch.Tensor,
) -> Differences:
    """From outputs at the nodes (``(3 * c, M)``, node-major) to a numeric block ``(M, c)``.

    ``x_scale`` is ``max(|x_j|, h_j)`` per perturbed column (or per direction in fast mode).
    The returned tensors are transposed views of ``(c, M)`` memory: callers keep every
    operand in that layout so elementwise ops stay on dense memory.
    """
    c = offsets.shape[1]
    nodes = evaluated.reshape(3, c, -1)
    # Differences from f(x); every formula below is a per-column combination of these.
    d_minus = torch.sub(f0, nodes[0]).T  # f(x) - f(x - h)
    d_plus = torch.sub(nodes[1], f0).T  # f(x + h) - f(x)
    d_plus2 = torch.sub(nodes[2], f0).T  # f(x + 2h) - f(x)
    t_minus, t_plus, t_plus2 = offsets[0], offsets[1], offsets[2]
    w_minus, w_plus, w_plus2 = _derivative_weights(t_minus, t_plus, t_plus2)
    # R = sum_k w_k (f(x + t_k) - f(x)); d_minus is f(x) - f(x - h), hence the sign.
    richardson = d_plus * w_plus
    richardson.add_(d_minus * (-w_minus)).add_(d_plus2 * w_plus2)
    # R - D, with D = (d_plus + d_minus) / (t_plus - t_minus) the central difference.
    inv_span = 1.0 / (t_plus - t_minus)
    truncation = d_plus * (w_plus - inv_span)
    truncation.add_(d_minus * (-w_minus - inv_span)).add_(d_plus2 * w_plus2).abs_()
    forward = d_plus / t_plus
    backward = d_minus / (-t_minus)
    one_sided = (d_plus2 / t_plus2).sub_(forward).abs_()  # |D+(2h) - D+(h)|

    h = t_plus  # (c,)
    # R - D is a third difference: for smooth f at these steps, mostly evaluation noise.
    # Its median over the elements an output depends on estimates that output's noise.
    # Elements it does not depend on leave it bit-for-bit unchanged and are left out; with
    # fewer than a few samples (elementwise functions) the median would be the element's own
    # value, kink included, so only the floor below is used. A median needs a few dozen
    # samples, not thousands: an even subsample of columns is used.
    if c >= _MIN_NOISE_SAMPLES:
        picked = slice(None, None, max(1, c // _NOISE_COLUMNS))
        moved = (d_plus[:, picked] != 0) | (d_minus[:, picked] != 0) | (d_plus2[:, picked] != 0)
        sample = truncation[:, picked] * h[picked]
        noise_samples = torch.where(moved & torch.isfinite(sample), sample, torch.nan)
        sigma = torch.nan_to_num(noise_samples.nanmedian(dim=1).values, nan=0.0) / 0.502
        sigma = torch.where(moved.sum(dim=1) >= _MIN_NOISE_SAMPLES, sigma, torch.zeros_like(sigma))
    else:
        sigma = torch.zeros_like(f0)
    # Floor: a few ulps of the output and of the terms that make it up (|J_ij| |x_j| summed),
    # the size of the rounding error of a dot product, whatever the cancellation in f(x).
    terms = torch.nan_to_num(richardson.abs() @ x_scale, nan=0.0, posinf=0.0)
    floor = _FLOOR_ULPS * machine_eps * (torch.nan_to_num(f0.abs(), nan=0.0, posinf=0.0) + terms)
    sigma = torch.maximum(sigma, floor)
    noise_gain = 1.5 * torch.sqrt(w_minus**2 + (w_minus + w_plus + w_plus2) ** 2 + w_plus**2 + w_plus2**2)
    bar = truncation.addr_(sigma, noise_gain)  # truncation + 1.5 sigma |w|, in place
    one_sided_bar = one_sided.addr_(sigma, 1.5 * (2**0.5) / h)
    return Differences(richardson, bar, forward, backward, one_sided_bar)
