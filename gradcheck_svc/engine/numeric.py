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

Full mode's column path takes the third node only where it can change a
verdict (``central``): a first pass evaluates ``x - h`` and ``x + h`` (and
``x + 2h`` for the noise sample's columns); a column whose every element the
central difference passes by a wide margin, with no sign of a kink, is
reported with ``D``; the others get ``x + 2h`` and everything above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = [
    "DTYPE_DEFAULTS",
    "NODES",
    "SMOOTH_SPREAD",
    "Central",
    "DTypeDefaults",
    "Differences",
    "Probes",
    "backward_2h",
    "central",
    "defaults_for",
    "derivative_weights",
    "differences",
    "node_offsets",
    "noise_sample",
    "perturb",
    "probe_noise",
    "row_noise",
    "sampled_noise",
    "steps",
]

NODES = (-1.0, 1.0, 2.0)  # multiples of h, besides the shared f(x)
_W = TypeVar("_W", float, torch.Tensor)  # node offsets: a block's columns, or one column's floats
_MIN_NOISE_SAMPLES = 4
_NOISE_COLUMNS = 128
_NOISE_DIRECTIONS = 8  # random directions that measure each output's noise in low precision
_CEILING_ULPS = 2.0**10  # units of the largest |f(x)| that a rounding noise sample stays below
_FLOOR_ULPS = 4.0
# The largest change of a derivative across the step, relative to its size, that still counts
# as smooth at the scale of the step (the first pass may then decide alone).
SMOOTH_SPREAD = 2.0**-5
_KINK_BARS = 4.0  # as the verdict's: one-sided bars the one-sided differences must be apart at a kink


@dataclass(frozen=True)
class DTypeDefaults:
    eps: float  # relative finite-difference step
    rtol: float
    atol: float  # relative to the largest |numeric| of the compared block
    machine_eps: float


# Steps near the cube root of the unit roundoff balance the central difference's truncation
# (h^2 f'''/6) against rounding (eps / h): 2^-16 in float64, 2^-7 in float32. Float32 steps
# matter where fn cannot run on float64 copies (a float32 constant inside it): there, 2^-10 left
# noise bars so wide that a 1% error in a backward passed.
DTYPE_DEFAULTS: dict[torch.dtype, DTypeDefaults] = {
    torch.float64: DTypeDefaults(eps=2.0**-16, rtol=1e-7, atol=1e-10, machine_eps=2.0**-52),
    torch.float32: DTypeDefaults(eps=2.0**-7, rtol=1e-4, atol=1e-6, machine_eps=2.0**-23),
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


def node_offsets(base: torch.Tensor, columns: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The offsets actually applied at each of ``NODES`` once ``x + node h`` is rounded to the
    dtype: ``(3, c)``, exact (both sides are representable in float64)."""
    x = base.detach().to(torch.float64)[columns]
    return torch.stack([(x + node * h).to(base.dtype).to(torch.float64) - x for node in NODES])


def perturb(base: torch.Tensor, parts: list[tuple[float, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Perturbed copies of ``base``, one row per column of each part ``(node, columns, h)``, in
    the order given: ``(total columns, n)``."""
    x = base.detach().to(torch.float64)
    batch = base.detach().unsqueeze(0).repeat(sum(columns.numel() for _, columns, _ in parts), 1)
    start = 0
    for node, columns, h in parts:
        rows = torch.arange(start, start + columns.numel(), device=base.device)
        batch[rows, columns] = (x[columns] + node * h).to(base.dtype)
        start += columns.numel()
    return batch


def backward_2h(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    base: torch.Tensor,
    columns: torch.Tensor,
    h: torch.Tensor,
    f0: torch.Tensor,
) -> torch.Tensor:
    """``D-(2h) = (f(x) - f(x - 2h)) / 2h`` of every output along each of ``columns`` (each with
    its step ``h``, the offset as rounded to the dtype): ``(c, M)``, from one evaluation of
    ``x - 2h`` per column. The verdict asks for it where a kink's side is in doubt."""
    x = base.detach().to(torch.float64)[columns]
    offset = (x - 2.0 * h).to(base.dtype).to(torch.float64) - x
    values = evaluate(perturb(base, [(-2.0, columns, h)]))
    return torch.sub(f0, values).div_(-offset.unsqueeze(1))


def noise_sample(c: int) -> torch.Tensor:
    """Positions, among ``c`` perturbed columns, of the even subsample whose third differences
    estimate the evaluation noise; empty when there are too few columns for a median."""
    if c < _MIN_NOISE_SAMPLES:
        return torch.empty(0, dtype=torch.long)
    return torch.arange(0, c, max(1, c // _NOISE_COLUMNS))


def probe_noise(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    base: torch.Tensor,
    columns: torch.Tensor,
    h: torch.Tensor,
    f0: torch.Tensor,
    machine_eps: float,
    generator: torch.Generator,
) -> Probes:
    """Noise samples of every output along a few random directions ``s * h`` (random ``s`` over
    ``columns``, each column's own step), NaN where no direction moved it.

    Where the differences stay in a low precision, an output moved by fewer than a few columns
    (an elementwise function) has too few third differences for a median, and its own one can
    be small by chance while the forward rounds at the scale of its intermediates, not of its
    value (``1 + tanh(u)`` cancelling in a GeLU tail). Along each direction every output moves
    at about the columns' steps, so each direction adds one third difference per output, scaled
    as ``|R - D| h`` of a column: the samples join the columns' median (``differences``,
    ``sampled_noise``).
    """
    # Random signs and sizes: an output moved by one column sees a stencil of its own along
    # each direction, hence rounding of its own. Sizes (2^7 + r) / 2^8 keep the nodes exact;
    # a column's sizes differ from direction to direction, so no two nodes are the same point.
    shape = (_NOISE_DIRECTIONS, columns.numel())
    signs = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
    first = torch.randint(0, 2**7, (1, columns.numel()), generator=generator)
    spread = torch.arange(_NOISE_DIRECTIONS).unsqueeze(1) * (2**7 // _NOISE_DIRECTIONS)
    sizes = (((first + spread) % 2**7).to(torch.float64) + 2**7) / 2**8
    step = (signs * sizes).to(base.device) * h
    x = base.detach().to(torch.float64)[columns]
    batch = base.detach().unsqueeze(0).repeat(len(NODES) * _NOISE_DIRECTIONS, 1)
    for k, node in enumerate(NODES):
        batch[k * _NOISE_DIRECTIONS : (k + 1) * _NOISE_DIRECTIONS, columns] = (x + node * step).to(base.dtype)
    minus, plus, plus2 = evaluate(batch).reshape(len(NODES), _NOISE_DIRECTIONS, -1)
    third = (plus2 - 3 * plus + 3 * f0 - minus).abs_().div_(6)
    # An output that some directions move and others leave bit-for-bit unchanged rounds to the
    # same value across a whole stencil: a zero sample of coarse rounding, not a missing one.
    moved = ((minus != f0) | (plus != f0) | (plus2 != f0)).any(dim=0, keepdim=True)
    samples = torch.where(moved & torch.isfinite(third), third, torch.nan).T
    return Probes(
        samples,
        _granularity(torch.cat([f0.unsqueeze(0), minus, plus, plus2])),
        _rounding_ceiling(f0, machine_eps),
    )


def _granularity(values: torch.Tensor) -> torch.Tensor:
    """Per output, the smallest non-zero change among its values at distinct points ``(p, M)``
    where some of them repeat exactly (else 0).

    An output that takes the very same value at distinct points, yet moves elsewhere, is
    resolved no finer than its smallest step: its rounding there is no noise a third
    difference sees but a staircase as smooth as f (``(x^2 + 1024) - 1024`` in float32 takes a
    few levels over a stencil, on a parabola of their own).
    """
    ordered = torch.sort(torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), dim=0).values
    gaps = ordered[1:] - ordered[:-1]
    repeats = (gaps == 0).any(dim=0)
    smallest = torch.where(gaps > 0, gaps, torch.inf).min(dim=0).values
    return torch.where(repeats & torch.isfinite(smallest), smallest, 0.0)


@dataclass(frozen=True)
class Probes:
    """``probe_noise``'s samples ``(M, k)``, each output's rounding granularity ``(M,)`` and
    the largest sample rounding can explain."""

    samples: torch.Tensor
    granularity: torch.Tensor
    ceiling: float

    def rows(self, index: torch.Tensor) -> Probes:
        return Probes(self.samples[index], self.granularity[index], self.ceiling)


def _rounding_ceiling(f0: torch.Tensor, machine_eps: float) -> float:
    """The largest noise sample rounding can explain: ``_CEILING_ULPS`` units of the largest
    |f(x)|. Intermediates far above every output value (a cancellation) round at their own
    scale, hence the wide margin; a kink's sample (the jump of f' times the step) is far above."""
    finite = f0[torch.isfinite(f0)]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    return _CEILING_ULPS * machine_eps * largest


def derivative_weights(t_minus: _W, t_plus: _W, t_plus2: _W) -> tuple[_W, _W, _W]:
    """Weights of f(x + t) - f(x) in f'(x) ~ sum_k w_k (f(x + t_k) - f(x)), nodes {0, t_k}.

    The derivative at 0 of the Lagrange basis polynomial of node ``a`` (other nodes 0, b, c)
    is ``b c / (a (a - b) (a - c))``; the weight of f(x) itself is minus their sum. The same
    arithmetic on tensors (a block's columns) and on Python floats (the float paths).
    """

    def weight(a: _W, b: _W, c: _W) -> _W:
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

    def parts(self) -> tuple[torch.Tensor, ...]:
        """The five tensors, in field order."""
        return (self.value, self.bar, self.forward, self.backward, self.one_sided_bar)

    def rows(self, rows: slice | torch.Tensor) -> Differences:
        return Differences(*(t[rows] for t in self.parts()))


def _noise_gain(t_minus: torch.Tensor, t_plus: torch.Tensor, t_plus2: torch.Tensor) -> torch.Tensor:
    """1.5 times the norm of the Richardson weights (f(x)'s included): R's noise per unit sigma."""
    w_minus, w_plus, w_plus2 = derivative_weights(t_minus, t_plus, t_plus2)
    return 1.5 * torch.sqrt(w_minus**2 + (w_minus + w_plus + w_plus2) ** 2 + w_plus**2 + w_plus2**2)


def _three_node(evaluated: torch.Tensor, f0: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """R, |R - D|, |D+(2h) - D+(h)|, D+, D- and the differences from f(x): ``(M, c)`` views
    of ``(c, M)`` memory, from node-major outputs ``(3 * c, M)``."""
    c = offsets.shape[1]
    nodes = evaluated.reshape(3, c, -1)
    # Differences from f(x); every formula below is a per-column combination of these.
    d_minus = torch.sub(f0, nodes[0]).T  # f(x) - f(x - h)
    d_plus = torch.sub(nodes[1], f0).T  # f(x + h) - f(x)
    d_plus2 = torch.sub(nodes[2], f0).T  # f(x + 2h) - f(x)
    t_minus, t_plus, t_plus2 = offsets[0], offsets[1], offsets[2]
    w_minus, w_plus, w_plus2 = derivative_weights(t_minus, t_plus, t_plus2)
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
    return richardson, truncation, one_sided, forward, backward, d_minus, d_plus, d_plus2


def _median_noise(
    truncation: torch.Tensor,
    h: torch.Tensor,
    d_minus: torch.Tensor,
    d_plus: torch.Tensor,
    d_plus2: torch.Tensor,
    directions: Probes | None = None,
) -> torch.Tensor:
    """Each output's evaluation noise from the third differences R - D of a column sample,
    and from the ``directions``' samples (``probe_noise``) when given.

    R - D is a third difference: for smooth f at these steps, mostly evaluation noise. Its
    median over the elements an output depends on estimates that output's noise. Elements it
    does not depend on leave it bit-for-bit unchanged and are left out; with fewer than a few
    samples (elementwise functions) the median would be the element's own value, kink
    included: 0 there, and the floor of ``row_noise`` alone applies.
    """
    moved = (d_plus != 0) | (d_minus != 0) | (d_plus2 != 0)
    sample = truncation * h
    noise_samples = torch.where(moved & torch.isfinite(sample), sample, torch.nan)
    if directions is None:
        # A median along contiguous memory: the samples come as (M, s) views of (s, M) memory.
        sigma = torch.nan_to_num(noise_samples.contiguous().nanmedian(dim=1).values, nan=0.0) / 0.502
        return torch.where(moved.sum(dim=1) >= _MIN_NOISE_SAMPLES, sigma, torch.zeros_like(sigma))
    columns = moved.sum(dim=1)
    sigma = torch.zeros_like(columns, dtype=sample.dtype)
    if noise_samples.shape[1]:
        sigma = torch.nan_to_num(noise_samples.contiguous().nanmedian(dim=1).values, nan=0.0) / 0.502
    # Outputs that few columns move (elementwise) take the directions' samples as well, and
    # their mean: such an output may round in steps (a low-precision intermediate that changes
    # by a unit every few steps h), so that most stencils see no step and a median sees none,
    # yet D errs by a unit over 2h wherever its stencil holds one. The mean weighs the steps
    # by how often they occur (for Gaussian noise, E|sample| = 0.594 sigma). Outputs that many
    # columns move keep their columns' median: all of their columns move along each
    # direction, so a kink crossed along a few directions would inflate the mean. A sample
    # above ``ceiling`` is a feature (a kink, a support boundary), not rounding: left out.
    pooled = torch.cat([noise_samples, directions.samples], dim=1)
    pooled = pooled.masked_fill(pooled > directions.ceiling, torch.nan)
    mean = torch.nan_to_num(pooled.nanmean(dim=1), nan=0.0) / 0.594
    few = (~pooled.isnan()).sum(dim=1) >= _MIN_NOISE_SAMPLES
    # A staircase the third differences cannot see: half its step (the largest rounding error).
    steps = directions.granularity.masked_fill(directions.granularity > directions.ceiling, 0.0) / 2
    few_columns = torch.maximum(torch.where(few, mean, 0.0), steps)
    return torch.where(columns >= _MIN_NOISE_SAMPLES, sigma, few_columns)


def sampled_noise(
    evaluated: torch.Tensor,
    f0: torch.Tensor,
    offsets: torch.Tensor,
    directions: Probes | None = None,
) -> torch.Tensor:
    """The median part of each output's noise from the sample columns' three nodes (``(3 * s, M)``
    node-major, offsets ``(3, s)``) and the ``directions``' samples, if any."""
    _, truncation, _, _, _, d_minus, d_plus, d_plus2 = _three_node(evaluated, f0, offsets)
    return _median_noise(truncation, offsets[1], d_minus, d_plus, d_plus2, directions)


def row_noise(
    median: torch.Tensor | None,
    f0: torch.Tensor,
    magnitude: torch.Tensor,
    x_scale: torch.Tensor,
    machine_eps: float,
) -> torch.Tensor:
    """Each output's evaluation noise sigma: the sampled median (if any), and at least a few
    ulps of the output and of the terms that make it up (|J_ij| |x_j| summed over the block
    ``magnitude`` (M, c) of |J|): the size of the rounding error of a dot product, whatever
    the cancellation in f(x)."""
    terms = torch.nan_to_num(magnitude @ x_scale, nan=0.0, posinf=0.0)
    floor = _FLOOR_ULPS * machine_eps * (torch.nan_to_num(f0.abs(), nan=0.0, posinf=0.0) + terms)
    return floor if median is None else torch.maximum(median, floor)


def differences(
    evaluated: torch.Tensor,
    f0: torch.Tensor,
    offsets: torch.Tensor,
    machine_eps: float,
    x_scale: torch.Tensor,
    sigma: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    directions: Probes | None = None,
) -> Differences:
    """From outputs at the nodes (``(3 * c, M)``, node-major) to a numeric block ``(M, c)``.

    ``x_scale`` is ``max(|x_j|, h_j)`` per perturbed column (or per direction in fast mode).
    ``sigma`` is each output's noise when the caller has it, or a function of |R| that gives
    it (``row_noise``); by default it is estimated from these columns' sample (``noise_sample``)
    and the ``directions``' noise samples (``probe_noise``), if any.
    The returned tensors are transposed views of ``(c, M)`` memory: callers keep every
    operand in that layout so elementwise ops stay on dense memory.
    """
    richardson, truncation, one_sided, forward, backward, d_minus, d_plus, d_plus2 = _three_node(
        evaluated, f0, offsets
    )
    h = offsets[1]  # (c,)
    if callable(sigma):
        sigma = sigma(richardson.abs())
    elif sigma is None:
        # A median needs a few dozen samples, not thousands: an even subsample of columns.
        c = offsets.shape[1]
        # With the directions' samples, every column of a few joins them (see _median_noise).
        picked = noise_sample(c) if directions is None or c >= _MIN_NOISE_SAMPLES else torch.arange(c)
        picked = picked.to(offsets.device)
        median = None
        if picked.numel() or directions is not None:
            median = _median_noise(
                truncation[:, picked],
                h[picked],
                d_minus[:, picked],
                d_plus[:, picked],
                d_plus2[:, picked],
                directions,
            )
        sigma = row_noise(median, f0, richardson.abs(), x_scale, machine_eps)
    noise_gain = _noise_gain(offsets[0], offsets[1], offsets[2])
    bar = truncation.addr_(sigma, noise_gain)  # truncation + 1.5 sigma |w|, in place
    one_sided_bar = one_sided.addr_(sigma, 1.5 * (2**0.5) / h)
    return Differences(richardson, bar, forward, backward, one_sided_bar)


@dataclass
class Central:
    """The first pass, ``x - h`` and ``x + h`` alone: ``(M, c)`` blocks, views of ``(c, M)``
    memory like ``differences``' (``sigma`` is per output, the gains per column)."""

    value: torch.Tensor  # D, the central difference
    magnitude: torch.Tensor  # |D|
    spread: torch.Tensor  # |D+ - D-|
    smooth: torch.Tensor  # no sign of a kink, nor of any feature at the scale of the step
    sigma: torch.Tensor  # (M,) each output's evaluation noise
    noise_gain: torch.Tensor  # (c,) the Richardson value's noise per unit sigma (1.5 |w|)
    side_gain: torch.Tensor  # (c,) a one-sided difference's noise per unit sigma

    def rows(self, rows: slice) -> Central:
        """The block of output rows ``rows``."""
        return Central(
            self.value[rows],
            self.magnitude[rows],
            self.spread[rows],
            self.smooth[rows],
            self.sigma[rows],
            self.noise_gain,
            self.side_gain,
        )

    def reported(self, *, writable: bool = False) -> Differences:
        """D with the bars a clear pass is reported with.

        The bar: the noise part of the Richardson bar (more than D's own noise, so that the
        tolerance a clear pass was judged with is never more than the one reported) and D's
        truncation error on the scale ``smooth`` vouches for, h^2 |f'''| / 6, at most
        ``SMOOTH_SPREAD / 6`` of the spread. A clear pass shows no kink: D stands for both
        one-sided differences (the kink test reads nothing there), each a copy of its own when
        the block is ``writable`` (third-node columns are written in).
        """
        bar = torch.outer(self.noise_gain, self.sigma).T.add_(self.spread, alpha=SMOOTH_SPREAD / 6)
        if not writable:
            return Differences(self.value, bar, self.value, self.value, bar)
        side = torch.outer(self.side_gain, self.sigma).T.add_(self.spread, alpha=0.5)
        return Differences(self.value, bar, self.value.clone(), self.value.clone(), side)


def central(
    evaluated: torch.Tensor,
    f0: torch.Tensor,
    offsets: torch.Tensor,
    median: torch.Tensor | None,
    machine_eps: float,
    x_scale: torch.Tensor,
) -> Central:
    """Central difference and the spread of the one-sided ones from outputs at ``x - h, x + h``
    (``(2 * c, M)``, node-major), with ``offsets`` the ``(3, c)`` offsets of all ``NODES``, and
    each output's noise from the sampled ``median`` (``sampled_noise``) and the floor
    (``row_noise``).

    A kink puts D+ and D- apart by the jump of the derivative whatever the step; a smooth f by
    about h |f''|. ``smooth`` asks that the derivative change across the step by at most
    ``SMOOTH_SPREAD`` of its size, plus noise: f then shows no feature at the scale of h, which
    the kink test (|D+ - D-| beyond several |D+(2h) - D+(h)|, about h |f''| / 2 on a smooth f)
    needs in order to fire. Few passes over the block: it is as large as the Jacobian chunk.
    """
    c = offsets.shape[1]
    minus, plus = evaluated[:c], evaluated[c : 2 * c]
    t_minus, t_plus = offsets[0].unsqueeze(1), offsets[1].unsqueeze(1)
    d_plus = torch.sub(plus, f0)  # f(x + h) - f(x)
    d_minus = torch.sub(f0, minus)  # f(x) - f(x - h)
    value = torch.add(d_plus, d_minus).div_(t_plus - t_minus)
    # D+ - D- = d_plus / t_plus - d_minus / (-t_minus)
    spread = d_plus.div_(t_plus).addcdiv_(d_minus, t_minus).abs_()
    del d_minus
    magnitude = value.abs()
    sigma = row_noise(median, f0, magnitude.T, x_scale, machine_eps)
    side_gain = 1.5 * (2**0.5) / offsets[1]
    limit = torch.mul(magnitude, SMOOTH_SPREAD).addr_(side_gain, sigma, alpha=2 * _KINK_BARS)
    smooth = spread <= limit
    noise_gain = _noise_gain(offsets[0], offsets[1], offsets[2])
    return Central(value.T, magnitude.T, spread.T, smooth.T, sigma, noise_gain, side_gain)
