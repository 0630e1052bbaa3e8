"""Send checks through one client and count which server replica ran each one.

    python spread.py dns:///replica:50051 --checks 12 --expect 3

A ``dns:///NAME:PORT`` target (or a comma-separated list of addresses) gives the client every address
behind the name and spreads calls over them round-robin. Prints one JSON line; exits 1 when fewer than
``--expect`` distinct replicas answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target", help="dns:///NAME:PORT, HOST:PORT, or HOST1:PORT,HOST2:PORT,...")
    parser.add_argument("--checks", type=int, default=12)
    parser.add_argument("--expect", type=int, default=1, help="fail unless this many replicas answered")
    args = parser.parse_args(argv)

    import torch

    from gradcheck_svc.client import Client

    target: str | list[str] = args.target.split(",") if "," in args.target else args.target
    served: Counter[str] = Counter()
    failed = 0
    with Client(target) as client:
        for i in range(args.checks):
            x = torch.tensor(float(i + 1), dtype=torch.float64)
            report = client.check("x**2", x=x)
            failed += not report.ok or report.pairs[0].analytic != [2.0 * (i + 1)]
            served[report.served_by] += 1
    print(json.dumps({"target": args.target, "checks": args.checks, "failed": failed, "served_by": served}))
    return 0 if failed == 0 and len(served) >= args.expect and "" not in served else 1


if __name__ == "__main__":
    sys.exit(main())
