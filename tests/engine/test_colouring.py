"""Structure-aware finite differences: grouped columns, and what a wrong analytic pattern cannot hide."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.engine import colouring
from gradcheck_svc.engine.colouring import colour_by_stride


class MissingNeighbour(torch.autograd.Function):
    """y_i = x_i^2 + 0.5 x_{i-1}; the backward forgets the neighbour term (a diagonal Jacobian)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x + 0.5 * torch.roll(x, 1)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class SpuriousNeighbour(torch.autograd.Function):
    """y_i = x_i^2 (diagonal); the backward adds a term from the next row that is not there."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g + 0.25 * torch.roll(g, -1)


class Counted(torch.autograd.Function):
    """tanh with a correct backward; counts forward calls (``float()`` keeps vmap out)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        Counted.calls += 1
        float(x.sum())  # a host sync: no batching, so every evaluation is one call
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def _failing_elements(report: gc.Report) -> set[tuple[int, int]]:
    (pair,) = report.pairs
    return {(e.output_index[0], e.input_index[0]) for e in pair.worst}


def test_missing_off_diagonal_term_is_caught_and_located():
    n = 100
    report = gc.check(MissingNeighbour.apply, torch.randn(n, dtype=torch.float64), max_worst=n)
    assert not report.ok
    (pair,) = report.pairs
    assert pair.elements_failed == n  # every sub-diagonal element, nothing else
    assert pair.elements_checked == n * n
    assert _failing_elements(report) == {(i, (i - 1) % n) for i in range(n)}
    assert all(e.analytic == 0.0 and abs(e.numeric - 0.5) < 1e-6 for e in pair.worst)


def test_spurious_off_diagonal_term_is_caught_and_located():
    n = 100
    report = gc.check(SpuriousNeighbour.apply, torch.randn(n, dtype=torch.float64), max_worst=n)
    assert not report.ok
    (pair,) = report.pairs
    assert pair.elements_failed == n
    assert _failing_elements(report) == {((i + 1) % n, i) for i in range(n)}
    assert all(e.analytic == 0.25 and abs(e.numeric) < 1e-9 for e in pair.worst)


def test_elementwise_function_costs_a_few_evaluations():
    Counted.calls = 0
    n = 500
    report = gc.check(Counted.apply, torch.randn(n, dtype=torch.float64))
    assert report.ok
    assert report.pairs[0].elements_checked == n * n
    # One group of all columns: three perturbed points, plus f(x) and the analytic side's forwards.
    assert Counted.calls < 20


def test_a_bug_in_one_element_is_reported_at_that_element_alone():
    class OneWrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            grad = (g * torch.cos(x)).reshape(-1).clone()
            grad[7] *= 1.01
            return grad.reshape(x.shape)

    report = gc.check(OneWrong.apply, torch.randn(50, 20, dtype=torch.float64))
    (pair,) = report.pairs
    assert pair.elements_failed == 1
    (element,) = pair.worst
    assert element.output_index == element.input_index == [0, 7]


def test_row_wise_function_keeps_its_verdict_and_catches_a_dropped_term():
    def softmax_rows(x):
        return torch.softmax(x, dim=-1)

    x = torch.randn(30, 40, dtype=torch.float64)
    assert gc.check(softmax_rows, x).ok

    class DiagonalOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.softmax(x, dim=-1)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * y * (1 - y)  # the off-diagonal -y_i y_j dropped

    report = gc.check(DiagonalOnly.apply, x)
    assert not report.ok
    (pair,) = report.pairs
    # Every off-diagonal element of each row block fails, each on its own column.
    assert pair.elements_failed == 30 * 40 * 39
    assert all(e.output_index[0] == e.input_index[0] for e in pair.worst)
    assert all(e.output_index[1] != e.input_index[1] for e in pair.worst)


def test_stride_colouring_matches_the_layouts():
    n = 12
    diagonal = torch.arange(n)
    assert colour_by_stride(diagonal, diagonal, n) == 1
    # Rows of length 4: row r holds columns 4r..4r+3.
    cols = torch.arange(n)
    assert colour_by_stride(cols // 4, cols, n) == 4
    # A dense row needs as many colours as columns: not worth colouring.
    assert colour_by_stride(torch.zeros(n, dtype=torch.long), cols, n) is None


def test_groups_in_small_chunks_give_the_same_elements():
    x = torch.randn(100, dtype=torch.float64)
    whole = gc.check(SpuriousNeighbour.apply, x, max_worst=100)
    chunked = gc.check(SpuriousNeighbour.apply, x, max_worst=100, chunk_size=1)
    assert _failing_elements(whole) == _failing_elements(chunked)
    assert chunked.pairs[0].elements_failed == 100


@pytest.mark.parametrize(
    "fn, x",
    [
        (torch.relu, torch.cat([torch.zeros(5), torch.linspace(-2, 2, 95)]).double()),
        (torch.abs, torch.cat([torch.zeros(3), torch.linspace(-1, 1, 50)]).double()),
        (lambda x: x.clamp(-0.5, 0.5), torch.tensor([0.5, -0.5, 0.1, 2.0] * 10).double()),
        (lambda x: torch.softmax(x, -1), torch.linspace(-3, 3, 200).double().reshape(10, 20)),
        (torch.tanh, torch.linspace(-3, 3, 300)),  # float32
    ],
)
def test_same_verdict_kinks_and_counts_as_column_by_column(fn, x, monkeypatch):
    # max_worst holds every kink: within a rank the order is by err/tol, and a group's error
    # floor may differ a little from a column's, so a truncated list may pick other ties.
    grouped = gc.check(fn, x, max_worst=100).pairs[0]
    monkeypatch.setattr(colouring, "colour_by_stride", lambda *args: None)
    single = gc.check(fn, x, max_worst=100).pairs[0]
    assert (grouped.status, grouped.kinks, grouped.elements_failed, grouped.elements_checked) == (
        single.status,
        single.kinks,
        single.elements_failed,
        single.elements_checked,
    )
    if single.status != gc.Status.PASS:  # the kinks shown, as the column path shows them
        located = {(tuple(e.output_index), tuple(e.input_index)) for e in grouped.worst}
        assert located == {(tuple(e.output_index), tuple(e.input_index)) for e in single.worst}


@pytest.mark.parametrize("fn", [MissingNeighbour.apply, SpuriousNeighbour.apply])
def test_same_failing_elements_as_column_by_column(fn, monkeypatch):
    x = torch.randn(60, dtype=torch.float64)
    grouped = gc.check(fn, x, max_worst=100).pairs[0]
    monkeypatch.setattr(colouring, "colour_by_stride", lambda *args: None)
    single = gc.check(fn, x, max_worst=100).pairs[0]
    assert (grouped.status, grouped.elements_failed, grouped.elements_checked) == (
        single.status,
        single.elements_failed,
        single.elements_checked,
    )
    located = {(tuple(e.output_index), tuple(e.input_index)) for e in grouped.worst}
    assert located == {(tuple(e.output_index), tuple(e.input_index)) for e in single.worst}


class SlightlyOff(torch.autograd.Function):
    """sin with a backward 1e-5 off at element 3: below float32 rounding, caught by its float64 run."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = g * torch.cos(x)
        bump = torch.zeros_like(grad)
        bump[3] = 1e-5 * grad[3]
        return grad + bump


def _count_coloured(monkeypatch) -> list[int]:
    from gradcheck_svc.engine import full

    calls: list[int] = []
    real = full.run_coloured

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(full, "run_coloured", counted)
    return calls


def test_low_precision_checks_keep_the_column_path_and_its_float64_verdict(monkeypatch):
    calls = _count_coloured(monkeypatch)
    x = torch.linspace(-2, 2, 64)  # float32: judged against the float64 reference
    report = gc.check(SlightlyOff.apply, x)
    assert not calls
    assert not report.ok
    (pair,) = report.pairs
    assert pair.elements_failed == 1
    assert pair.worst[0].input_index == [3]
    # The float64 case of the same function does go by groups.
    assert gc.check(torch.sin, x.double()).ok and calls


def test_non_finite_input_elements_are_never_perturbed_by_groups(monkeypatch):
    calls = _count_coloured(monkeypatch)
    x = torch.linspace(-2, 2, 40, dtype=torch.float64)
    x[5] = float("inf")
    x[9] = float("nan")
    report = gc.check(torch.tanh, x)
    assert not calls
    monkeypatch.setattr(colouring, "colour_by_stride", lambda *args: None)
    single = gc.check(torch.tanh, x)
    assert (report.ok, report.pairs[0].elements_checked) == (single.ok, single.pairs[0].elements_checked)


def test_failures_come_before_kinks_in_the_worst_elements():
    class ReluOneWrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.relu(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            grad = (g * (x > 0)).clone()
            grad[-1] *= 1.5
            return grad

    x = torch.cat([torch.zeros(4), torch.linspace(0.5, 2, 60)]).double()
    (pair,) = gc.check(ReluOneWrong.apply, x, max_worst=3).pairs
    assert pair.status == gc.Status.FAIL
    assert [e.input_index for e in pair.worst] == [[63]]


@pytest.mark.parametrize("density", [0.05, 0.6, 1.0])
def test_entry_differences_equal_the_dense_block_at_every_listed_entry(density):
    # Groups difference only the entries they moved (and those the pattern names); each row's
    # noise, median and floor, comes from its moved entries alone, as in the dense block.
    from gradcheck_svc.engine.entries import Nodes, entry_differences
    from gradcheck_svc.engine.numeric import differences

    g = torch.Generator().manual_seed(5)
    k, m = 40, 30
    f0 = torch.randn(m, generator=g, dtype=torch.float64)
    h = torch.exp2(-torch.randint(14, 18, (k,), generator=g).to(torch.float64))
    offsets = torch.stack([-h, h, 2 * h])
    slope = torch.randn(k, m, generator=g, dtype=torch.float64)
    mask = torch.rand(k, m, generator=g) < density
    noise = 1e-13 * torch.randn(3, k, m, generator=g, dtype=torch.float64)
    nodes = f0 + mask * (offsets.unsqueeze(2) * slope + noise)
    x_scale = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    eps = 2.0**-52
    dense = differences(nodes.reshape(3 * k, m), f0, offsets, eps, x_scale)  # (M, k)
    moved_g, moved_r = (nodes != f0).any(dim=0).nonzero(as_tuple=True)
    extra_r, extra_g = torch.tensor([0, 7, 29]), torch.tensor([3, 0, 39])  # unmoved, named by a pattern
    rows, groups = torch.cat([moved_r, extra_r]), torch.cat([moved_g, extra_g])
    keys = torch.unique(rows * k + groups)
    rows, groups = keys // k, keys % k
    three = Nodes(nodes[:2], nodes[2], torch.arange(k), f0)
    sparse = entry_differences(three, f0, offsets, rows, groups, x_scale, eps)
    for mine, theirs in zip(sparse.parts(), dense.parts(), strict=True):
        torch.testing.assert_close(mine, theirs[rows, groups], rtol=1e-14, atol=0.0)


class OneWrongElement(torch.autograd.Function):
    """relu(x) + tanh(x) with a backward wrong at element 7 alone (a wrong diagonal element)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.relu(x) + torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = g * ((x > 0).to(g.dtype) + 1 - torch.tanh(x) ** 2)
        grad[7] = grad[7] * 1.5
        return grad


def _one_wrong_input(n: int) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x[100:110] = 0.0  # relu's kinks: never clear on the central difference, so they take x + 2h
    return x


def _perturbed_rows(monkeypatch) -> list[int]:
    from gradcheck_svc.engine import entries

    rows: list[int] = []
    real = colouring.perturb

    def counted(base, parts):
        batch = real(base, parts)
        rows.append(batch.shape[0])
        return batch

    monkeypatch.setattr(colouring, "perturb", counted)
    monkeypatch.setattr(entries, "perturb", counted)
    return rows


def _elements(pair: gc.PairReport) -> list[tuple]:
    return sorted(
        (tuple(e.output_index), tuple(e.input_index), e.kink, e.analytic, e.numeric, e.error_bar)
        for e in pair.worst
    )


def test_rechecked_columns_take_the_third_node_only_where_in_doubt(monkeypatch):
    # One wrong element fails its group: every column of the group is re-checked on its own,
    # and only the doubtful ones (the wrong one, the kinks) take x + 2h besides the noise sample.
    n = 3000
    x = _one_wrong_input(n)
    rows = _perturbed_rows(monkeypatch)
    adaptive = gc.check(OneWrongElement.apply, x, mode="full", max_worst=50).pairs[0]
    adaptive_rows = sum(rows)
    rows.clear()
    monkeypatch.setattr(colouring, "_ADAPTIVE_SINGLES", n + 1)
    every = gc.check(OneWrongElement.apply, x, mode="full", max_worst=50).pairs[0]
    assert adaptive_rows < 0.8 * sum(rows)  # about 2.2 nodes a column instead of 3
    assert (adaptive.status, adaptive.elements_failed, adaptive.kinks, adaptive.elements_checked) == (
        every.status,
        every.elements_failed,
        every.kinks,
        every.elements_checked,
    )
    assert adaptive.elements_failed == 1 and adaptive.kinks == 10
    # The failing element and every kink: their values and error bars as with x + 2h everywhere.
    assert _elements(adaptive) == _elements(every)
    failing = [e for e in adaptive.worst if not e.kink]
    assert [(e.output_index, e.input_index) for e in failing] == [([7], [7])]
    assert failing[0].tolerance == pytest.approx(every.worst[0].tolerance, rel=1e-9)


def test_a_backward_wrong_everywhere_rechecks_with_three_nodes_at_once(monkeypatch):
    # Every column fails: the groups' failing entries foretell it, and one evaluation per chunk
    # of columns takes all three nodes (no first pass to pay for twice).
    n = 600
    x = torch.randn(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rows = _perturbed_rows(monkeypatch)
    report = gc.check(WrongEverywhere.apply, x)
    assert not report.ok and report.pairs[0].elements_failed == n
    assert rows == [3 * n]  # the columns' batches (the groups' own is built apart): one, 3 nodes


class WrongEverywhere(torch.autograd.Function):
    """tanh with its derivative doubled."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return 2 * g * (1 - y * y)


class ScaledRowSoftmax(torch.autograd.Function):
    """softmax(q) * v per row, with the backward of the row-wise leaf ``q`` doubled: a structured
    leaf (``q``, block-diagonal) next to a dense one (``v``, shared by every row)."""

    @staticmethod
    def forward(ctx, q, v):
        p = torch.softmax(q, -1)
        ctx.save_for_backward(p, v)
        return p * v.sum()

    @staticmethod
    def backward(ctx, g):
        p, v = ctx.saved_tensors
        s = v.sum()
        gp = g * s
        gq = p * (gp - (gp * p).sum(-1, keepdim=True))
        return 2 * gq, (g * p).sum().expand_as(v)


def _located(report: gc.Report) -> dict:
    """Per pair: status, counts, and the elements named (all of them, when the list holds all)."""
    return {
        (pair.output, pair.input): (
            pair.status,
            pair.elements_failed,
            pair.elements_checked,
            pair.kinks,
            sorted((tuple(e.output_index), tuple(e.input_index)) for e in pair.worst)
            if pair.elements_failed + pair.kinks < 100
            else None,
        )
        for pair in report.pairs
    }


def test_wrong_structured_leaf_next_to_a_dense_one_is_caught_and_located():
    q = torch.randn(6, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = torch.randn(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    report = gc.check(ScaledRowSoftmax.apply, q, v, max_worst=100)
    assert not report.ok
    structured, dense = report.pairs  # q, then v
    assert dense.ok
    wrong = structured
    # Every failing element of q's pair lies in its own row's block, none outside.
    assert wrong.elements_failed > 0
    assert all(e.output_index[0] == e.input_index[0] for e in wrong.worst if not e.kink)


@pytest.mark.parametrize(
    "fn, args",
    [
        (MissingNeighbour.apply, (torch.randn(80, dtype=torch.float64),)),
        (SpuriousNeighbour.apply, (torch.randn(80, dtype=torch.float64),)),
        (WrongEverywhere.apply, (torch.randn(300, dtype=torch.float64),)),
        (OneWrongElement.apply, (_one_wrong_input(300),)),
        (
            ScaledRowSoftmax.apply,
            (torch.randn(6, 8, dtype=torch.float64), torch.randn(12, dtype=torch.float64)),
        ),
    ],
)
def test_small_failing_groups_on_the_column_path_locate_the_same_elements(fn, args, monkeypatch):
    # Failing groups of a small block go back to full mode's column chunks; the same failing
    # elements, counts and kinks as when they are re-checked one by one as listed entries.
    handed_back = gc.check(fn, *args, max_worst=100)
    monkeypatch.setattr(colouring, "_DENSE_RECHECK", 0)
    listed = gc.check(fn, *args, max_worst=100)
    assert not handed_back.ok and not listed.ok
    assert _located(handed_back) == _located(listed)


def test_rechecks_in_cache_sized_batches_report_the_same_elements(monkeypatch):
    # Wrong everywhere: every column takes three nodes; batches sized to the cache or one batch
    # give the same failing elements, counts, and values within their error bars.
    n = 2000
    x = torch.randn(n, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 3
    rows = _perturbed_rows(monkeypatch)
    small = gc.check(WrongEverywhere.apply, x, max_worst=100)
    small_rows = list(rows)
    rows.clear()
    monkeypatch.setattr(colouring, "_SINGLES_BYTES", 1 << 40)
    whole = gc.check(WrongEverywhere.apply, x, max_worst=100)
    assert len(small_rows) > len(rows) and sum(small_rows) == sum(rows) == 3 * n
    assert _located(small) == _located(whole)
    assert small.pairs[0].elements_failed > 0.9 * n
    ours = {tuple(e.input_index): e for e in small.pairs[0].worst}
    shared = [e for e in whole.pairs[0].worst if tuple(e.input_index) in ours]
    assert shared
    for e in shared:
        mine = ours[tuple(e.input_index)]
        assert mine.output_index == e.output_index == e.input_index
        assert mine.numeric == pytest.approx(e.numeric, abs=e.error_bar + mine.error_bar)


def _band(n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(n).repeat_interleave(width)
    cols = (rows + torch.arange(width).repeat(n) - width // 2).clamp(0, n - 1)
    key = torch.unique(rows * n + cols)
    return key // n, key % n


@pytest.mark.parametrize(
    "pattern, n",
    [
        (_band(300, 5), 300),
        (_band(500, 31), 500),
        ((torch.arange(400), torch.arange(400)), 400),
        ((torch.arange(600).repeat_interleave(20), torch.arange(600 * 20) % 600), 600),  # dense-ish
        ((torch.arange(200).repeat_interleave(10), torch.arange(2000) // 2), 1000),
    ],
)
def test_stride_by_counting_equals_stride_by_sorting(pattern, n, monkeypatch):
    rows, cols = pattern
    counted = colour_by_stride(rows, cols, n)
    monkeypatch.setattr(colouring, "_COUNTED_KEYS", 0)
    assert colour_by_stride(rows, cols, n) == counted
