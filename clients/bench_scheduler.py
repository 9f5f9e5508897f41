#!/usr/bin/env python3
"""Benchmark: scheduling time per policy for pools of 256 and 1024 queries.

Prints min and median wall time of ``scheduler.schedule(pool)`` (milliseconds) over
``--repeats`` runs, on PetS Fig. 12-style pools (lengths ~ N(32, std), tasks uniform).
Target: < 1 ms for 256 queries on a server CPU. Not a test: numbers only.

    .venv/bin/python clients/bench_scheduler.py [--sizes 256,1024] [--tasks 64] [--std 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

try:
    import pets  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from fig12 import make_pool

from pets.scheduling import available_policies, load_cost_model, make_scheduler
from pets.scheduling.analytic import AnalyticModel


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024", help="pool sizes (default %(default)s)")
    ap.add_argument("--tasks", type=int, default=64, help="tasks in the pool")
    ap.add_argument("--std", type=float, default=4.0, help="length std (mean 32)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--policies", default=",".join(available_policies()))
    ap.add_argument("--cost-table", default=None, help="JSON cost table (default analytic)")
    args = ap.parse_args(argv)
    model = load_cost_model(args.cost_table, AnalyticModel.for_device("cuda"))
    print(
        f"# CPU: {cpu_name()} ({os.cpu_count()} logical cores), Python "
        f"{platform.python_version()}; tasks={args.tasks} std={args.std}"
    )
    print(f"{'policy':14s} {'queries':>7s} {'min ms':>8s} {'median ms':>10s} {'batches':>8s}")
    for name in args.policies.split(","):
        opts = {"cost_model": model} if name in ("alpha_only", "beta_only", "coordinated") else {}
        sched = make_scheduler(name, **opts)
        for n in (int(x) for x in args.sizes.split(",")):
            pool = make_pool(n, args.tasks, args.std, seed=1)
            batches = sched.schedule(pool)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                sched.schedule(pool)
                times.append(time.perf_counter() - t0)
            print(
                f"{name:14s} {n:7d} {1e3 * min(times):8.3f} "
                f"{1e3 * statistics.median(times):10.3f} {len(batches):8d}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
