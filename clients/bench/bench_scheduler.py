"""Benchmark: scheduling time per policy for pools of 256 and 1024 queries.

Prints min and median wall time of ``scheduler.schedule(pool)`` (milliseconds) over
``--repeats`` runs, on PetS Fig. 12-style pools (lengths ~ N(32, std), tasks uniform).
Target: < 1 ms for 256 queries on a server CPU. Not a test: numbers only. The table is also
written as ``bench_scheduler.txt`` and ``bench_scheduler.csv`` to a dated run folder under
``--out`` (``clients/bench/results.py``).

    python -m clients.bench.bench_scheduler [--sizes 256,1024] [--tasks 64] [--std 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from clients.bench.results import add_out_argument, cpu_name, start_run
from clients.paper.fig12 import make_pool
from pets.scheduling import available_policies, load_cost_model, make_scheduler
from pets.scheduling.analytic import AnalyticModel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024", help="pool sizes (default %(default)s)")
    ap.add_argument("--tasks", type=int, default=64, help="tasks in the pool")
    ap.add_argument("--std", type=float, default=4.0, help="length std (mean 32)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--policies", default=",".join(available_policies()))
    ap.add_argument("--cost-table", default=None, help="JSON cost table (default analytic)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    out = start_run("bench_scheduler", args.out, params=vars(args))
    model = load_cost_model(args.cost_table, AnalyticModel.for_device("cuda"))
    lines: list[str] = []
    rows: list[dict[str, object]] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(
        f"# CPU: {cpu_name()} ({os.cpu_count()} logical cores), Python "
        f"{platform.python_version()}; tasks={args.tasks} std={args.std}"
    )
    say(f"{'policy':14s} {'queries':>7s} {'min ms':>8s} {'median ms':>10s} {'batches':>8s}")
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
            say(
                f"{name:14s} {n:7d} {1e3 * min(times):8.3f} "
                f"{1e3 * statistics.median(times):10.3f} {len(batches):8d}"
            )
            rows.append(
                {
                    "policy": name,
                    "queries": n,
                    "min_ms": round(1e3 * min(times), 3),
                    "median_ms": round(1e3 * statistics.median(times), 3),
                    "batches": len(batches),
                }
            )
    out.write_text("bench_scheduler.txt", "\n".join(lines) + "\n")
    out.write_csv("bench_scheduler.csv", rows)
    out.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
