"""Setting ``torch_threads``: torch's intra-op thread count of the server process (its handler
threads) and of its worker processes, validated, and chosen from the cores when left at 0."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydantic
import pytest
import torch
from service_servers import ServeProcess

from gradcheck_svc import cli
from gradcheck_svc import settings as settings_module
from gradcheck_svc.client import Client
from gradcheck_svc.settings import Settings, usable_cores

PROBE = "service_test_ops:tells_torch_threads"


def threads_seen(address: str) -> int:
    """torch's thread count where the server ran a check of ``PROBE`` (its error names it)."""
    # 256 elements: a check that small inputs mark small runs torch on one thread from fn's
    # first call on, where the server's worker process runs no other thread (threads.py)
    with Client(address, timeout=120) as client:
        report = client.check_registered(PROBE, torch.linspace(1.0, 2.0, 256, dtype=torch.float64))
    found = re.search(r"torch threads here: (\d+)", report.error or "")
    assert found, report
    return int(found.group(1))


@pytest.fixture(scope="module")
def three_threads_in_threads() -> Iterator[ServeProcess]:
    process = ServeProcess("--torch-threads", "3", "--isolation", "thread")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def three_threads_in_workers() -> Iterator[ServeProcess]:
    process = ServeProcess("--torch-threads", "3", "--isolation", "process")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def automatic() -> Iterator[ServeProcess]:
    process = ServeProcess("--isolation", "process", env={"GRADCHECK_LOG_LEVEL": "INFO"})
    yield process
    process.stop()


def test_the_setting_reaches_the_handler_threads(three_threads_in_threads: ServeProcess) -> None:
    # Several checks at once, each in its own gRPC handler thread, all on 3 threads.
    address = three_threads_in_threads.address  # read once: it waits for the server's first line
    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda _: threads_seen(address), range(4)))
    assert seen == [3, 3, 3, 3]


def test_the_setting_reaches_the_worker_processes(three_threads_in_workers: ServeProcess) -> None:
    assert threads_seen(three_threads_in_workers.address) == 3
    # The start-up line names the server process's own count.
    assert "torch threads=3" in three_threads_in_workers.log()


def test_automatic_count_in_the_server_and_its_workers(automatic: ServeProcess) -> None:
    expected = max(1, usable_cores() // Settings().max_concurrent_checks)
    assert threads_seen(automatic.address) == expected
    assert re.search(rf"torch threads={expected}\b", automatic.log())


@pytest.mark.parametrize(
    ("cores", "concurrent", "torch_threads", "expected"),
    [
        (8, 32, 0, 1),  # more checks than cores: one thread each
        (8, 8, 0, 1),
        (8, 3, 0, 2),  # rounded down: 3 checks x 2 threads fit in 8 cores
        (8, 1, 0, 8),  # one check at a time: every core
        (2, 1, 0, 2),
        (8, 32, 4, 4),  # an explicit count wins
    ],
)
def test_automatic_count_shares_the_cores_among_concurrent_checks(
    monkeypatch: pytest.MonkeyPatch, cores: int, concurrent: int, torch_threads: int, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(settings_module, "_cgroup_cpu_quota", lambda: None)
    assert usable_cores() == cores
    settings = Settings(max_concurrent_checks=concurrent, torch_threads=torch_threads)
    assert settings.intra_op_threads == expected


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),
        ("50000 100000\n", 1),
        ("max 100000\n", None),
        ("", None),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, quota: int | None
) -> None:
    # docker run --cpus 1.5 on a 64-core host: the quota, not the host's cores, is what checks share.
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert settings_module._cgroup_cpu_quota(str(path)) == quota
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(settings_module, "_cgroup_cpu_quota", lambda: quota)
    assert usable_cores() == (quota or 64)
    assert Settings(max_concurrent_checks=1).intra_op_threads == (quota or 64)


def test_no_cgroup_file_means_no_quota(tmp_path: Path) -> None:
    assert settings_module._cgroup_cpu_quota(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("value", [-1, 1025])
def test_out_of_range_counts_are_refused(value: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="torch_threads"):
        Settings(torch_threads=value)


def test_a_count_that_is_not_a_number_is_refused_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRADCHECK_TORCH_THREADS", "two")
    with pytest.raises(pydantic.ValidationError, match="torch_threads"):
        Settings()


def test_serve_refuses_a_bad_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--torch-threads", "-2"]) == 2
    assert "torch_threads" in capsys.readouterr().err
