"""``gradcheck-svc`` against a ``gradcheck-svc serve`` subprocess (and locally, without --target)."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest
from service_servers import ServeProcess, serve_command

from gradcheck_svc import cli


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    rc, out, err = run(capsys, *args, "--json")
    assert out, err
    return rc, json.loads(out)


def analytic(report: dict[str, Any]) -> dict[str, list[float]]:
    return {p["input"]: p["analytic"] for p in report["pairs"]}


def test_seed_square_remote(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "check", "--target", served.address, "--expr", "x**2", "--at", "x=9")
    assert rc == 0
    assert out.startswith("gradcheck x**2 at point 0: ok (float64, cpu, full mode, central")
    assert "analytic         18   numeric         18" in out


def test_seed_sine_remote(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rc, reports = run_json(
        capsys, "check", "--target", served.address, "--expr", "sin(x / 2**1.5)", "--at", "x=100"
    )
    assert rc == 0 and reports[0]["served_by"] == "replica-sub"
    assert analytic(reports[0])["x"][0] == pytest.approx(-0.2469, abs=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_seed_two_inputs_remote_and_local_agree(
    served: ServeProcess, capsys: pytest.CaptureFixture[str], dtype: str
) -> None:
    args = ["check", "--expr", "u**2 + v**3 + u*v", "--at", "u=2", "--at", "v=4", "--dtype", dtype]
    rc, remote = run_json(capsys, *args, "--target", served.address)
    assert rc == 0 and analytic(remote[0]) == {"u": [8.0], "v": [50.0]}
    rc, local = run_json(capsys, *args)
    assert rc == 0
    for report in (remote[0], local[0]):
        for key in ("timings", "served_by", "point"):
            report.pop(key)
    assert remote[0] == local[0]


def test_several_points_and_options(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rc, reports = run_json(
        capsys,
        "check",
        "--target",
        served.address,
        "--expr",
        "x**3",
        "--at",
        "x=1",
        "--at",
        "x=2",
        "--option",
        "mode=full",
    )
    assert rc == 0 and [analytic(r)["x"] for r in reports] == [[3.0], [12.0]]
    assert all(r["options"]["mode"] == "full" and "eps" in r["options"] for r in reports)


def test_registered_and_sampled(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rc, reports = run_json(
        capsys,
        "check",
        "--target",
        served.address,
        "--function",
        "torch.nn.functional.softmax",
        "--param",
        "dim=-1",
        "--sample",
        "x=4",
        "--count",
        "2",
    )
    assert rc == 0 and len(reports) == 2 and reports[1]["point"] == 1
    rc, _, _ = run(capsys, "check", "--function", "torch.sin", "--sample", "x=3", "--count", "2")
    assert rc == 0


def test_mismatch_exits_1(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(
        capsys,
        "check",
        "--target",
        served.address,
        "--function",
        "service_test_ops:BadBackward",
        "--at",
        "x=2",
    )
    assert rc == 1 and "GRADIENT MISMATCH" in out
    rc, _, _ = run(
        capsys,
        "check",
        "--functions",
        "service_test_ops",
        "--function",
        "service_test_ops:BadBackward",
        "--at",
        "x=2",
    )
    assert rc == 1


def test_function_error_at_a_point_exits_2(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["check", "--target", served.address, "--function", "service_test_ops:raises_when_negative"]
    rc, out, _ = run(capsys, *args, "--at", "x=4", "--at", "x=-1")
    assert rc == 2 and "negative input" in out and "at point 0: ok" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expr", "x**2"], "give the inputs"),
        (["--expr", "x**2", "--at", "x"], "expects NAME=VALUE"),
        (["--expr", "x**2", "--at", "x=abc"], "cannot read 'abc'"),
        (["--expr", "u*v", "--at", "u=1", "--at", "u=2", "--at", "v=1"], "every point needs a value"),
        (["--expr", "u*v", "--at", "u=1"], "variables are ['u', 'v']"),
        (["--expr", "x.y", "--at", "x=1"], "attribute access"),
        (["--expr", "x**2", "--at", "x=1", "--dtype", "float128"], "unknown dtype"),
        (["--expr", "x**2", "--at", "x=1", "--option", "atol=-1"], "atol"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    rc, _, err = run(capsys, "check", *args)
    assert rc == 2 and message in err


def test_server_errors_exit_2(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "check", "--target", served.address, "--expr", "x.y", "--at", "x=1")
    assert rc == 2 and "INVALID_ARGUMENT" in err and "function.expression" in err
    rc, _, err = run(capsys, "check", "--target", served.address, "--function", "no.such:fn", "--at", "x=1")
    assert rc == 2 and "NOT_FOUND" in err
    rc, _, err = run(
        capsys, "check", "--target", "127.0.0.1:1", "--connect-timeout", "1", "--expr", "x", "--at", "x=1"
    )
    assert rc == 2 and "cannot reach" in err


def test_target_from_the_environment(
    served: ServeProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADCHECK_TARGET", served.address)
    rc, reports = run_json(capsys, "check", "--expr", "x**2", "--at", "x=9")
    assert rc == 0 and reports[0]["served_by"] == "replica-sub"


def test_capabilities(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "capabilities", "--target", served.address, "--json")
    caps = json.loads(out)
    assert rc == 0 and caps["served_by"] == "replica-sub"
    assert "service_test_ops:slow_square" in caps["registered_functions"]
    rc, out, _ = run(capsys, "capabilities", "--target", served.address)
    assert rc == 0 and "registered functions" in out and "max_points=1024" in out


def test_health_as_a_real_subprocess(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    ok = subprocess.run(
        [*serve_command(), "health", "--target", served.address], capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    rc, _, err = run(capsys, "health", "--target", "127.0.0.1:1", "--timeout", "1")
    assert rc == 2 and "UNAVAILABLE" in err


def test_one_log_line_per_check(served: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "check", "--target", served.address, "--expr", "x**2 + 1", "--at", "x=3")
    deadline = time.monotonic() + 20  # the line is written once the answer has gone out
    while not (lines := [line for line in served.log().splitlines() if "function='x**2 + 1'" in line]):
        assert time.monotonic() < deadline, "no log line"
    assert len(lines) == 1
    assert all(
        f in lines[0] for f in ("check id=", "points=1", "device=cpu", "ok=true", "status=OK", "duration=")
    )


def test_serve_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "serve", "--port", "99999")
    assert rc == 2 and "port" in err
    rc, _, err = run(capsys, "serve", "--tls-cert-file", "cert.pem")
    assert rc == 2 and "tls_key_file" in err


def test_serve_flags_cover_every_setting() -> None:
    from gradcheck_svc.settings import Settings

    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {a.dest for a in serve._actions}
    assert set(Settings.model_fields) <= flags
