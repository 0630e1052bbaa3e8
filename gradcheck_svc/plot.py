"""A picture of the error: |analytic - numeric| / tolerance over the Jacobian, per failing pair.

matplotlib is an optional extra (``pip install gradcheck-svc[plot]``); it is
imported only here, only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_svc.errors import CheckError

if TYPE_CHECKING:
    from gradcheck_svc.report import PairReport, Report

__all__ = ["plot_report"]

_PANEL_INCHES = 4.5
_DPI = 100


def _pairs_to_plot(report: Report, all_pairs: bool) -> list[PairReport]:
    chosen = [p for p in report.pairs if p.error_map is not None and (all_pairs or not p.ok)]
    if not chosen:
        raise CheckError(
            "nothing to plot: no failing pair carries an error map (error maps are kept for failing pairs)"
        )
    return chosen


def plot_report(report: Report, path: Path, *, all_pairs: bool = False) -> Path:
    """Write one heatmap panel per failing pair into a PNG at ``path``; return the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckError("report.plot needs matplotlib: pip install 'gradcheck-svc[plot]'") from exc

    pairs = _pairs_to_plot(report, all_pairs)
    figure, axes = plt.subplots(
        1, len(pairs), figsize=(_PANEL_INCHES * len(pairs), _PANEL_INCHES), dpi=_DPI, squeeze=False
    )
    for ax, pair in zip(axes[0], pairs, strict=True):
        grid = [[max(v, 1e-3) for v in row] for row in pair.error_map or []]
        image = ax.imshow(
            grid, aspect="auto", cmap="magma", norm=LogNorm(vmin=1e-3, vmax=max(10.0, pair.max_error_ratio))
        )
        rows, cols = len(grid), len(grid[0]) if grid else 0
        # Mark the worst elements at their (pooled) positions.
        out_size = max(1, _numel(pair.output_shape))
        in_size = max(1, _numel(pair.input_shape))
        for el in pair.worst:
            r = _flat(el.output_index, pair.output_shape) * rows // out_size
            c = _flat(el.input_index, pair.input_shape) * cols // in_size
            ax.scatter([c], [r], s=60, facecolors="none", edgecolors="cyan", linewidths=1.5)
        ax.set_title(
            f"{pair.title}: {pair.status.value}\n"
            f"failed {pair.elements_failed}/{pair.elements_checked}, max err/tol {pair.max_error_ratio:.3g}",
            fontsize=9,
        )
        ax.set_xlabel(f"{pair.input} element (flattened)")
        ax.set_ylabel(f"{pair.output} element (flattened)")
        figure.colorbar(image, ax=ax, label="|analytic - numeric| / tolerance")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)
    return path


def _numel(shape: list[int]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def _flat(index: list[int], shape: list[int]) -> int:
    flat = 0
    for i, d in zip(index, shape, strict=False):
        flat = flat * d + i
    return flat
