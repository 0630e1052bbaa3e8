"""progress= on the library, and the CLI's bar."""

from __future__ import annotations

import io

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.cli import main
from gradcheck_svc.progress_bar import ProgressBar

X = torch.randn(40, dtype=torch.float64)


W = torch.randn(40, 40, dtype=torch.float64) / 40**0.5


def dense(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(W @ x)


def test_full_mode_reports_every_chunk_up_to_the_total() -> None:
    # A dense Jacobian goes column chunk by column chunk: one report per chunk.
    seen: list[tuple[int, int]] = []
    report = gc.check(dense, X, mode="full", chunk_size=16, progress=lambda d, t: seen.append((d, t)))
    assert report.ok
    assert seen == [(16, 40), (32, 40), (40, 40)]


def test_grouped_columns_count_every_column_they_cover() -> None:
    # An elementwise Jacobian is checked by grouped perturbations: one batch covers every column.
    seen: list[tuple[int, int]] = []
    report = gc.check(torch.sin, X, mode="full", chunk_size=16, progress=lambda d, t: seen.append((d, t)))
    assert report.ok
    assert seen and seen[-1] == (40, 40)
    assert all(0 < d <= t for d, t in seen)


def test_fast_mode_counts_projections() -> None:
    seen: list[tuple[int, int]] = []
    gc.check(torch.sin, X, mode="fast", projections=4, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (4, 4)
    assert all(0 < d <= t for d, t in seen)


def test_float32_counts_the_float64_reference_columns_once() -> None:
    # The numeric side of a float32 check runs on a float64 copy: its columns are the ones counted.
    seen: list[tuple[int, int]] = []
    report = gc.check(
        torch.sin, X.float(), mode="full", chunk_size=16, progress=lambda d, t: seen.append((d, t))
    )
    assert report.ok and report.options["reference"] == "float64"
    assert seen == [(16, 40), (32, 40), (40, 40)]


def test_wrt_counts_only_the_checked_inputs() -> None:
    seen: list[tuple[int, int]] = []
    y = torch.randn(7, dtype=torch.float64)
    report = gc.check(
        lambda a, b: a.sum() * b, X, y, wrt=1, mode="full", progress=lambda d, t: seen.append((d, t))
    )
    assert [p.input for p in report.pairs] == ["inputs[1]"]
    assert seen[-1] == (7, 7)


def test_progress_must_be_callable() -> None:
    with pytest.raises(gc.InvalidOptionError, match="progress must be callable"):
        gc.check(torch.sin, X, progress=5)


def test_a_failing_callback_stops_the_check() -> None:
    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gc.check(torch.sin, X, mode="full", chunk_size=8, progress=stop)


def test_bar_is_silent_at_first_then_draws_lines() -> None:
    out = io.StringIO()
    quiet = ProgressBar("f", out, after=3600.0)
    quiet(5, 10)
    assert out.getvalue() == ""
    bar = ProgressBar("f", out, after=0.0, every=0.0, width=10)
    bar(5, 10)
    bar(10, 10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("f [#####.....] 5/10 columns, ")
    assert lines[1].startswith("f [##########] 10/10 columns, ")


def test_cli_shows_progress_on_a_long_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(ProgressBar, "__init__", _eager_init)
    code = main(
        [
            "check",
            "--function",
            "torch.sin",
            "--sample",
            "x=50",
            "--option",
            "mode=full",
            "--option",
            "chunk_size=25",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "torch.sin [" in captured.err and "50/50 columns" in captured.err


_real_init = ProgressBar.__init__


def _eager_init(self: ProgressBar, label: str, stream: object = None, **kwargs: object) -> None:
    _real_init(self, label, stream, after=0.0, every=0.0)  # type: ignore[arg-type]


def test_cli_shows_the_servers_progress(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import gradcheck_svc.server.service as service
    from gradcheck_svc.server import create_server
    from gradcheck_svc.settings import Settings

    monkeypatch.setattr(ProgressBar, "__init__", _eager_init)
    monkeypatch.setattr(service, "_PROGRESS_EVERY", 0.0)
    server, port = create_server(Settings(host="127.0.0.1", port=0, device="cpu"))
    server.start()
    try:
        at = "--at=x=" + str([0.1 * i for i in range(30)])
        code = main(
            [
                "check",
                "--target",
                f"127.0.0.1:{port}",
                "--expr",
                "sin(x * sum(x))",
                at,
                "--option",
                "chunk_size=10",
            ]
        )
    finally:
        server.stop(grace=1)
    captured = capsys.readouterr()
    assert code == 0
    assert (
        "sin(x * sum(x)) [" in captured.err
        and "10/30 columns" in captured.err
        and "30/30 columns" in captured.err
    )
