"""Replicas come and go under load and the client loses no check.

Three ``gradcheck-svc serve`` replicas on loopback behind one Client (round-robin over a target
list, failover on UNAVAILABLE, gRPC retry policy). During 2,000 checks one replica is SIGKILLed
and another SIGTERMed (it drains: in-flight checks finish, new ones go elsewhere); the third keeps
the run fully served. The drained replica must exit 0 after answering what it had accepted.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
from service_servers import ServeProcess

from gradcheck_svc.client import Client

TOTAL = 2000
CONCURRENCY = 8


def test_sigkill_and_sigterm_during_a_run_lose_no_check() -> None:
    replicas = [
        ServeProcess(
            "--grace-seconds", "30", env={"GRADCHECK_REPLICA_NAME": name, "GRADCHECK_LOG_LEVEL": "WARNING"}
        )
        for name in ("killed", "drained", "survivor")
    ]
    try:
        addresses = [r.address for r in replicas]
        done = 0
        failures: list[str] = []
        served = Counter[str]()
        lock = threading.Lock()
        x = torch.tensor(1.5, dtype=torch.float64)

        with Client(addresses, retry=True, connect_timeout=2, timeout=60) as client:

            def one(i: int) -> None:
                nonlocal done
                try:
                    report = client.check("sin(x) * x", x=x + i % 7)
                    name = report.served_by if report.ok else None
                    problem = None if report.ok else "not ok"
                except Exception as exc:
                    name, problem = None, f"{type(exc).__name__}: {exc}"
                with lock:
                    done += 1
                    if problem:
                        failures.append(problem)
                    else:
                        served[str(name)] += 1

            def chaos() -> None:
                while done < TOTAL // 5:
                    time.sleep(0.01)
                replicas[0].proc.send_signal(signal.SIGKILL)
                while done < TOTAL // 2:
                    time.sleep(0.01)
                replicas[1].proc.send_signal(signal.SIGTERM)

            monkey = threading.Thread(target=chaos, daemon=True)
            monkey.start()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(one, range(TOTAL)))
            monkey.join(timeout=5)

        assert failures == [], failures[:5]
        assert sum(served.values()) == TOTAL
        assert set(served) == {"killed", "drained", "survivor"}  # every replica served part of the run
        assert replicas[0].proc.wait(10) == -signal.SIGKILL
        assert replicas[1].proc.wait(40) == 0  # drained, then a clean exit (the signal path)
    finally:
        for replica in replicas:
            replica.stop()
