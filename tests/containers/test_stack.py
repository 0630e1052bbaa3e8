"""The container stack for real: image, compose file, healthcheck, seed checks, the tests container, replicas.

Runs with rootful podman + docker-compose (see conftest.py); under CI (CI=true) a missing engine fails.
The tests share one stack and run in file order: image -> server healthy -> checks -> replicas.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Engine


pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.xdist_group("containers")]

HEALTH_ARGV = ["CMD", "gradcheck-svc", "health", "--target", "127.0.0.1:50051"]
SIN_AT_100 = math.cos(100 / 2**1.5) / 2**1.5  # d/dx sin(x / 2**1.5) at 100 = -0.2469...


def assert_suite_passed(output: str) -> None:
    """pytest's closing line says only "N passed" (docker-compose run already returned its exit 0)."""
    closing = re.findall(r"^=+ (.*) in [\d.]+s.* =+$", output, re.MULTILINE)
    assert closing and re.fullmatch(r"\d+ passed", closing[-1]), output[-3000:]


def test_compose_file_is_valid_for_every_profile(engine: Engine) -> None:
    engine.dc(*engine.profiles, "config", "-q")
    services = engine.dc(*engine.profiles, "config", "--services").stdout.split()
    assert set(services) == {"server", "replica", "server-gpu", "tests"}


def test_runtime_image_is_slim_non_root_and_healthchecked(engine: Engine, images: str) -> None:
    (image,) = json.loads(engine.podman("image", "inspect", engine.image).stdout)
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert "50051/tcp" in config["ExposedPorts"]
    assert image["Healthcheck"]["Test"] == HEALTH_ARGV
    assert config["Cmd"] == ["gradcheck-svc", "serve", "--host", "0.0.0.0", "--port", "50051"]
    probe = engine.podman(
        "run",
        "--rm",
        images,
        "sh",
        "-c",
        "id -u; for t in gcc cc c++ make git pytest; do command -v $t; done; "
        "python -c 'import pytest' 2>/dev/null && echo has-pytest; "
        "python -c 'import gradcheck_svc, torch; print(torch.__version__)'",
    )
    lines = probe.stdout.split()
    assert lines[0] == "10001", probe.stdout
    assert lines[1:-1] == [], f"build tools or test dependencies in the runtime image: {lines[1:-1]}"
    assert "+cpu" in lines[-1] or lines[-1].startswith("2."), lines[-1]


def test_server_is_healthy_with_restart_policy(stack: Engine) -> None:
    (cid,) = stack.container_ids("server")
    assert stack.inspect(cid, "{{.State.Health.Status}}") == "healthy"
    assert json.loads(stack.inspect(cid, "{{json .Config.Healthcheck.Test}}")) == HEALTH_ARGV
    assert stack.inspect(cid, "{{.HostConfig.RestartPolicy.Name}}") == "unless-stopped"
    env = json.loads(stack.inspect(cid, "{{json .Config.Env}}"))
    assert "GRADCHECK_DEVICE=cpu" in env


def test_seed_checks_from_the_host(stack: Engine) -> None:
    import torch

    from gradcheck_svc.client import Client

    (cid,) = stack.container_ids("server")
    hostname = stack.hostname(cid)
    with stack.timed("seed checks from the host"), Client(f"127.0.0.1:{stack.host_port}") as client:
        square = client.check("x**2", x=torch.tensor(9.0))
        sine = client.check("sin(x / 2**1.5)", x=torch.tensor(100.0, dtype=torch.float64))
        two = client.check(
            "u**2 + v**3 + u*v",
            u=torch.tensor(2.0, dtype=torch.float64),
            v=torch.tensor(4.0, dtype=torch.float64),
            options={"mode": "full"},
        )
    assert square.ok and square.pairs[0].analytic == pytest.approx([18.0])
    assert sine.ok and sine.pairs[0].analytic == pytest.approx([SIN_AT_100], rel=1e-9)
    assert pytest.approx(-0.2469, abs=1e-4) == SIN_AT_100
    assert two.ok and {p.input: p.analytic for p in two.pairs} == {
        "u": pytest.approx([8.0]),
        "v": pytest.approx([50.0]),
    }
    assert {square.served_by, sine.served_by, two.served_by} == {hostname}


def test_cli_against_the_container(stack: Engine) -> None:
    cli = shutil.which("gradcheck-svc", path=str(Path(sys.executable).parent)) or "gradcheck-svc"
    target = f"127.0.0.1:{stack.host_port}"
    stack.run([cli, "health", "--target", target], timeout=60)
    out = stack.run([cli, "check", "--target", target, "--expr", "x**2", "--at", "x=9", "--json"], timeout=60)
    (report,) = json.loads(out.stdout)  # one report per point
    assert report["ok"] is True
    assert report["pairs"][0]["analytic"] == pytest.approx([18.0])  # type: ignore[index]
    assert report["served_by"]


def test_host_pytest_pointed_at_the_container(stack: Engine) -> None:
    suite = Path(__file__).resolve().parents[2] / "examples" / "remote_suite"
    with stack.timed("host pytest --gradcheck-server"):
        proc = stack.run(
            [sys.executable, "-m", "pytest", str(suite), f"--gradcheck-server=127.0.0.1:{stack.host_port}"],
            timeout=300,
        )
    assert f"on 127.0.0.1:{stack.host_port}" in proc.stdout, proc.stdout[-3000:]
    assert_suite_passed(proc.stdout)


def test_remote_suite_runs_in_the_tests_container(stack: Engine) -> None:
    with stack.timed("tests container: examples/remote_suite"):
        proc = stack.dc("run", "--rm", "-T", "tests", timeout=300)
    assert_suite_passed(proc.stdout)


def test_three_replicas_each_serve_checks(stack: Engine) -> None:
    import torch

    from gradcheck_svc.client import Client

    with stack.timed("scale to 3 replicas + healthy"):
        stack.dc("up", "-d", "--no-build", "--scale", "replica=3", "replica")
        ids = stack.wait_healthy("replica", count=3)
    hostnames = {stack.hostname(cid) for cid in ids}
    assert len(hostnames) == 3

    with stack.timed("replica checks (host, network, suite)"):
        # From the host: each replica's loopback port; the client takes the addresses in turn.
        addresses = [f"{host}:{port}" for host, port in (stack.published("replica", i) for i in (1, 2, 3))]
        with Client(addresses) as client:
            reports = [client.check("x**2", x=torch.tensor(float(i))) for i in range(1, 10)]
        assert all(r.ok for r in reports)
        from_host = Counter(r.served_by for r in reports)
        print(f"host -> {addresses}: {dict(from_host)}")
        assert set(from_host) == hostnames

        # Inside the compose network: one name, every replica's address, gRPC round_robin.
        proc = stack.dc(
            "run",
            "--rm",
            "-T",
            "tests",
            "python",
            "spread.py",
            "dns:///replica:50051",
            "--checks",
            "12",
            "--expect",
            "3",
            timeout=300,
        )
        spread = stack.json_line(proc.stdout)
        print(f"tests container -> dns:///replica:50051: {spread['served_by']}")
        assert spread["failed"] == 0
        assert set(spread["served_by"]) == hostnames, spread  # type: ignore[arg-type]

        # The user's suite, pointed at the replicas.
        suite = stack.dc(
            "run", "--rm", "-T", "-e", "GRADCHECK_SERVER=dns:///replica:50051", "tests", timeout=300
        )
        assert_suite_passed(suite.stdout)
